"""Pictures drawn with matplotlib (the optional `plots` extra): block-mask grids, heat-map grids
with a colour bar, line charts, and a PNG writer whose bytes depend only on the figure.

Figures are `matplotlib.figure.Figure`s on the Agg canvas with constrained layout (titles and
labels are fitted inside the figure); no pyplot state is touched. Without matplotlib installed,
every drawing function raises a ValueError saying which extra to install.
"""

from __future__ import annotations

import numpy as np

try:
    import matplotlib.backends.backend_agg
    import matplotlib.colors
    import matplotlib.figure
    import matplotlib.patches
except ModuleNotFoundError:  # the plots extra is not installed: require_matplotlib says so
    matplotlib = None

MISSING = "drawing pictures needs matplotlib, an optional extra: pip install 'sparge-jax[plots]'"
DPI = 100
# colours of a block mask's three states (value 0, 1, 2 of `mask_codes`)
MASK_COLOURS = {"skipped": "#ebebeb", "linear (SLA)": "#8c8c8c", "computed exactly": "#1e1e1e"}


def require_matplotlib() -> None:
    """Raise ValueError(`MISSING`) when matplotlib is not installed."""
    if matplotlib is None:
        raise ValueError(MISSING)


def figure(width: float, height: float) -> matplotlib.figure.Figure:
    """An empty `width` x `height` inch figure at `DPI` with constrained layout, on the Agg canvas."""
    require_matplotlib()
    fig = matplotlib.figure.Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    matplotlib.backends.backend_agg.FigureCanvasAgg(fig)
    return fig


def save_png(fig: matplotlib.figure.Figure, path) -> None:
    """Write `fig` as a PNG of exactly its own size (width x height inches at `DPI`); no version or
    date metadata is stored, so the same figure gives the same bytes."""
    fig.savefig(path, dpi=DPI, format="png", metadata={"Software": None})


def _fit_title(fig: matplotlib.figure.Figure, title: str) -> None:
    """`title` above everything, the figure widened where the title would not fit its width."""
    text = fig.suptitle(title, fontsize=11)
    needed = text.get_window_extent(fig.canvas.get_renderer()).width / DPI + 0.3
    if needed > fig.get_figwidth():
        fig.set_figwidth(needed)


def mask_codes(mask: np.ndarray, linear: np.ndarray | None = None) -> np.ndarray:
    """int8 `(q_blocks, k_blocks)`: 2 where bool `mask` keeps a block exactly, 1 where bool `linear`
    (SLA's linearly attended blocks; None: none) marks it, else 0 (skipped)."""
    codes = np.zeros(np.shape(mask), np.int8)
    if linear is not None:
        codes[np.asarray(linear, bool)] = 1
    codes[np.asarray(mask, bool)] = 2
    return codes


def _panel_grid(fig, rows: int, cols: int, row_labels: list[str], col_labels: list[str]):
    """`(rows, cols)` axes sharing block axes: column titles, row labels (horizontal) left of the
    first column, "q block" down and "k block" across on the outer axes."""
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)
    for j, label in enumerate(col_labels):
        axes[0, j].set_title(label, fontsize=9)
    for i, label in enumerate(row_labels):
        axes[i, 0].set_ylabel("q block", fontsize=8)
        axes[i, 0].annotate(label, xy=(0, 0.5), xycoords="axes fraction", xytext=(-40, 0), textcoords="offset points",
                            ha="right", va="center", fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("k block", fontsize=8)
    for ax in axes.flat:
        ax.tick_params(labelsize=7)
        ax.label_outer()
    return axes


def _panel_size(shape: tuple[int, int], rows: int, cols: int, extra_width: float) -> tuple[float, float]:
    """Figure inches for `rows` x `cols` panels of `(q_blocks, k_blocks)` cells (at least 5 px a cell,
    panels 1.6 to 3 inches wide) plus `extra_width` inches for labels, legend or colour bar."""
    nq, nk = shape
    panel_w = min(max(1.6, nk * 5 / DPI), 3.0)
    panel_h = panel_w * nq / nk
    return 2.2 + extra_width + cols * (panel_w + 0.15), 0.9 + rows * (panel_h + 0.3)


def mask_grid(codes: list[list[np.ndarray]], row_labels: list[str], col_labels: list[str], *,
              title: str) -> matplotlib.figure.Figure:
    """Block masks `codes[row][col]` (int `(q_blocks, k_blocks)` from `mask_codes`, all the same
    shape) as a grid of panels in `MASK_COLOURS`, with a legend of the three states."""
    rows, cols = len(codes), max(len(r) for r in codes)
    fig = figure(*_panel_size(np.shape(codes[0][0]), rows, cols, 0.0))
    cmap = matplotlib.colors.ListedColormap(list(MASK_COLOURS.values()))
    axes = _panel_grid(fig, rows, cols, row_labels, col_labels)
    for i, row in enumerate(codes):
        for j, c in enumerate(row):
            axes[i, j].imshow(c, cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
    handles = [matplotlib.patches.Patch(facecolor=colour, edgecolor="black", label=name)
               for name, colour in MASK_COLOURS.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    _fit_title(fig, title)
    return fig


def heat_grid(maps: list[list[np.ndarray]], row_labels: list[str], col_labels: list[str], *, title: str,
              label: str, decades: int = 4) -> matplotlib.figure.Figure:
    """Non-negative `(q_blocks, k_blocks)` maps `maps[row][col]` (all the same shape), each divided by
    its own maximum, on one log colour scale over `decades` decades (smaller values take its lowest
    colour) with a colour bar titled `label`."""
    rows, cols = len(maps), max(len(r) for r in maps)
    fig = figure(*_panel_size(np.shape(maps[0][0]), rows, cols, 0.9))
    norm = matplotlib.colors.LogNorm(vmin=10.0 ** -decades, vmax=1.0)
    axes = _panel_grid(fig, rows, cols, row_labels, col_labels)
    for i, row in enumerate(maps):
        for j, m in enumerate(row):
            m = np.asarray(m, np.float64)
            relative = np.maximum(m / max(m.max(), 1e-30), 10.0 ** -decades)
            image = axes[i, j].imshow(relative, cmap="viridis", norm=norm, interpolation="nearest")
    fig.colorbar(image, ax=axes, label=label)
    _fit_title(fig, title)
    return fig


def line_chart(series: dict[str, tuple[list[float], list[float]]], *, x_label: str, y_label: str, title: str,
               x_range: tuple[float, float] = (0.0, 1.0),
               y_range: tuple[float, float] | None = None) -> matplotlib.figure.Figure:
    """One line with square markers per series `{name: (xs, ys)}`, labelled axes, a grid and a
    legend beside the plot. y_range None: from 0 to 5 % above the largest y."""
    fig = figure(6.4, 4.2)
    ax = fig.add_subplot()
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, "s-", markersize=4, label=name)
    ys_all = [y for _, ys in series.values() for y in ys]
    ax.set_xlim(*x_range)
    ax.set_ylim(*(y_range if y_range is not None else (0.0, max(ys_all) * 1.05 if ys_all else 1.0)))
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    _fit_title(fig, title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    return fig

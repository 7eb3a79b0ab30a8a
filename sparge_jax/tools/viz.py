"""Pictures without plotting libraries: PNG writer, colour maps, 3x5 bitmap text, mask grids, line charts.

Images are uint8 `(height, width, 3)` RGB arrays.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

_GLYPHS = {  # 3x5 bitmaps, rows top to bottom
    "0": "### #.# #.# #.# ###", "1": ".#. ##. .#. .#. ###", "2": "### ..# ### #.. ###", "3": "### ..# ### ..# ###",
    "4": "#.# #.# ### ..# ..#", "5": "### #.. ### ..# ###", "6": "### #.. ### #.# ###", "7": "### ..# ..# ..# ..#",
    "8": "### #.# ### #.# ###", "9": "### #.# ### ..# ###", "A": ".#. #.# ### #.# #.#", "B": "##. #.# ##. #.# ##.",
    "C": "### #.. #.. #.. ###", "D": "##. #.# #.# #.# ##.", "E": "### #.. ### #.. ###", "F": "### #.. ### #.. #..",
    "G": "### #.. #.# #.# ###", "H": "#.# #.# ### #.# #.#", "I": "### .#. .#. .#. ###", "J": "..# ..# ..# #.# ###",
    "K": "#.# #.# ##. #.# #.#", "L": "#.. #.. #.. #.. ###", "M": "#.# ### ### #.# #.#", "N": "##. #.# #.# #.# #.#",
    "O": "### #.# #.# #.# ###", "P": "### #.# ### #.. #..", "Q": "### #.# #.# ### ..#", "R": "### #.# ##. #.# #.#",
    "S": "### #.. ### ..# ###", "T": "### .#. .#. .#. .#.", "U": "#.# #.# #.# #.# ###", "V": "#.# #.# #.# #.# .#.",
    "W": "#.# #.# ### ### #.#", "X": "#.# #.# .#. #.# #.#", "Y": "#.# #.# .#. .#. .#.", "Z": "### ..# .#. #.. ###",
    ".": "... ... ... ... .#.", "-": "... ... ### ... ...", "%": "#.. ..# .#. #.. ..#", "/": "..# ..# .#. #.. #..",
    ":": "... .#. ... .#. ...", " ": "... ... ... ... ...", "(": ".#. #.. #.. #.. .#.", ")": ".#. ..# ..# ..# .#.",
    "=": "... ### ... ### ...", "+": "... .#. ### .#. ...", "_": "... ... ... ... ###", ",": "... ... ... .#. #..",
}

# anchors of a perceptually ordered dark-blue -> green -> yellow map
_CMAP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def write_png(path, image: np.ndarray) -> None:
    """Write uint8 `(h, w, 3)` RGB or `(h, w)` grey as an 8-bit PNG."""
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"image must be uint8 of shape (h, w) or (h, w, 3); got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    colour = 2 if img.ndim == 3 else 0
    raw = b"".join(b"\x00" + img[row].tobytes() for row in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                           + chunk(b"IEND", b""))


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped) -> uint8 RGB `(..., 3)`."""
    v = np.clip(np.asarray(values, np.float64), 0.0, 1.0) * (len(_CMAP) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_CMAP) - 2)
    t = (v - lo)[..., None]
    return np.round(_CMAP[lo] * (1 - t) + _CMAP[lo + 1] * t).astype(np.uint8)


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement by an integer factor."""
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def mask_tile(mask: np.ndarray, cell: int = 2) -> np.ndarray:
    """Bool `(q_blocks, k_blocks)` -> RGB, kept blocks dark, skipped blocks light."""
    m = np.asarray(mask, bool)
    img = np.where(m[..., None], np.uint8(30), np.uint8(235)).repeat(3, axis=-1)
    return upscale(img.astype(np.uint8), cell)


def heat_tile(values: np.ndarray, cell: int = 2, *, log: bool = True) -> np.ndarray:
    """Non-negative `(rows, cols)` map (e.g. pooled attention) -> RGB, normalised to its own max
    (on a log scale over 4 decades when `log`)."""
    v = np.asarray(values, np.float64)
    v = v / max(v.max(), 1e-30)
    if log:
        v = 1.0 + np.log10(np.maximum(v, 1e-4)) / 4.0
    return upscale(colormap(v), cell)


def text_width(text: str, scale: int = 2) -> int:
    return len(text) * 4 * scale


def draw_text(canvas: np.ndarray, x: int, y: int, text: str, color=(0, 0, 0), scale: int = 2) -> None:
    """Draw `text` (upper-cased; unknown characters as blanks) with its top-left corner at (x, y), in place."""
    for i, ch in enumerate(text.upper()):
        glyph = np.array([c == "#" for c in _GLYPHS.get(ch, _GLYPHS[" "]).replace(" ", "")]).reshape(5, 3)
        pix = upscale(glyph.astype(np.uint8), scale).astype(bool)
        x0 = x + i * 4 * scale
        region = canvas[y:y + pix.shape[0], x0:x0 + pix.shape[1]]
        region[pix[:region.shape[0], :region.shape[1]]] = color


def tile_grid(tiles: list[list[np.ndarray]], row_labels: list[str], col_labels: list[str],
              title: str = "", pad: int = 6) -> np.ndarray:
    """Tiles `[row][col]` (RGB, any sizes) on a white sheet with row/column labels and a title."""
    th = max(t.shape[0] for row in tiles for t in row)
    tw = max([t.shape[1] for row in tiles for t in row] + [text_width(c) + pad for c in col_labels])  # labels fit
    left = max([text_width(s) for s in row_labels] + [0]) + pad * 2
    top = (16 if title else 0) + 14 + pad
    cols = max(len(r) for r in tiles)
    width = max(left + cols * (tw + pad) + pad, text_width(title) + 2 * pad)  # the title fits
    sheet = np.full((top + len(tiles) * (th + pad) + pad, width, 3), 255, np.uint8)
    if title:
        draw_text(sheet, pad, pad, title)
    for j, label in enumerate(col_labels):
        draw_text(sheet, left + j * (tw + pad), top - 14, label)
    for i, row in enumerate(tiles):
        y = top + i * (th + pad)
        draw_text(sheet, pad, y + th // 2 - 5, row_labels[i])
        for j, tile in enumerate(row):
            x = left + j * (tw + pad)
            sheet[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
    return sheet


def colour_scale(height: int, labels: list[str], *, width: int = 14, pad: int = 6) -> np.ndarray:
    """RGB legend of `colormap`: a vertical bar `height` px tall running from colormap(1) at the
    top to colormap(0) at the bottom, with `labels` spaced evenly from top to bottom beside it
    (at least 14 px apart: the bar grows to make room)."""
    height = max(height, 14 * (len(labels) - 1) + 10)
    bar = np.repeat(colormap(np.linspace(1.0, 0.0, height))[:, None], width, axis=1)
    panel = np.full((height + 10, width + pad + max(text_width(t) for t in labels), 3), 255, np.uint8)
    panel[5:5 + height, :width] = bar
    for i, label in enumerate(labels):
        draw_text(panel, width + pad, round(i * (height - 1) / max(len(labels) - 1, 1)), label)
    return panel


def beside(left: np.ndarray, right: np.ndarray, *, top: int = 0, pad: int = 6) -> np.ndarray:
    """RGB `right` placed `pad` px to the right of `left`, `top` px down, on white."""
    h = max(left.shape[0], top + right.shape[0])
    sheet = np.full((h, left.shape[1] + pad + right.shape[1] + pad, 3), 255, np.uint8)
    sheet[:left.shape[0], :left.shape[1]] = left
    sheet[top:top + right.shape[0], left.shape[1] + pad:left.shape[1] + pad + right.shape[1]] = right
    return sheet


def _line(canvas, x0, y0, x1, y1, color, width=2):
    n = int(max(abs(x1 - x0), abs(y1 - y0), 1))
    xs = np.round(np.linspace(x0, x1, n + 1)).astype(int)
    ys = np.round(np.linspace(y0, y1, n + 1)).astype(int)
    for dx in range(width):
        for dy in range(width):
            yy, xx = np.clip(ys + dy, 0, canvas.shape[0] - 1), np.clip(xs + dx, 0, canvas.shape[1] - 1)
            canvas[yy, xx] = color


def line_chart(series: dict[str, tuple[list[float], list[float]]], *, x_label: str, y_label: str,
               title: str = "", size: tuple[int, int] = (640, 420), x_range=(0.0, 1.0),
               y_range: tuple[float, float] | None = None, ticks: int = 5) -> np.ndarray:
    """Lines with square markers, one per series, labelled axes and a legend. Returns RGB."""
    w, h = size
    left, right, top, bottom = 70, 170, 50, 50
    canvas = np.full((h, w, 3), 255, np.uint8)
    ys_all = [y for _, ys in series.values() for y in ys]
    y_lo, y_hi = y_range if y_range is not None else (0.0, max(ys_all) * 1.05 if ys_all else 1.0)
    px = lambda x: left + (x - x_range[0]) / (x_range[1] - x_range[0]) * (w - left - right)
    py = lambda y: h - bottom - (y - y_lo) / (y_hi - y_lo) * (h - top - bottom)
    grey, black = (200, 200, 200), (0, 0, 0)
    for i in range(ticks + 1):
        xv = x_range[0] + i * (x_range[1] - x_range[0]) / ticks
        yv = y_lo + i * (y_hi - y_lo) / ticks
        _line(canvas, px(xv), top, px(xv), h - bottom, grey, 1)
        _line(canvas, left, py(yv), w - right, py(yv), grey, 1)
        xt, yt = f"{xv:.2f}", f"{yv:.3g}"
        draw_text(canvas, int(px(xv)) - text_width(xt) // 2, h - bottom + 6, xt)
        draw_text(canvas, left - text_width(yt) - 6, int(py(yv)) - 5, yt)
    _line(canvas, left, h - bottom, w - right, h - bottom, black)
    _line(canvas, left, top, left, h - bottom, black)
    draw_text(canvas, left + (w - left - right - text_width(x_label)) // 2, h - 22, x_label)
    draw_text(canvas, 6, top - 18, y_label)
    if title:
        draw_text(canvas, left + (w - left - right - text_width(title)) // 2, 6, title)
    for n, (name, (xs, ys)) in enumerate(series.items()):
        color = PALETTE[n % len(PALETTE)]
        pts = [(px(x), py(min(max(y, y_lo), y_hi))) for x, y in zip(xs, ys)]
        for (a, b), (c, d) in zip(pts, pts[1:]):
            _line(canvas, a, b, c, d, color)
        for a, b in pts:
            canvas[int(b) - 3:int(b) + 4, int(a) - 3:int(a) + 4] = color
        ly = top + 6 + n * 18
        canvas[ly:ly + 10, w - right + 12:w - right + 26] = color
        draw_text(canvas, w - right + 32, ly, name)
    return canvas

"""Procedural video clips with captions: a seeded, download-free data set with real structure.

Each clip shows 1..`max_shapes` shapes (circle, square, triangle, diamond) in six colours that
move in one of eight directions, bounce off the frame edges, grow, shrink or keep their size,
and occlude each other (later slots are in front), over a textured background that pans.
Sizes and speeds are in pixels, so a small clip looks like a crop of a large one (a model
trained at one size sees the same local statistics at another). `motion_scale` multiplies every
speed (shapes and background pan): 1 is the teacher's data; another value gives clips of the
same kinds whose motion the teacher never saw (a shifted fine-tuning set, docs/quality.md).
`size_scale` multiplies every shape's radius (9-18 pixels at 1, before growing or shrinking):
larger shapes span more of the 8 x 8-pixel tokens a teacher draws with (docs/teacher.md).
`shape_kind` makes every shape that one kind (the captions still name it; every other attribute is
drawn as with all four kinds): clips on which a teacher need not read the shape word to draw the outline.

The caption lists, per shape slot, (colour, shape, direction, size change), then the
background's pan direction; with `start_region` each slot also names the ninth of the frame
where its shape starts (a 3 x 3 grid: "top-left" ... "bottom-right"), after its shape. Each
word is a fixed random embedding plus a slot embedding, giving a text context
`(text_len, text_dim)` the model cross-attends to. With probability `cfg_dropout` (decided per
training clip) the context is all zeros: the unconditional input of
classifier-free guidance (`sparge_jax.tools.sample` also uses zeros as the default negative).
Held-out clips always keep their caption: evaluations and samples are conditional, and guidance
supplies the unconditional branch itself. (Until 2026-12-02 held-out clips were dropped at the
same rate: 1 of the demo's 4 held-out clips and 10 of the quality study's 64 were unconditional.)

Clips map to latents without a VAE: RGB in [-1, 1], `(frames, height, width, 3)`, folded by a
fixed space-to-depth of `s x s` pixels into `(frames, height / s, width / s, 3 s^2)`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

COLOURS = {"red": (0.9, 0.15, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95),
           "yellow": (0.95, 0.85, 0.1), "magenta": (0.85, 0.15, 0.85), "white": (0.95, 0.95, 0.95)}
SHAPES = ("circle", "square", "triangle", "diamond")
DIRECTIONS = ("east", "north-east", "north", "north-west", "west", "south-west", "south", "south-east")
SIZE_CHANGES = {"steady": 0.0, "growing": 0.6, "shrinking": -0.45}
REGIONS = ("top-left", "top", "top-right", "left", "centre", "right", "bottom-left", "bottom", "bottom-right")
# region words come last, so every other word keeps the id (and embedding) it had before they existed
VOCAB = ("none", *COLOURS, *SHAPES, *DIRECTIONS, *SIZE_CHANGES, *REGIONS)
EMBEDDING_SEED = 20261201  # fixed: a word means the same in every data set
SPLITS = {"train": 0, "heldout": 1}


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """frames, height, width: clip size in pixels (height, width multiples of space_to_depth);
    max_shapes: shape slots per clip; text_dim: width of the context; cfg_dropout: probability
    that a clip's context is zeros; motion_scale: factor on every speed (the shapes' and the
    background pan's; the other attributes of a clip do not depend on it); size_scale: factor on
    every shape's radius (nothing else of a clip depends on it); shape_kind: None (every kind of
    `SHAPES`) or one of them, the kind of every shape (nothing else of a clip depends on it);
    start_region: the caption also names each shape's start region (five words a shape instead of four)."""

    frames: int = 16
    height: int = 128
    width: int = 128
    space_to_depth: int = 4
    max_shapes: int = 3
    text_dim: int = 64
    cfg_dropout: float = 0.1
    motion_scale: float = 1.0
    size_scale: float = 1.0
    shape_kind: str | None = None
    start_region: bool = False

    def __post_init__(self):
        for name in ("frames", "height", "width", "space_to_depth", "max_shapes", "text_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        s = self.space_to_depth
        if self.height % s or self.width % s:
            raise ValueError(f"height ({self.height}) and width ({self.width}) must be multiples of "
                             f"space_to_depth ({s})")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must lie in [0, 1); got {self.cfg_dropout!r}")
        for name in ("motion_scale", "size_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)!r}")
        if self.shape_kind is not None and self.shape_kind not in SHAPES:
            raise ValueError(f"shape_kind must be None or one of {SHAPES}; got {self.shape_kind!r}")
        if not isinstance(self.start_region, bool):
            raise ValueError(f"start_region must be true or false; got {self.start_region!r}")

    @property
    def words_per_shape(self) -> int:
        return 5 if self.start_region else 4

    @property
    def text_len(self) -> int:
        """Caption words, padded with "none" to a multiple of 16 (cuDNN attention needs it)."""
        return -(-(self.words_per_shape * self.max_shapes + 1) // 16) * 16

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        s = self.space_to_depth
        return (self.frames, self.height // s, self.width // s, 3 * s * s)


def space_to_depth(video: jax.Array, s: int) -> jax.Array:
    """`(..., F, H, W, C)` -> `(..., F, H/s, W/s, s*s*C)` (channel order: row offset, column offset, C)."""
    *lead, f, h, w, c = video.shape
    x = video.reshape(*lead, f, h // s, s, w // s, s, c)
    x = jnp.moveaxis(x, -4, -3)  # (..., f, h/s, w/s, s_row, s_col, c)
    return x.reshape(*lead, f, h // s, w // s, s * s * c)


def depth_to_space(latents, s: int):
    """Inverse of `space_to_depth`: `(..., F, h, w, s*s*C)` -> `(..., F, h*s, w*s, C)` (NumPy or jnp)."""
    xp = jnp if isinstance(latents, jax.Array) else np
    *lead, f, h, w, cs = latents.shape
    c = cs // (s * s)
    x = latents.reshape(*lead, f, h, w, s, s, c)
    x = xp.moveaxis(x, -3, -4)  # (..., f, h, s_row, w, s_col, c)
    return x.reshape(*lead, f, h * s, w * s, c)


def latents_to_rgb(latents, s: int) -> np.ndarray:
    """Latents -> uint8 RGB frames `(..., F, H, W, 3)` (values clipped to [-1, 1])."""
    video = depth_to_space(np.asarray(latents, np.float32), s)
    return np.round((np.clip(video, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def word_embeddings(text_dim: int, max_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed word table `(len(VOCAB), text_dim)` and slot table `(max_slots, text_dim)`, float32.
    The region words are drawn from a stream of their own, after the others: the other words and
    the slots are what they were before region words existed (the shipped teacher's captions)."""
    gen = np.random.default_rng(EMBEDDING_SEED)
    words = gen.standard_normal((len(VOCAB) - len(REGIONS), text_dim)).astype(np.float32)
    slots = 0.5 * gen.standard_normal((max_slots, text_dim)).astype(np.float32)
    regions = np.random.default_rng([EMBEDDING_SEED, 1]).standard_normal((len(REGIONS), text_dim))
    return np.concatenate([words, regions.astype(np.float32)]), slots


def heading(direction) -> np.ndarray:
    """Unit vectors `(..., 2)` float64 (x, y; y grows downwards) of `DIRECTIONS` indices
    `direction` (int or int array): 45 degrees apart from east, counter-clockwise."""
    angle = np.asarray(direction) * (np.pi / 4)
    return np.stack([np.cos(angle), -np.sin(angle)], -1)


def draw_attributes(spec: ClipSpec, seed: int, split: str, index: int) -> dict:
    """The random attributes of one clip (a dict of NumPy arrays), from (seed, split, index)."""
    gen = np.random.default_rng([seed, SPLITS[split], index])
    m = spec.max_shapes
    present = np.arange(m) < gen.integers(1, m + 1)
    direction = gen.integers(0, len(DIRECTIONS), m)
    speed = gen.uniform(1.5, 4.0, m) * spec.motion_scale  # pixels per frame
    change = gen.integers(0, len(SIZE_CHANGES), m)
    pan = gen.integers(0, len(DIRECTIONS))
    shape = gen.integers(0, len(SHAPES), m)
    if spec.shape_kind is not None:
        shape = np.full(m, SHAPES.index(spec.shape_kind))
    return {
        "present": present,
        "shape": shape,
        "colour": gen.integers(0, len(COLOURS), m),
        "direction": direction,
        "change": change,
        "position": gen.uniform(0.15, 0.85, (m, 2)) * np.array([spec.width, spec.height]),  # (x, y) px
        "velocity": heading(direction) * speed[:, None],
        "radius": gen.uniform(9.0, 18.0, m) * spec.size_scale,
        "growth": np.array(list(SIZE_CHANGES.values()))[change],
        "pan_direction": pan,
        "pan_velocity": heading(pan) * gen.uniform(0.5, 2.0) * spec.motion_scale,
        "texture_freq": gen.uniform(-0.07, 0.07, (3, 2)),  # cycles per pixel
        "texture_phase": gen.uniform(0, 2 * np.pi, 3),
        "tint": gen.uniform(0.25, 0.6, 3),
        # drawn in both splits, so the other attributes of a clip do not depend on its split's rule
        "dropped": bool(gen.uniform() < spec.cfg_dropout) and split == "train",
    }


def start_regions(attrs: dict, spec: ClipSpec) -> np.ndarray:
    """Index into `REGIONS` `(max_shapes,)` int of each slot's start position: the frame's
    start-position range (15-85 % of its width and height) cut into thirds along each axis."""
    fraction = attrs["position"] / np.array([spec.width, spec.height])
    column, row = np.clip(((fraction - 0.15) / 0.7 * 3).astype(int), 0, 2).T
    return 3 * row + column


def caption(attrs: dict, spec: ClipSpec) -> str:
    """Human-readable caption of one clip's attributes."""
    regions = start_regions(attrs, spec)
    parts = [f"a {list(COLOURS)[c]} {SHAPES[s]}" + (f" starting {REGIONS[r]}" if spec.start_region else "")
             + f" moving {DIRECTIONS[d]}, {list(SIZE_CHANGES)[g]}"
             for p, s, c, r, d, g in zip(attrs["present"], attrs["shape"], attrs["colour"], regions,
                                         attrs["direction"], attrs["change"]) if p]
    return "; ".join(parts) + f"; background panning {DIRECTIONS[int(attrs['pan_direction'])]}"


def caption_tokens(attrs: dict, spec: ClipSpec) -> np.ndarray:
    """Word ids `(spec.words_per_shape * max_shapes + 1,)` int: per slot (colour, shape, [start
    region,] direction, size change) or "none"s, then the background pan direction."""
    colour0, shape0, region0 = VOCAB.index(next(iter(COLOURS))), VOCAB.index(SHAPES[0]), VOCAB.index(REGIONS[0])
    direction0, change0 = VOCAB.index(DIRECTIONS[0]), VOCAB.index(next(iter(SIZE_CHANGES)))
    ids = []
    for p, s, c, r, d, g in zip(attrs["present"], attrs["shape"], attrs["colour"], start_regions(attrs, spec),
                                attrs["direction"], attrs["change"]):
        words = [colour0 + c, shape0 + s] + ([region0 + r] if spec.start_region else []) + [direction0 + d, change0 + g]
        ids += words if p else [0] * spec.words_per_shape
    return np.array(ids + [direction0 + int(attrs["pan_direction"])])


def context_tensor(attrs: dict, spec: ClipSpec) -> np.ndarray:
    """The caption as a text context float32 `(text_len, text_dim)` (zeros when dropped)."""
    if attrs["dropped"]:
        return np.zeros((spec.text_len, spec.text_dim), np.float32)
    words, slots = word_embeddings(spec.text_dim, spec.text_len)
    tokens = caption_tokens(attrs, spec)
    return words[np.pad(tokens, (0, spec.text_len - len(tokens)))] + slots


def _bounce(start, velocity, t, low, high):
    """Position at frame t moving from `start` with `velocity`, reflected at low and high."""
    span = jnp.maximum(high - low, 1e-3)
    q = jnp.mod(start - low + velocity * t, 2 * span)
    return low + jnp.where(q > span, 2 * span - q, q)


def signed_distance(kind, dx, dy, xp=jnp):
    """Distance (in radii) outside the shape centred at 0 with radius 1; < 0 inside. xp: the
    array module, `jax.numpy` (rendering) or `numpy` (host read-outs, without a device call per use)."""
    circle = xp.sqrt(dx * dx + dy * dy) - 1.0
    square = xp.maximum(xp.abs(dx), xp.abs(dy)) - 0.85
    triangle = xp.maximum(xp.abs(dx) * 0.866 + dy * 0.5, -dy) - 0.55
    diamond = (xp.abs(dx) + xp.abs(dy)) / 1.2 - 1.0
    return xp.select([kind == 0, kind == 1, kind == 2], [circle, square, triangle], diamond)


@functools.partial(jax.jit, static_argnames=("frames", "height", "width"))
def render(attrs: dict, *, frames: int, height: int, width: int) -> jax.Array:
    """RGB clips float32 `(batch, frames, height, width, 3)` in [-1, 1] from stacked attributes
    (`draw_attributes` of each clip, stacked along a new first axis). Compiled once per size and
    batch: op by op, a training batch of the teacher's clips took twice as long on the CPU."""
    colours = jnp.asarray(np.array(list(COLOURS.values()), np.float32))
    t = jnp.arange(frames, dtype=jnp.float32)[:, None, None]
    y = jnp.arange(height, dtype=jnp.float32)[None, :, None] + 0.5
    x = jnp.arange(width, dtype=jnp.float32)[None, None, :] + 0.5

    def one(a):
        ox, oy = x + a["pan_velocity"][0] * t, y + a["pan_velocity"][1] * t
        waves = [jnp.sin(2 * jnp.pi * (f[0] * ox + f[1] * oy) + phase)
                 for f, phase in zip(a["texture_freq"], a["texture_phase"])]
        texture = 0.5 + 0.5 * (waves[0] * waves[1] + waves[2]) / 2
        image = 0.08 + 0.5 * texture[..., None] * a["tint"]
        for slot in range(a["present"].shape[0]):
            radius = a["radius"][slot] * (1.0 + a["growth"][slot] * t / max(frames - 1, 1))
            cx = _bounce(a["position"][slot, 0], a["velocity"][slot, 0], t, radius, width - radius)
            cy = _bounce(a["position"][slot, 1], a["velocity"][slot, 1], t, radius, height - radius)
            d = signed_distance(a["shape"][slot], (x - cx) / radius, (y - cy) / radius)
            alpha = jnp.clip(0.5 - d * radius, 0.0, 1.0) * a["present"][slot]
            image = image * (1 - alpha[..., None]) + alpha[..., None] * colours[a["colour"][slot]]
        return image * 2.0 - 1.0

    return jax.vmap(one)(attrs)


def render_attributes(attrs: list[dict], spec: ClipSpec, device: jax.Device | None = None) -> jax.Array:
    """RGB clips float32 `(len(attrs), frames, height, width, 3)` in [-1, 1] of `spec`'s size from
    each clip's `draw_attributes` (stacked), rendered on `device` (default: the default device)."""
    stacked = {name: np.stack([a[name] for a in attrs]) for name in attrs[0] if name != "dropped"}
    return render(jax.device_put(stacked, device), frames=spec.frames, height=spec.height, width=spec.width)


def render_latents(attrs: list[dict], spec: ClipSpec, device: jax.Device | None = None) -> jax.Array:
    """The clips of `attrs` as the model sees them: float32 latents `(len(attrs), *spec.latent_shape)`
    (`render_attributes`, then `space_to_depth`), on `device` (default: the default device). Compare
    model outputs with these, not with the rendered pixels, whose flattened order differs."""
    return space_to_depth(render_attributes(attrs, spec, device), spec.space_to_depth)


def host_device() -> jax.Device:
    """This process's first CPU device; the default device when JAX runs without a CPU backend
    (`JAX_PLATFORMS=cuda`)."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return jax.local_devices()[0]


class ProceduralClips:
    """`ExampleSource` of procedural clips: example i is drawn from (seed, split, i).

    `read(indices)` -> {"latents": `(n, *spec.latent_shape)`, "context": `(n, text_len,
    text_dim)`} float32 NumPy. split: "train" or "heldout" (disjoint random streams).
    The clips are rendered on the host CPU (`host_device`), also where an accelerator is the
    default device: host data that does not wait behind the training step on the
    accelerator's stream. `render_on="accelerator"` renders them on this process's first
    default device instead, for hosts whose cores render a batch slower than the accelerator
    steps; the latents then stay there, a float32 jax Array (also where that device is the
    CPU): no copy to the host and back, and `read` only queues the rendering.
    """

    def __init__(self, spec: ClipSpec, num_examples: int, seed: int = 0, split: str = "train",
                 render_on: str = "host"):
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive; got {num_examples}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}; got {split!r}")
        if render_on not in ("host", "accelerator"):
            raise ValueError(f"render_on must be 'host' or 'accelerator'; got {render_on!r}")
        self.render_on = render_on
        self.device = host_device() if render_on == "host" else jax.local_devices()[0]
        self.spec, self.num_examples, self.seed, self.split = spec, num_examples, seed, split
        self.shapes = {"latents": spec.latent_shape, "context": (spec.text_len, spec.text_dim)}

    def __len__(self) -> int:
        return self.num_examples

    def describe(self, index: int) -> str:
        return f"procedural clip {index} ({self.split} split, seed {self.seed})"

    def attributes(self, indices) -> list[dict]:
        return [draw_attributes(self.spec, self.seed, self.split, int(i)) for i in indices]

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray | jax.Array]:
        attrs = self.attributes(indices)
        s = self.spec
        latents = render_latents(attrs, s, self.device)
        if self.render_on == "host":
            latents = np.asarray(latents, np.float32)
        context = np.stack([context_tensor(a, s) for a in attrs])
        return {"latents": latents, "context": context}


def clip_spec(settings, text_dim: int, in_dim: int) -> ClipSpec:
    """The `ClipSpec` of `train.config.ProceduralSettings` for a model with `text_dim` and
    `in_dim` latent channels (which must be 3 * space_to_depth^2)."""
    spec = ClipSpec(frames=settings.frames, height=settings.height, width=settings.width,
                    space_to_depth=settings.space_to_depth, max_shapes=settings.max_shapes, text_dim=text_dim,
                    cfg_dropout=settings.cfg_dropout, motion_scale=settings.motion_scale,
                    size_scale=settings.size_scale, shape_kind=settings.shape_kind,
                    start_region=settings.start_region)
    if spec.latent_shape[-1] != in_dim:
        raise ValueError(f"procedural clips have {spec.latent_shape[-1]} latent channels (3 * space_to_depth^2); "
                         f"the model expects in_dim {in_dim}")
    return spec

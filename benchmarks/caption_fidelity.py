"""How much of its caption does a teacher's sample show? (CPU: 30-33 minutes on 2 cores at the defaults with the
shipped teacher, 6.5 GB resident, ~18 minutes with the previous one; about a minute on an H200 with 32 clips; the clips
are sampled in one batch: the wide teacher takes 47 s a dense forward at batch 8 on 2 cores, so 12 clips under
guidance, batch 24, run over 40 minutes there: read wide teachers on a GPU)

    python benchmarks/caption_fidelity.py [--clips 16] [--shapes 1] [--steps 20] [--guidance 4] [--trajectory]
        [--weights train/teacher] [--config train/configs/teacher.json] [--out OUT] [key=value ...]

Samples the first `--clips` held-out captions (seed 1) that name `--shapes` shapes (default 1; more: each of a
colour of its own), from fixed noise (UniPC, `--steps` shifted steps, `--guidance`), and reads each attribute the
caption names of each shape back from the pixels of that shape's colour (`caption_following.colour_mask`), the same
way for the clips rendered from those attributes (whose score is the read-out's own error, e.g. a shape that
bounces within the frames its course is read from, or, with several shapes, one hidden or cut in two by another):

- colour: in frame 0 the colour covers at least a quarter of the rendered shape's area;
- one object: in frame 0 the largest connected part holds at least 90 % of the colour's pixels;
- shape: of the four kinds' silhouettes, centred on the mask's centroid with the mask's area,
  the one that overlaps the mask most (IoU), by a majority of the frames;
- direction: the nearest of the eight directions to the centroid's least-squares velocity over
  the first 6 frames (`caption_following.course`); that velocity's component along the caption's
  direction is also averaged, in pixels a frame ("speed along the caption"): a clip that keeps
  its shape still reads 0 there, a wrong direction reads low or negative;
- size change: the mask's area in the last frame over the first, > 1.5 growing, < 0.67
  shrinking, else steady (rendered: 2.56 and 0.30);
- start region (captions with `data.procedural.start_region`): the 3 x 3 region of the centroid
  in frame 0.

Attributes after "colour" are scored on the shapes whose colour is found (a sample without
it scores none of them). Prints, per attribute, right / read over the shapes for the rendered and sampled clips
and chance (with several shapes also the clips where every shape's colour is found and its kind read right); `--out` also saves the frames (npz). `--trajectory` also reads, at each sampler
step, the clean clip the step starts from (x0 = x - sigma v, guided): a table of steps, with how
many clips show the colour and right / read of each attribute, says at which noise levels the
sample commits to each attribute and whether it is the caption's then.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from caption_following import captioned_attributes, centroids, colour_mask, course, parse_sampling_args
from skimage.measure import label
from token_grid import teacher_velocity

from train.generate import generate
from train.procedural import (COLOURS, DIRECTIONS, SHAPES, SIZE_CHANGES, context_tensor, depth_to_space,
                              heading, render_attributes, signed_distance, start_regions)

MIN_PIXELS = 20  # frames with fewer pixels of the colour are not read
CHANCE = {"colour": None, "one object": None, "shape": 1 / len(SHAPES), "direction": 1 / len(DIRECTIONS),
          "size change": 1 / len(SIZE_CHANGES), "start region": 1 / 9}


def silhouettes(grid: int = 201) -> list[tuple[float, float, float]]:
    """Per kind of `SHAPES`: (area, centroid x, centroid y) of its silhouette at radius 1, on a
    grid of `grid`^2 points over [-1.5, 1.5]^2 (the triangle's centroid is not its centre)."""
    axis = np.linspace(-1.5, 1.5, grid)
    dy, dx = np.meshgrid(axis, axis, indexing="ij")
    cell = (axis[1] - axis[0]) ** 2
    out = []
    for kind in range(len(SHAPES)):
        inside = signed_distance(kind, dx, dy, xp=np) < 0
        out.append((inside.sum() * cell, dx[inside].mean(), dy[inside].mean()))
    return out


def classify_shapes(masks: np.ndarray, templates) -> np.ndarray:
    """Per frame of `masks` bool `(F, H, W)` (none empty), the kind (index of `SHAPES`) whose
    silhouette, with the frame's mask area and its centroid on the mask's, overlaps the mask most
    (intersection over union; the first kind on a tie), int `(F,)`. NumPy, float64."""
    counts, cx, cy = (a[:, None, None] for a in centroids(masks))
    ys, xs = np.mgrid[: masks.shape[1], : masks.shape[2]] + 0.5
    ious = []
    for k, (area, ox, oy) in enumerate(templates):
        radius = np.sqrt(counts / area)
        inside = signed_distance(k, (xs - cx) / radius + ox, (ys - cy) / radius + oy, xp=np) < 0
        ious.append((inside & masks).sum(axis=(1, 2)) / (inside | masks).sum(axis=(1, 2)))
    return np.argmax(np.stack(ious, axis=-1), axis=-1)


def read_attributes(video: np.ndarray, colour, reference_area: float, spec, templates) -> dict:
    """What one clip `(F, H, W, 3)` in [-1, 1] shows of a shape of `colour`: {"colour": bool,
    and when found, "one object", "shape", "direction", "size change", "start region" (ints
    indexing their tables), "velocity" (the centroid's (x, y) pixels a frame, y downwards)};
    `reference_area`: the rendered shape's pixels in frame 0."""
    mask = colour_mask(video, colour)
    counts, xs, ys = centroids(mask)
    read = {"colour": bool(counts[0] >= 0.25 * reference_area)}
    if not read["colour"]:
        return read
    parts = label(mask[0], connectivity=2)
    read["one object"] = bool(np.bincount(parts.ravel())[1:].max() >= 0.9 * counts[0])
    kinds = classify_shapes(mask[counts >= MIN_PIXELS], templates)
    read["shape"] = int(np.bincount(kinds, minlength=len(SHAPES)).argmax())
    vx, vy = course(mask, min_pixels=MIN_PIXELS)
    if not np.isnan(vx):
        read["direction"] = int(np.round(np.arctan2(-vy, vx) / (np.pi / 4))) % len(DIRECTIONS)  # y grows downwards
        read["velocity"] = (vx, vy)
    ratio = counts[-1] / counts[0]
    read["size change"] = list(SIZE_CHANGES).index("growing" if ratio > 1.5 else "shrinking" if ratio < 0.67 else "steady")
    if spec.start_region:
        position = np.array([[xs[0], ys[0]]])
        read["start region"] = int(start_regions({"position": position}, spec)[0])
    return read


def truth(attrs: dict, spec, slot: int = 0) -> dict:
    """The caption's attributes of the shape in `slot`, keyed as `read_attributes`."""
    out = {"colour": True, "one object": True, "shape": int(attrs["shape"][slot]),
           "direction": int(attrs["direction"][slot]), "size change": int(attrs["change"][slot])}
    if spec.start_region:
        out["start region"] = int(start_regions(attrs, spec)[slot])
    return out


def score(reads: list[dict], truths: list[dict]) -> dict[str, tuple[int, int]]:
    """{attribute: (right, read)} over clips; an attribute a clip's read-out lacks is not counted."""
    out = {}
    for name in truths[0]:
        pairs = [(r[name], t[name]) for r, t in zip(reads, truths) if name in r]
        out[name] = (sum(a == b for a, b in pairs), len(pairs))
    return out


def speed_along_caption(reads: list[dict], truths: list[dict]) -> tuple[float, int]:
    """(mean over clips of the read velocity's component along the caption's direction, pixels a
    frame; clips with a velocity read). NaN when none has one."""
    along = [float(np.dot(r["velocity"], heading(t["direction"]))) for r, t in zip(reads, truths) if "velocity" in r]
    return (float(np.mean(along)) if along else float("nan")), len(along)


def whole_captions(reads: list[list[dict]], truths: list[list[dict]]) -> int:
    """Clips (per clip, one read and one truth per shape) where every shape's colour is found and read as the
    caption's kind of shape."""
    return sum(all(r["colour"] and r.get("shape") == t["shape"] for r, t in zip(clip_reads, clip_truths))
               for clip_reads, clip_truths in zip(reads, truths))


def main(argv=None) -> dict:
    args, cfg, spec = parse_sampling_args(argv, __doc__, clips=16, options={
        "--trajectory": {"action": "store_true", "help": "also read the clean prediction each sampler step starts from"},
        "--shapes": {"type": int, "default": 1, "help": "captions naming this many shapes, each of its own colour"}})
    attrs = captioned_attributes(spec, args.clips, args.shapes)
    rendered = np.asarray(render_attributes(attrs, spec))
    context = jnp.asarray(np.stack([context_tensor(a, spec) for a in attrs]))
    templates = silhouettes()
    palette = list(COLOURS.values())
    colours = [[palette[int(c)] for c in a["colour"][:args.shapes]] for a in attrs]  # per clip, per shape
    areas = [[float(colour_mask(clip[:1], colour).sum()) for colour in clip_colours]
             for clip, clip_colours in zip(rendered, colours)]
    by_clip = [[truth(a, spec, slot) for slot in range(args.shapes)] for a in attrs]
    flat = lambda nested: [item for clip in nested for item in clip]  # per shape, clip after clip
    truths = flat(by_clip)

    def read_clips(videos) -> list[list[dict]]:
        return [[read_attributes(v, c, a, spec, templates) for c, a in zip(clip_colours, clip_areas)]
                for v, clip_colours, clip_areas in zip(videos, colours, areas)]

    trajectory = []  # (step, sigma, reads of the clean prediction the step starts from)

    def record(i, sigma, x0):
        trajectory.append((i, sigma, flat(read_clips(np.asarray(depth_to_space(x0, spec.space_to_depth))))))

    velocity, params = teacher_velocity(cfg.model)
    noise = jax.random.normal(jax.random.key(0), (args.clips, *spec.latent_shape), jnp.float32)
    latents = generate(velocity, params, noise, context, steps=args.steps, shift=cfg.objective.shift,
                       guidance=args.guidance, on_prediction=record if args.trajectory else None)
    sampled = np.asarray(depth_to_space(latents, spec.space_to_depth))
    per_clip = {"rendered": read_clips(rendered), "sampled": read_clips(sampled)}
    reads = {name: flat(nested) for name, nested in per_clip.items()}
    scores = {name: score(r, truths) for name, r in reads.items()}
    whole = {name: whole_captions(r, by_clip) for name, r in per_clip.items()}
    print(f"{args.clips} held-out captions naming {args.shapes} shape(s), guidance {args.guidance:g}, {args.steps} "
          f"steps; right / read over the shapes (the attributes after colour are read where the colour is found):\n")
    print("| attribute | rendered | sampled | chance |")
    print("|---|---|---|---|")
    for name in truths[0]:
        cells = [f"{right} / {n}" for right, n in (scores["rendered"][name], scores["sampled"][name])]
        chance = "" if CHANCE[name] is None else f"{CHANCE[name]:.2f}"
        print(f"| {name} | {cells[0]} | {cells[1]} | {chance} |")
    speeds = {name: speed_along_caption(r, truths) for name, r in reads.items()}
    print("| speed along the caption, px a frame (clips) | "
          + " | ".join(f"{mean:.2f} ({n})" for mean, n in speeds.values()) + " | 0 |")
    if args.shapes > 1:
        print(f"| clips with every shape's colour found and kind right | {whole['rendered']} / {args.clips} | "
              f"{whole['sampled']} / {args.clips} | {CHANCE['shape'] ** args.shapes:.3f} |")
    steps = [{"step": i, "sigma": sigma, "scores": score(r, truths), "speed along caption": speed_along_caption(r, truths)}
             for i, sigma, r in trajectory]
    if steps:
        names = list(truths[0])
        print("\nThe clean prediction each step starts from (x0 = x - sigma v): clips showing the colour, then "
              "right / read\n")
        print(f"| step | sigma | {' | '.join(names)} | speed along the caption |")
        print("|---|---|" + "---|" * (len(names) + 1))
        for row in steps:
            cells = [f"{right} / {n}" for right, n in (row["scores"][name] for name in names)]
            print(f"| {row['step']} | {row['sigma']:.4f} | {' | '.join(cells)} | {row['speed along caption'][0]:.2f} |")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.out / "caption_fidelity.npz", rendered=rendered, sampled=sampled)
    return {"scores": scores, "speeds": speeds, "reads": reads, "truths": truths, "whole_captions": whole,
            "trajectory": steps}


if __name__ == "__main__":
    main()

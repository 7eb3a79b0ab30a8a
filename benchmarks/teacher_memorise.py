"""Can a teacher recipe memorise a few clips and draw them back? A positive control (CPU, ~8 minutes on 2 cores
at the defaults).

    python benchmarks/teacher_memorise.py [--config train/configs/teacher.json] [--clips 4]
        [--steps 1500] [--out DIR] [key=value ...]

Trains the recipe's model from scratch with its flow-matching objective on the first `--clips` training clips
alone (`data.procedural.examples` = `--clips`, a batch of all of them, captions never dropped, the raw
weights: no EMA), then samples those clips' own captions from fixed noise (UniPC 20 steps, guidance 1). Prints,
per clip, the RMSE of the sample against the clip it memorised and the shape read back from its colour's
pixels (`caption_fidelity.read_attributes`, for the rendered clip too). A recipe whose model cannot draw the
shapes of clips it saw hundreds of times will not draw them for new captions; one that can is limited by how
fast it learns, not by its code. `DEFAULTS` (a narrow model, float32, one still shape on 4 x 32 x 32 clips,
learning rate 1e-3) make it a CPU run; `key=value` overrides after them change any of it. `--out` saves
`memorised.png`: each clip's first frame over its sample's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from caption_fidelity import read_attributes, silhouettes
from caption_following import colour_mask
from PIL import Image

from train.config import load_config
from train.generate import generate, make_velocity
from train.loop import train
from train.model import DTYPES, abstract_model
from train.procedural import COLOURS, SHAPES, ProceduralClips, clip_spec, depth_to_space, latents_to_rgb

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = ("model.overrides.dim=128", "model.overrides.ffn_dim=512", "model.overrides.num_heads=2",
            "model.overrides.num_layers=4", "model.compute_dtype=float32", "data.procedural.frames=4",
            "data.procedural.height=32", "data.procedural.width=32", "data.procedural.size_scale=0.75",
            "data.procedural.max_shapes=1", "data.procedural.motion_scale=0.01", "data.procedural.cfg_dropout=0.0",
            "optim.lr=1e-3", "optim.warmup_steps=20", "optim.ema_decay=null", "eval_every=1000000", "log_every=100")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "train" / "configs" / "teacher.json")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.clips < 1 or args.steps < 1:
        parser.error(f"--clips and --steps must be >= 1; got {args.clips} and {args.steps}")
    cfg = load_config(args.config, [*DEFAULTS, f"data.procedural.examples={args.clips}",
                                    f"data.batch_size={args.clips}", f"steps={args.steps}", *args.overrides])
    result = train(cfg, progress=False)
    parts, _ = abstract_model(cfg.model)
    params = result.per_layer(result.state.params)

    spec = clip_spec(cfg.data.procedural, parts.config.text_dim, parts.config.in_dim)
    source = ProceduralClips(spec, args.clips, seed=cfg.data.seed, split="train")
    clips, attrs = source.read(np.arange(args.clips)), source.attributes(np.arange(args.clips))
    noise = jax.random.normal(jax.random.key(0), clips["latents"].shape, jnp.float32)
    velocity = make_velocity(parts, "dense", DTYPES[cfg.model.compute_dtype])
    latents = generate(velocity, params, noise, jnp.asarray(clips["context"]), steps=20, shift=cfg.objective.shift,
                       guidance=1.0)
    rmse = np.sqrt(np.mean((latents - np.asarray(clips["latents"])) ** 2, axis=(1, 2, 3, 4)))

    videos = {name: np.asarray(depth_to_space(jnp.asarray(x), spec.space_to_depth))
              for name, x in (("rendered", clips["latents"]), ("sampled", latents))}
    templates, shapes = silhouettes(), {"rendered": [], "sampled": []}
    print(f"{args.clips} clips memorised in {int(result.metrics['step'])} steps (last batch loss "
          f"{result.metrics['loss']:.4f}); samples of their captions, guidance 1, 20 steps:\n")
    print("| clip | caption's shape | read, rendered | read, sampled | RMSE |")
    print("|---|---|---|---|---|")
    for i, a in enumerate(attrs):
        colour = list(COLOURS.values())[int(a["colour"][0])]
        area = float(colour_mask(videos["rendered"][i][:1], colour).sum())
        for name, video in videos.items():
            shapes[name].append(read_attributes(video[i], colour, area, spec, templates).get("shape"))
        cells = [SHAPES[s] if s is not None else "-" for s in (shapes["rendered"][i], shapes["sampled"][i])]
        print(f"| {i} | {SHAPES[int(a['shape'][0])]} | {cells[0]} | {cells[1]} | {rmse[i]:.3f} |")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        frames = [np.concatenate([latents_to_rgb(x, spec.space_to_depth)[i, 0] for x in (clips["latents"], latents)])
                  for i in range(args.clips)]
        strip = np.concatenate(frames, axis=1)
        Image.fromarray(strip).resize((strip.shape[1] * 4, strip.shape[0] * 4), Image.NEAREST).save(
            args.out / "memorised.png")
    return {"rmse": rmse, "shapes": shapes, "truth": [int(a["shape"][0]) for a in attrs],
            "loss": float(result.metrics["loss"])}


if __name__ == "__main__":
    main()

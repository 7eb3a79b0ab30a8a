"""Sparse generation quality on the shipped miniature teacher (docs/quality.md).

    python benchmarks/quality.py --out OUT [--budget-s 240] [--small]

Dense and sparse samples from the same noise and captions (held-out procedural clips), the
project's UniPC sampler with classifier-free guidance. Per configuration: block sparsity
achieved on a calibration batch, PSNR and SSIM (scikit-image) of the decoded sparse clips
against the dense ones, relative L2 of the final latents, and the held-out flow-matching
loss of the sparse model (a teacher-free measure).

Table 1 (training-free): Top-k, Top-p, hybrid and the SpargeAttn, SVG, Radial and SVG2
providers, each knob bisected on the calibration batch to the target block sparsities.
Table 2 (fine-tuned at the highest target): the hybrid student with velocity distillation,
the flow-matching loss, or both (same data, steps and learning rate), and Top-k / Top-p
with velocity distillation, over `--seeds` seeds.

Rows run in a fixed priority order; a row that would start after `--budget-s` seconds is
not run and listed as such. `--small` runs a CPU-sized version (tests). Results go to
OUT/quality.json (rewritten after every row), frame strips to OUT/frames.npz; the tables are
printed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from train.config import load_config
from train.generate import block_sparsity, capture_layers, generate, make_velocity
from train.heldout import heldout_batch, make_evaluator
from train.loop import train
from train.model import DTYPES, abstract_model, init_params, wan_config
from train.procedural import ProceduralClips, clip_spec, depth_to_space, latents_to_rgb

ROOT = Path(__file__).resolve().parents[1]
TEACHER_CONFIG = ROOT / "train" / "configs" / "teacher.json"
TEACHER = ROOT / "train" / "teacher"

# name -> (sparse-settings builder from the knob, knob range); sparsity falls as the knob grows.
METHODS = {
    "topk": (lambda x: {"rule": "topk", "topk": x}, (0.005, 1.0)),
    "topp": (lambda x: {"rule": "topp", "topp": x}, (0.005, 1.0)),
    # hybrid: Top-p bisected, Top-k fixed at 40 % of the kept-block budget (set per target below)
    "hybrid": (None, (0.005, 1.0)),
    "spargeattn": (lambda x: {"method": {"kind": "spargeattn", "cdf_threshold": x, "sim_threshold": 0.3}},
                   (0.005, 1.0)),
    "svg": (lambda x: {"method": {"kind": "svg", "band_frames": x}}, (0.02, 8.0)),
    "radial": (lambda x: {"method": {"kind": "radial", "decay": x}}, (0.005, 4.0)),
    "svg2": (lambda x: {"method": {"kind": "svg2", "q_clusters": 32, "k_clusters": 64, "topp": x,
                                   "init_iters": 10}}, (0.005, 1.0)),
}


def sparse_settings(method: str, knob: float, target: float) -> dict:
    if method == "hybrid":
        return {"rule": "hybrid", "topk": max(0.4 * (1.0 - target), 1e-3), "topp": knob}
    return METHODS[method][0](knob)


def default_device():
    """The device new arrays go to: `jax.default_device` where set (the tests' `cpu` marker), else the first."""
    return next(iter(jnp.zeros(()).devices()))


class Study:
    """The teacher, the evaluation clips and the shared sampling / scoring code."""

    def __init__(self, args):
        size = (["data.procedural.frames=4", "data.procedural.height=64", "data.procedural.width=64",
                 "model.overrides.sparse.block_q=32", "model.overrides.sparse.block_k=16",
                 "model.compute_dtype=float32"] if args.small else [])
        self.base = [f"model.weights={TEACHER}", *size]
        self.cfg = load_config(TEACHER_CONFIG, self.base)
        self.args = args
        parts, like = abstract_model(self.cfg.model)
        device = jax.sharding.SingleDeviceSharding(default_device())
        self.parts, self.params = init_params(self.cfg.model, 0, jax.tree.map(lambda _: device, like))
        self.dtype = DTYPES[self.cfg.model.compute_dtype]
        self.config = wan_config(self.cfg.model)
        self.spec = clip_spec(self.cfg.data.procedural, self.config.text_dim, self.config.in_dim)
        clips = ProceduralClips(self.spec, args.clips + 2, seed=1, split="heldout")
        self.eval = clips.read(np.arange(args.clips))
        self.calibration = clips.read(np.arange(args.clips, args.clips + 2))
        self.noise = jax.random.normal(jax.random.key(0), self.eval["latents"].shape, jnp.float32)
        self.heldout = heldout_batch(ProceduralClips(self.spec, 8, seed=2, split="heldout"), 8, self.cfg.objective.shift)
        self.captured = [capture_layers(self.parts, self.params, self.calibration, s) for s in (0.9, 0.5, 0.2)]
        self.dense = self.sample(self.parts, self.params, "dense")
        self.dense_pixels = self.decode(self.dense)

    def parts_for(self, sparse: dict):
        overrides = dict(self.cfg.model.overrides)
        overrides["sparse"] = {**overrides.get("sparse", {}), **sparse}
        return abstract_model(dataclasses.replace(self.cfg.model, overrides=overrides))[0]

    def sample(self, parts, params, mode: str) -> np.ndarray:
        return generate(make_velocity(parts, mode, self.dtype), params, self.noise, jnp.asarray(self.eval["context"]),
                        steps=self.args.steps, shift=self.cfg.objective.shift, guidance=self.args.guidance)

    def decode(self, latents) -> np.ndarray:
        return np.clip(depth_to_space(np.asarray(latents, np.float32), self.spec.space_to_depth), -1.0, 1.0)

    def sparsity(self, sparse: dict) -> float:
        config = self.parts_for(sparse).config.sparse
        return float(np.mean([block_sparsity(c, config, self.spec.latent_shape, self.config.patch_size)
                              for c in self.captured]))

    def calibrate(self, method: str, target: float) -> tuple[dict, float]:
        """Bisect the method's knob to the smallest value whose calibration sparsity is >= target."""
        lo, hi = METHODS[method][1]
        best = (sparse_settings(method, lo, target), self.sparsity(sparse_settings(method, lo, target)))
        for _ in range(self.args.bisect):
            mid = (lo + hi) / 2
            s = self.sparsity(sparse_settings(method, mid, target))
            if s >= target:
                lo, best = mid, (sparse_settings(method, mid, target), s)
            else:
                hi = mid
        return best

    def score(self, parts, params) -> dict:
        from skimage.metrics import structural_similarity

        latents = self.sample(parts, params, "sparse")
        pixels = self.decode(latents)
        mse = np.mean((pixels.astype(np.float64) - self.dense_pixels) ** 2, axis=(1, 2, 3, 4))
        psnr = 10 * np.log10(4.0 / np.maximum(mse, 1e-12))  # peak-to-peak 2 for pixels in [-1, 1]
        ssim = [structural_similarity(a, b, channel_axis=-1, data_range=2.0)
                for clip_a, clip_b in zip(pixels, self.dense_pixels) for a, b in zip(clip_a, clip_b)]
        rel = np.linalg.norm((latents - self.dense).reshape(len(latents), -1), axis=1) / np.linalg.norm(
            self.dense.reshape(len(latents), -1), axis=1)
        flow = make_evaluator(parts, "sparse", self.dtype)(params, params, self.heldout)["heldout_flow_loss"]
        return {"psnr_db": float(np.mean(psnr)), "ssim": float(np.mean(ssim)), "rel_l2": float(np.mean(rel)),
                "flow_loss": float(flow), "frames": latents_to_rgb(latents[0], self.spec.space_to_depth)}

    def finetune(self, sparse: dict, distill: float, flow: float, seed: int, workdir: Path):
        overrides = [*self.base, f"model.overrides.sparse={json.dumps({**self.cfg.model.overrides['sparse'], **sparse})}",
                     f"objective.distill_weight={distill}", f"objective.flow_weight={flow}",
                     "objective.student_attention=sparse", f"steps={self.args.finetune_steps}",
                     f"optim.lr={self.args.lr}", "optim.warmup_steps=10", "optim.weight_decay=0.0",
                     f"data.batch_size={self.args.batch}", f"data.seed={100 + seed}", f"seed={seed}",
                     f"eval_every={max(1, self.args.finetune_steps // 5)}", "eval_examples=8",
                     f"log_every={self.args.finetune_steps}", f"metrics_path={workdir / f'ft_{seed}_{distill}_{flow}.jsonl'}"]
        result = train(load_config(TEACHER_CONFIG, overrides), progress=False)
        return result.state.params, result.evaluations


def plan(args) -> list[tuple]:
    """Rows in priority order: ("dense",), ("free", method, target), ("tune", rule, objective, seed)."""
    levels = sorted(args.levels)
    top = levels[-1]
    rows = [("free", m, levels[0]) for m in args.methods] + [("free", "hybrid", top)]
    rows += [("tune", "hybrid", obj, 0) for obj in args.objectives]
    rows += [("free", m, t) for t in levels[1:] for m in args.methods if (m, t) != ("hybrid", top)]
    rows += [("tune", rule, "distill", 0) for rule in args.tune_rules if rule != "hybrid"]
    rows += [("tune", rule, obj, s) for s in range(1, args.seeds) for rule in ["hybrid", *args.tune_rules]
             for obj in (args.objectives if rule == "hybrid" else ["distill"]) if not (rule != "hybrid" and obj != "distill")]
    return list(dict.fromkeys(rows))


OBJECTIVES = {"distill": (1.0, 0.0), "flow": (0.0, 1.0), "both": (1.0, 1.0)}


def table(results: dict) -> str:
    lines = ["Table 1: training-free (PSNR / SSIM vs dense samples, rel. L2 of latents, held-out flow loss)",
             f"{'method':<11} {'target':>6} {'achieved':>8} {'PSNR dB':>8} {'SSIM':>6} {'rel L2':>7} {'flow':>7}"]
    for r in results["free"]:
        lines.append(f"{r['method']:<11} {r['target']:>6.2f} {r['sparsity']:>8.3f} {r['psnr_db']:>8.2f} "
                     f"{r['ssim']:>6.3f} {r['rel_l2']:>7.3f} {r['flow_loss']:>7.4f}")
    lines += ["", f"dense flow loss {results.get('dense_flow_loss', float('nan')):.4f}", "",
              "Table 2: fine-tuned at the highest target (mean ± spread over seeds)",
              f"{'rule':<7} {'objective':<9} {'seeds':>5} {'sparsity':>8} {'PSNR dB':>14} {'SSIM':>13} "
              f"{'rel L2':>13} {'flow':>15}"]
    groups: dict = {}
    for r in results["tuned"]:
        groups.setdefault((r["rule"], r["objective"]), []).append(r)
    for (rule, obj), rs in groups.items():
        cell = lambda k, f: f"{np.mean([r[k] for r in rs]):{f}} ± {np.ptp([r[k] for r in rs]) / 2:{f}}"
        lines.append(f"{rule:<7} {obj:<9} {len(rs):>5} {np.mean([r['sparsity'] for r in rs]):>8.3f} "
                     f"{cell('psnr_db', '6.2f'):>14} {cell('ssim', '5.3f'):>13} {cell('rel_l2', '5.3f'):>13} "
                     f"{cell('flow_loss', '6.4f'):>15}")
    if results["not_run"]:
        lines += ["", "not run (budget): " + ", ".join("/".join(map(str, row)) for row in results["not_run"])]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--small", action="store_true", help="CPU size: 4 frames of 64x64, blocks 32/16, float32")
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="sampler steps")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--levels", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--bisect", type=int, default=7, help="bisection steps per calibration")
    p.add_argument("--objectives", nargs="*", default=["distill", "flow", "both"], choices=list(OBJECTIVES),
                   help="objectives of the fine-tuned hybrid rows (none: no Table 2)")
    p.add_argument("--tune-rules", nargs="*", default=["hybrid", "topk", "topp"], choices=["hybrid", "topk", "topp"],
                   help="rules fine-tuned with velocity distillation besides the hybrid")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--budget-s", type=float, default=float("inf"), help="start no row after this many seconds")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    study = Study(args)
    top = max(args.levels)
    results = {"device": default_device().device_kind, "clips": args.clips, "sampler_steps": args.steps,
               "guidance": args.guidance, "finetune_steps": args.finetune_steps, "lr": args.lr,
               "latent_shape": list(study.spec.latent_shape), "free": [], "tuned": [], "not_run": []}
    results["dense_flow_loss"] = float(make_evaluator(study.parts, "dense", study.dtype)(
        study.params, study.params, study.heldout)["heldout_flow_loss"])
    frames = {"dense": latents_to_rgb(study.dense[0], study.spec.space_to_depth)}
    calibrated: dict = {}
    workdir = Path(tempfile.mkdtemp())
    for row in plan(args):
        if time.perf_counter() - start > args.budget_s:
            results["not_run"].append(row)
            continue
        tick = time.perf_counter()
        kind, method, *rest = row
        target = rest[0] if kind == "free" else top
        if (method, target) not in calibrated:
            calibrated[(method, target)] = study.calibrate(method, target)
        sparse, sparsity = calibrated[(method, target)]
        parts = study.parts_for(sparse)
        if kind == "free":
            scores = study.score(parts, study.params)
            frames[f"{method}_{target}"] = scores.pop("frames")
            results["free"].append({"method": method, "target": target, "sparsity": sparsity, "sparse": sparse, **scores})
        else:
            objective, seed = rest
            params, evaluations = study.finetune(sparse, *OBJECTIVES[objective], seed, workdir)
            scores = study.score(parts, params)
            frames[f"tuned_{method}_{objective}_{seed}"] = scores.pop("frames")
            results["tuned"].append({"rule": method, "objective": objective, "seed": seed, "sparsity": sparsity,
                                     "sparse": sparse, "evaluations": evaluations, **scores})
        print(f"{'/'.join(map(str, row))}: sparsity {sparsity:.3f} PSNR {scores['psnr_db']:.2f} dB "
              f"({time.perf_counter() - tick:.0f} s, {time.perf_counter() - start:.0f} s total)", flush=True)
        (out / "quality.json").write_text(json.dumps(results, indent=1, default=str))
        np.savez_compressed(out / "frames.npz", **frames)
    results["wall_s"] = time.perf_counter() - start
    (out / "quality.json").write_text(json.dumps(results, indent=1, default=str))
    print(table(results))
    return results


if __name__ == "__main__":
    main()

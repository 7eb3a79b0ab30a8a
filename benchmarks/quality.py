"""Sparse generation quality on the shipped miniature teacher (docs/quality.md).

    python benchmarks/quality.py --out OUT [--part table1|table2|all] [--budget-s 480] [--small]

Dense and sparse samples from the same noise and captions (held-out procedural clips), the
project's UniPC sampler with classifier-free guidance. Per configuration: block sparsity
achieved on a calibration batch, PSNR and SSIM (scikit-image) of the decoded sparse clips
against the dense ones, relative L2 of the final latents, and the held-out flow-matching
loss of the sparse model (a teacher-free measure, on as many held-out clips at fixed noise
levels as one sampler call takes: `--clips`, twice that with guidance).

Table 1 (`--part table1`, training-free): Top-k, Top-p, hybrid and the SpargeAttn, SVG, Radial
and SVG2 providers, each knob bisected on the calibration batch to the target block sparsities.
Table 2 (`--part table2`, fine-tuned at the highest target): the hybrid student with velocity
distillation, the flow-matching loss, or both (same data, steps and learning rate), and Top-k /
Top-p with velocity distillation, over `--seeds` seeds. `--part all` (default) runs both.

Resumable: results go to OUT/quality.json (rewritten after every row) and frame strips (4 evenly
spaced frames of clip 0 per row) to OUT/frames.npz. A later call with the same OUT (and the same
clips, steps, guidance, fine-tuning settings, size and device) skips the rows already there and
reuses their calibrations; a call whose rows are all done only prints the tables. A row that
would end after `--budget-s` seconds (judged by the longest row of its table so far in this
call) is not started; the rows of both tables not run yet are listed (`not_run`).

Where the time goes, and why (one H200). Measured before this layout: ~50 s per row, of which
two compiles (the sampler's sparse model and a separate held-out evaluator holding the sparse
and the dense model), calibration by eager mask evaluation at every bisection step, and SSIM
of 1024 frames on one host core. Now:
- one compile per (method, target): the sampler's jitted velocity (knobs such as Top-k / Top-p
  are compile-time constants of the model: the GPU's fused block selection takes them as
  static values). The held-out flow loss runs on that same compiled function (same batch
  shape), and Table 2 scores its students with the compiled sampler of its rule. The first
  call of a row's sampler is timed as `compile_s`.
- calibration: Top-k, Top-p, hybrid, SpargeAttn and SVG2 bisect with their knob as a traced
  argument of one jitted mask function over all captured layers and noise levels (one compile
  per method, per target for the hybrid whose Top-k share follows the target; then
  milliseconds a step); SVG's and Radial's masks are NumPy functions of the knob, evaluated
  eagerly. The chosen knob's sparsity is then measured again with the concrete config (one
  jitted `make_plan` over the captures; eagerly, SVG2's k-means loops compile again at every
  call, 20-30 s per measurement on the CPU): that is the reported value.
- SSIM over a thread pool (one worker per core).
On the CPU (--small, 1 clip, 2 steps) a Table 1 row now takes 4-13 s, was 25-30 s (36 -> 11 s for
tests/test_quality_benchmark.py, run back to back on the same machine).
Expected on the H200 (from the costs above, not yet measured in this layout): a Table 1 row
~15-30 s (compile ~10-20 s: the 30-block T2V-1.3B sparse forward compiled in ~79 s on an H100,
benchmarks/RESULTS.md, and this teacher has 6 blocks; 20 steps of 64 clips x 4096 tokens ~1-2 s, calibration and the
library's sparsity measurement ~2-5 s, scoring ~2-3 s); the start of a call (teacher, clips,
captures, the dense sampler's compile and samples) ~40 s. A Table 2 row ~45-75 s: the trainer
compiles its step and its evaluator (~30-60 s), 60 steps of batch 8 ~5-10 s, scoring ~5 s.
Each row's `timing` (calibrate_s, train_s, compile_s, sample_s, score_s) is in quality.json.

Command plan for the coordinator (device calls of at most 10 minutes; each a fresh machine):
keep the results in a folder the calls carry, e.g. `qrun/` ignored by `.git/info/exclude`:

    echo /qrun/ >> .git/info/exclude; mkdir -p qrun
    # each call, carry ["qrun"], timeout_s 600:
    mkdir -p $OUT/q && cp qrun/* $OUT/q/ 2>/dev/null; set -o pipefail; PYTHONUNBUFFERED=1 PYTHONPATH=. \\
      JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache python3 benchmarks/quality.py --out $OUT/q --part PART \\
      --budget-s 480 --clips 64 --steps 20 --guidance 1 --levels 0.8 0.9 0.95 --seeds 2 \\
      --finetune-steps 60 --batch 8 --lr 1e-4 2>&1 | tee $OUT/q/log.txt
    # then copy the call's q/quality.json and q/frames.npz back into qrun/

  call 1: PART=table1 (21 rows; all of them if rows take <= ~20 s, else the rest in call 2);
  call 2: PART=all (finishes Table 1, then Table 2: hybrid x distill / flow / both, Top-k and
  Top-p x distill, each row's two seeds back to back); call 3: PART=table2 (the rest).
  JAX's persistent compilation cache lets a row's seed 1 reuse the trainer programs compiled for
  its seed 0 in the same call (on the CPU: 81 s -> 41 s for a small fine-tuned row; not yet
  tried on the GPU, drop the variable if it misbehaves there). Read each call's per-row `timing` before planning
  the next. Then
  `python benchmarks/quality_figures.py --quality qrun --out docs/images` and update
  docs/quality.md; copy qrun/quality.json to docs/data/quality.json.
`--small` runs a CPU-sized version (tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.blocks import num_blocks
from sparge_jax.masks import make_plan
from sparge_jax.tools.capture import token_grid
from train.config import load_config
from train.generate import block_sparsity, capture_layers, generate, make_velocity
from train.heldout import heldout_batch
from train.loop import train
from train.model import DTYPES, abstract_model, init_params, wan_config
from train.objective import mse
from train.procedural import ProceduralClips, clip_spec, depth_to_space, latents_to_rgb
from train.schedule import noisy_latents, timesteps

ROOT = Path(__file__).resolve().parents[1]
TEACHER_CONFIG = ROOT / "train" / "configs" / "teacher.json"
TEACHER = ROOT / "train" / "teacher"

# name -> (sparse settings from (knob, target), the method-config field the knob sets when it can be a
# traced jit argument (None: a NumPy function of the knob, evaluated eagerly), knob range); sparsity
# falls as the knob grows. The hybrid bisects Top-p with Top-k fixed at 40 % of the kept-block budget.
METHODS = {
    "topk": (lambda x, t: {"rule": "topk", "topk": x}, "topk", (0.005, 1.0)),
    "topp": (lambda x, t: {"rule": "topp", "topp": x}, "topp", (0.005, 1.0)),
    "hybrid": (lambda x, t: {"rule": "hybrid", "topk": max(0.4 * (1.0 - t), 1e-3), "topp": x}, "topp", (0.005, 1.0)),
    "spargeattn": (lambda x, t: {"method": {"kind": "spargeattn", "cdf_threshold": x, "sim_threshold": 0.3}},
                   "cdf_threshold", (0.005, 1.0)),
    "svg": (lambda x, t: {"method": {"kind": "svg", "band_frames": x}}, None, (0.02, 8.0)),
    "radial": (lambda x, t: {"method": {"kind": "radial", "decay": x}}, None, (0.005, 4.0)),
    "svg2": (lambda x, t: {"method": {"kind": "svg2", "q_clusters": 32, "k_clusters": 64, "topp": x,
                                      "init_iters": 10}}, "topp", (0.005, 1.0)),
}
OBJECTIVES = {"distill": (1.0, 0.0), "flow": (0.0, 1.0), "both": (1.0, 1.0)}
# settings a resumed OUT/quality.json must share with the call extending it
RUN_SETTINGS = ("device", "clips", "sampler_steps", "guidance", "finetune_steps", "batch", "lr", "latent_shape")
STRIP_FRAMES = 4


def default_device():
    """The device new arrays go to: `jax.default_device` where set (the tests' `cpu` marker), else the first."""
    return next(iter(jnp.zeros(()).devices()))


def settings_key(sparse: dict | None) -> str:
    return json.dumps(sparse, sort_keys=True)


class Study:
    """The teacher, the evaluation clips and the shared sampling / calibration / scoring code."""

    def __init__(self, args):
        size = (["data.procedural.frames=4", "data.procedural.height=64", "data.procedural.width=64",
                 "model.overrides.sparse.block_q=32", "model.overrides.sparse.block_k=16",
                 "model.compute_dtype=float32"] if args.small else [])
        self.base = [f"model.weights={TEACHER}", *size]
        self.cfg = load_config(TEACHER_CONFIG, self.base)
        self.args = args
        self.config = wan_config(self.cfg.model)
        self.spec = clip_spec(self.cfg.data.procedural, self.config.text_dim, self.config.in_dim)
        self.velocities: dict = {}
        self.mask_counters: dict = {}
        self._captured = None

    def start(self):
        """Load the teacher and the clips, sample the dense reference (and compile its sampler)."""
        args = self.args
        # `train` turns this on (same random bits); it keys the compile caches, so it is set before the
        # first compile: Table 1's samplers then serve Table 2's rows of the same call.
        jax.config.update("jax_threefry_gpu_kernel_lowering", True)
        parts, like = abstract_model(self.cfg.model)
        device = jax.sharding.SingleDeviceSharding(default_device())
        self.parts, self.params = init_params(self.cfg.model, 0, jax.tree.map(lambda _: device, like))
        self.dtype = DTYPES[self.cfg.model.compute_dtype]
        clips = ProceduralClips(self.spec, args.clips + 2, seed=1, split="heldout")
        self.eval = clips.read(np.arange(args.clips))
        self.calibration = clips.read(np.arange(args.clips, args.clips + 2))
        self.noise = jax.random.normal(jax.random.key(0), self.eval["latents"].shape, jnp.float32)
        calls = args.clips * (1 if args.guidance == 1.0 else 2)  # rows of one velocity call while sampling
        self.flow_batch = heldout_batch(ProceduralClips(self.spec, calls, seed=2, split="heldout"), calls,
                                        self.cfg.objective.shift)
        dense = self.velocity(None)
        self.dense_flow_loss = self.flow_loss(dense, self.params)
        self.dense = self.sample(dense, self.params)
        self.dense_pixels = self.decode(self.dense)

    @property
    def captured(self) -> list[dict]:
        """q, k, v of every layer on the calibration clips at noise levels 0.9 / 0.5 / 0.2 (made on first use)."""
        if self._captured is None:
            self._captured = [capture_layers(self.parts, self.params, self.calibration, s) for s in (0.9, 0.5, 0.2)]
        return self._captured

    def parts_for(self, sparse: dict):
        overrides = dict(self.cfg.model.overrides)
        overrides["sparse"] = {**overrides.get("sparse", {}), **sparse}
        return abstract_model(dataclasses.replace(self.cfg.model, overrides=overrides))[0]

    def velocity(self, sparse: dict | None):
        """The jitted velocity of the teacher (None) or of the model with `sparse` settings, one per settings."""
        key = settings_key(sparse)
        if key not in self.velocities:
            parts = self.parts if sparse is None else self.parts_for(sparse)
            run = make_velocity(parts, "dense" if sparse is None else "sparse", self.dtype)
            # every argument committed to one device: jit compiles again for a committed argument where it
            # saw an uncommitted one (the sampler's later steps), and for other param shardings (the trainer's)
            device = jax.sharding.SingleDeviceSharding(default_device())
            self.velocities[key] = lambda *args: run(*jax.device_put(args, device))
        return self.velocities[key]

    def sample(self, velocity, params) -> np.ndarray:
        return generate(velocity, params, self.noise, jnp.asarray(self.eval["context"]), steps=self.args.steps,
                        shift=self.cfg.objective.shift, guidance=self.args.guidance)

    def flow_loss(self, velocity, params) -> float:
        """MSE(v, noise - x0) on the held-out flow batch, through the sampler's compiled `velocity`."""
        b = self.flow_batch
        v = velocity(params, noisy_latents(b["latents"], b["noise"], b["sigma"]), timesteps(b["sigma"]), b["context"])
        return float(mse(v, b["noise"] - b["latents"]))

    def decode(self, latents) -> np.ndarray:
        return np.clip(depth_to_space(np.asarray(latents, np.float32), self.spec.space_to_depth), -1.0, 1.0)

    def sparsity(self, sparse: dict) -> float:
        """Block sparsity of `sparse` on the captured layers, by the library's eager path (concrete config)."""
        config = self.parts_for(sparse).config.sparse
        return float(np.mean([block_sparsity(c, config, self.spec.latent_shape, self.config.patch_size)
                              for c in self.captured]))

    def mask_sparsity(self, sparse: dict, field: str | None = None):
        """knob -> block sparsity of the `sparse` settings on the captured layers, by one jitted
        `make_plan` over all of them (as `train.generate.block_sparsity` counts): with `field`, the
        method config's field of that name is the knob, a traced argument (one compile for all its
        values); without, the knob is unused (the concrete settings; eager evaluation of SVG2's
        k-means compiles its loops again at every call)."""
        config = self.parts_for(sparse).config.sparse
        key = (settings_key(sparse), field)
        if key not in self.mask_counters:
            grid = token_grid(self.spec.latent_shape[:3], self.config.patch_size)

            @jax.jit
            def skipped(x, q, k, v):
                method = config.method if field is None else dataclasses.replace(config.method, **{field: x})
                nq, nk = num_blocks(q.shape[2], config.kernel.block_q), num_blocks(k.shape[2], config.kernel.block_k)
                one = lambda q, k, v: make_plan(q, k, v, method, config.kernel, grid=grid,
                                                key=jax.random.key(0))[0].mask[..., :nq, :nk]
                masks = jax.vmap(one)(q, k, v)  # the captures (layer, noise level) stacked
                return jnp.sum(~masks, dtype=jnp.int32), masks.size

            self.mask_counters[key] = skipped
        stacked = [jnp.stack([c[name][i] for c in self.captured for name in c]) for i in range(3)]

        def measure(x=1.0):
            count, total = self.mask_counters[key](jnp.float32(x), *stacked)
            return int(count) / int(total)

        return measure

    def calibrate(self, method: str, target: float) -> dict:
        """Bisect the method's knob to the smallest sparsity >= target (a traced knob where
        `METHODS` names its field, else the eager `sparsity`); the chosen settings' sparsity,
        measured again with the concrete config (`mask_sparsity`), is the reported one."""
        build, field, (lo, hi) = METHODS[method]
        if field is None:
            measure = lambda x: self.sparsity(build(x, target))
        else:
            measure = self.mask_sparsity(build(1.0, target), field)
        knob, calibrated = lo, measure(lo)
        for _ in range(self.args.bisect):
            mid = (lo + hi) / 2
            s = measure(mid)
            if s >= target:
                lo, knob, calibrated = mid, mid, s
            else:
                hi = mid
        sparse = build(knob, target)
        return {"sparse": sparse, "knob": knob, "calibrated": calibrated, "sparsity": self.mask_sparsity(sparse)()}

    def score(self, velocity, params) -> tuple[dict, dict]:
        """(metrics against the dense samples, timing) of the model behind `velocity` with `params`."""
        from skimage.metrics import structural_similarity

        tick = time.perf_counter()
        flow = self.flow_loss(velocity, params)  # the first call: compiles unless this velocity ran before
        compiled = time.perf_counter()
        latents = self.sample(velocity, params)
        sampled = time.perf_counter()
        pixels = self.decode(latents)
        mse_pixels = np.mean((pixels.astype(np.float64) - self.dense_pixels) ** 2, axis=(1, 2, 3, 4))
        psnr = 10 * np.log10(4.0 / np.maximum(mse_pixels, 1e-12))  # peak-to-peak 2 for pixels in [-1, 1]
        pairs = [(a, b) for clip_a, clip_b in zip(pixels, self.dense_pixels) for a, b in zip(clip_a, clip_b)]
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            ssim = list(pool.map(lambda ab: structural_similarity(*ab, channel_axis=-1, data_range=2.0), pairs))
        rel = np.linalg.norm((latents - self.dense).reshape(len(latents), -1), axis=1) / np.linalg.norm(
            self.dense.reshape(len(latents), -1), axis=1)
        scores = {"psnr_db": float(np.mean(psnr)), "ssim": float(np.mean(ssim)), "rel_l2": float(np.mean(rel)),
                  "flow_loss": flow, "frames": self.strip(latents[0])}
        timing = {"compile_s": compiled - tick, "sample_s": sampled - compiled,
                  "score_s": time.perf_counter() - sampled}
        return scores, timing

    def strip(self, latents) -> np.ndarray:
        """`STRIP_FRAMES` evenly spaced uint8 RGB frames of one clip's latents."""
        frames = latents_to_rgb(latents, self.spec.space_to_depth)
        return frames[np.linspace(0, len(frames) - 1, STRIP_FRAMES).round().astype(int)]

    def finetune(self, sparse: dict, distill: float, flow: float, seed: int, workdir: Path):
        sparse = {**self.cfg.model.overrides["sparse"], **sparse}
        overrides = [*self.base, f"model.overrides.sparse={json.dumps(sparse)}",
                     f"objective.distill_weight={distill}", f"objective.flow_weight={flow}",
                     "objective.student_attention=sparse", f"steps={self.args.finetune_steps}",
                     f"optim.lr={self.args.lr}", "optim.warmup_steps=10", "optim.weight_decay=0.0",
                     "optim.ema_decay=null",  # the rows score the fine-tuned params themselves
                     f"data.batch_size={self.args.batch}", f"data.seed={100 + seed}", f"seed={seed}",
                     f"eval_every={max(1, self.args.finetune_steps // 5)}", "eval_examples=8",
                     f"log_every={self.args.finetune_steps}",
                     f"metrics_path={workdir / f'ft_{seed}_{distill}_{flow}.jsonl'}"]
        result = train(load_config(TEACHER_CONFIG, overrides), progress=False)
        return result.state.params, result.evaluations


def plan(args, part: str) -> list[tuple]:
    """Rows of `part` ("table1", "table2" or "all") in priority order: ("free", method, target),
    ("tune", rule, objective, seed). Targets: the lowest first, then the highest, then the others;
    a fine-tuned row's seeds back to back (with a persistent compilation cache the later seeds
    reuse the first one's programs)."""
    levels = sorted(args.levels)
    targets = list(dict.fromkeys([levels[0], levels[-1], *levels[1:-1]]))
    free = [("free", m, t) for t in targets for m in args.methods]
    pairs = [("hybrid", obj) for obj in args.objectives] + [(rule, "distill") for rule in args.tune_rules
                                                           if rule != "hybrid"]
    tune = [("tune", rule, obj, s) for rule, obj in pairs for s in range(args.seeds)]
    return {"table1": free, "table2": tune, "all": free + tune}[part]


def done_rows(results: dict) -> set[tuple]:
    return ({("free", r["method"], r["target"]) for r in results["free"]}
            | {("tune", r["rule"], r["objective"], r["seed"]) for r in results["tuned"]})


def table(results: dict) -> str:
    lines = ["Table 1: training-free (PSNR / SSIM vs dense samples, rel. L2 of latents, held-out flow loss)",
             f"{'method':<11} {'target':>6} {'achieved':>8} {'PSNR dB':>8} {'SSIM':>6} {'rel L2':>7} {'flow':>7}"]
    for r in sorted(results["free"], key=lambda r: (r["target"], r["method"])):
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
        lines += ["", "not run yet: " + ", ".join("/".join(map(str, row)) for row in results["not_run"])]
    return "\n".join(lines)


def load_results(path: Path, fresh: dict) -> dict:
    """The results of earlier calls at `path` (checked against this call's `fresh` settings), else `fresh`."""
    if not path.is_file():
        return fresh
    results = json.loads(path.read_text())
    differ = [f"{name}: {results.get(name)!r} there vs {fresh[name]!r} now" for name in RUN_SETTINGS
              if results.get(name) != fresh[name]]
    if differ:
        raise ValueError(f"--out {path.parent} holds results of other settings ({'; '.join(differ)}); "
                         "give another --out or the same settings")
    return results


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results folder; rows already in OUT/quality.json are skipped")
    p.add_argument("--part", default="all", choices=["table1", "table2", "all"])
    p.add_argument("--small", action="store_true", help="CPU size: 4 frames of 64x64, blocks 32/16, float32")
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="sampler steps")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--levels", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--bisect", type=int, default=10, help="bisection steps per calibration")
    p.add_argument("--objectives", nargs="*", default=["distill", "flow", "both"], choices=list(OBJECTIVES),
                   help="objectives of the fine-tuned hybrid rows (none: no hybrid rows in Table 2)")
    p.add_argument("--tune-rules", nargs="*", default=["hybrid", "topk", "topp"], choices=["hybrid", "topk", "topp"],
                   help="rules fine-tuned with velocity distillation besides the hybrid")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--budget-s", type=float, default=float("inf"),
                   help="start no row that would end after this many seconds of the call")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    study = Study(args)
    top = max(args.levels)
    fresh = {"device": default_device().device_kind, "clips": args.clips, "sampler_steps": args.steps,
             "guidance": args.guidance, "finetune_steps": args.finetune_steps, "batch": args.batch, "lr": args.lr,
             "latent_shape": list(study.spec.latent_shape), "calibrations": {}, "free": [], "tuned": [],
             "not_run": [], "calls": []}
    results = load_results(out / "quality.json", fresh)
    frames = {}
    if (out / "frames.npz").is_file():
        with np.load(out / "frames.npz") as saved:
            frames = dict(saved)
    rows = [row for row in plan(args, args.part) if row not in done_rows(results)]
    call = {"part": args.part, "ran": [], "not_run": []}
    if rows:
        study.start()
        dense_rms = float(np.sqrt(np.mean(np.square(study.dense))))
        if "dense_rms" in results and abs(dense_rms / results["dense_rms"] - 1) > 1e-4:
            print(f"warning: the dense samples differ from the earlier calls' (rms {dense_rms} vs "
                  f"{results['dense_rms']}); rows of different calls are scored against different references")
        results.setdefault("dense_rms", dense_rms)
        results.setdefault("dense_flow_loss", study.dense_flow_loss)
        frames.setdefault("dense", study.strip(study.dense[0]))
        call["start_s"] = time.perf_counter() - start
        print(f"start: {call['start_s']:.0f} s (dense flow loss {study.dense_flow_loss:.4f})", flush=True)
    longest: dict = {}
    workdir = Path(tempfile.mkdtemp())
    for row in rows:
        kind, method, *rest = row
        if time.perf_counter() - start + longest.get(kind, 0.0) > args.budget_s:
            call["not_run"].append(row)
            continue
        tick = time.perf_counter()
        target = rest[0] if kind == "free" else top
        name = f"{method}@{target}"
        timing = {}
        if name not in results["calibrations"]:
            results["calibrations"][name] = study.calibrate(method, target)
            timing["calibrate_s"] = time.perf_counter() - tick
        calibration = results["calibrations"][name]
        velocity = study.velocity(calibration["sparse"])
        record = {"sparsity": calibration["sparsity"], "sparse": calibration["sparse"]}
        if kind == "free":
            scores, score_timing = study.score(velocity, study.params)
            frames[f"{method}_{target}"] = scores.pop("frames")
            results["free"].append({"method": method, "target": target, **record, **scores,
                                    "timing": {**timing, **score_timing}})
        else:
            objective, seed = rest
            trained = time.perf_counter()
            params, evaluations = study.finetune(calibration["sparse"], *OBJECTIVES[objective], seed, workdir)
            timing["train_s"] = time.perf_counter() - trained
            scores, score_timing = study.score(velocity, params)
            frames[f"tuned_{method}_{objective}_{seed}"] = scores.pop("frames")
            results["tuned"].append({"rule": method, "objective": objective, "seed": seed, **record,
                                     "evaluations": evaluations, **scores, "timing": {**timing, **score_timing}})
        seconds = time.perf_counter() - tick
        longest[kind] = max(longest.get(kind, 0.0), seconds)
        call["ran"].append(row)
        print(f"{'/'.join(map(str, row))}: sparsity {record['sparsity']:.3f} PSNR {scores['psnr_db']:.2f} dB "
              f"({seconds:.0f} s: {', '.join(f'{k} {v:.1f}' for k, v in {**timing, **score_timing}.items())}; "
              f"{time.perf_counter() - start:.0f} s total)", flush=True)
        (out / "quality.json").write_text(json.dumps(results, indent=1, default=str))
        np.savez_compressed(out / "frames.npz", **frames)
    results["not_run"] = [row for row in plan(args, "all") if row not in done_rows(results)]  # both tables
    call["wall_s"] = time.perf_counter() - start
    results["calls"].append(call)
    (out / "quality.json").write_text(json.dumps(results, indent=1, default=str))
    if frames:
        np.savez_compressed(out / "frames.npz", **frames)
    print(table(results))
    return results


if __name__ == "__main__":
    main()

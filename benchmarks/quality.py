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
teacher files, clips, steps, guidance, fine-tuning settings, size and device) skips the rows
already there and reuses their calibrations; a call whose rows are all done only prints the
tables. A row that would end after `--budget-s` seconds (judged by the longest row of its table
so far in this call) is not started; the rows of both tables not run yet are listed (`not_run`).

Where the time goes. On one H200 (2026-12-01, 64 clips, 20 steps, persistent compilation cache,
one row after the other) a Table 1 row cost 35-40 s of host time; sampling took < 1 s of it:
calibration 12-20 s, the sampler's compile 12-18 s, scoring 4-5 s (SSIM of 1024 frames:
scikit-image holds the GIL most of the time, 2 threads ran 1.2x one on the CPU); the start of a
call (teacher, clips, the dense sampler's compile and samples) 16 s. The programs a row compiles
(counted with JAX_LOG_COMPILES=1 on the CPU, --small):
- the sampler's jitted velocity of its settings (`compiled`; knobs such as Top-k / Top-p are
  compile-time constants of the model: the GPU's fused block selection takes them as static
  values), one per settings. Its first call, the held-out flow loss of the teacher's params
  (same batch shape as a sampler step), is `compile_s`; Table 2 scores its students with it.
- calibration (`calibrate_s`): Top-k, Top-p, hybrid, SpargeAttn and SVG2 bisect with their knob
  a traced argument of one jitted mask function over all captured layers and noise levels (one
  compile per method, per target for the hybrid whose Top-k share follows the target; then
  milliseconds a step); SVG's and Radial's masks are NumPy functions of the knob, evaluated
  eagerly (their small ops compile once per call). The chosen settings' sparsity is measured
  again by one jitted `make_plan` of the concrete config over the captures (a second mask
  compile per row; eagerly, SVG2's k-means loops would compile at every call): the reported
  value. Where the range's sparsest knob already falls short of the target (`reached` false)
  the bisection is skipped, and a later target whose settings equal a row done (in this call
  or an earlier one) takes that row's scores (`same_settings_as`), with no compile. SpargeAttn's
  similarity guard keeps every block of a q row or k column that is not self-similar, so it
  tops out at 0.794 on the study size (the H200's 80 % row, knob at the range's low end, traced
  and concrete counts equal; on the CPU in bf16 0.792: the guard keeps 19.5 % of the block
  pairs, all of layer 0's at noise 0.9, and the other rows keep at least one block). On the
  CPU size SVG, Radial and SVG2 top out too, and Top-k / Top-p / hybrid at 0.9375 (one of 16
  k blocks a row).
- the captures (q, k, v of the calibration clips, eager) once per call.
A Table 2 row adds the trainer's programs (its step and held-out evaluator, `train_s`): the
distillation weights are Python constants of `train.objective` (the flow-only objective skips
the teacher's forward), so distill / flow / both are different programs; seeds of one row are
the same programs (JAX's persistent compilation cache serves a later seed that starts after the
first compiled).

The sampler's and the fine-tuning's models run their blocks as one scan (`--scan-layers`, the default since
2026-12-05; `--no-scan-layers` runs them one by one, as every row measured before did): one lowering of each
kernel instead of one per block. On the H200 the scanned 1.3B sparse step compiled in 6.4 s where per-block ones
took 64-80 s (benchmarks/RESULTS.md, sessions 10 and 18); on the rows here (one H100, 2026-12-05, the shipped
teacher) a Table 1 row's sampler compiled in 5.6-10.5 s, its calibration took 0.6-17 s. Same values to round-off;
the captures for calibration are taken per block either way.

So rows are prepared ahead: `--workers` threads (default min(4, cores - 1)) calibrate, compile
and (Table 2) fine-tune the next rows while the main thread samples and scores the current one
in plan order (XLA compiles without the GIL; the device has 16 host cores). Results are those
of one row after the other (same programs, same inputs). Each row's `timing` in quality.json:
`wait_s` (the main thread waiting for its preparation), the preparation's own `calibrate_s`,
`compile_s`, `train_s` (absent where made before, e.g. by another row of the same settings) and
`prepare_s` (its whole preparation, waits for such shared parts included), then `sample_s`,
`score_s`; a row's printed seconds are the main thread's (wait, sampling, scoring). A row's
preparation is not started when it would end past the budget (judged by the longest
preparation of its table so far, for Table 2's first at least Table 1's), nor is a row whose
wall time would; preparations under way
when the call ends are waited for (`drain_s` of the call; calibrations they made are kept),
except that the main thread waits for a row's preparation only until the budget is spent: a
preparation still running then (on 2026-12-01 one stalled the H200 call for 6 min in a
"very slow compile" of a mask counter) is reported with every thread's stack, the results so
far are written and the process exits (status 3) without waiting for it (`stuck` of the call).
On the CPU (--small, 1 clip, 2 steps, levels 0.8 0.95, all 7 methods: 14 rows; back to back on the
2-core VM, busy with other jobs, load ~6): 150 s for the rows one after the other before this
layout, 124 s with --workers 1 and 107 s with --workers 2, every row's numbers identical; a row
there samples and scores in 0.2 s, so the gain is the skipped bisections and shared settings,
and the overlap of one row's compiles with the next one's calibration. Table 2 (4 small rows,
hybrid x distill / flow x 2 seeds, 4 steps, back to back, load ~2): 145 s with one training at
a time, 154 s with two at once (--train-workers 2), same numbers; the 2 cores are the limit
there (under load ~8 a pair at once took 184 s each).
On the GPU the threads share the device through `DeviceGate`: the first call of a sampler or
trainer program (its compile, with cuDNN attention's stream capture) and a whole fine-tuning
run take it alone, calibrations and sampling share it. Without it the H200 calls of 2026-12-02
failed at the fifth and the thirteenth row (a capture invalidated by another thread's work).
Every timing field includes the waits for the gate in its span (call 4 of 2026-12-02: a
`score_s` of 140 s was the main thread waiting while the next row fine-tuned).
Measured with it (H200, 2026-12-02, persistent compilation cache, 64 clips, 20 steps): Table 1
rows 8-50 s of main-thread time each, 15 rows in 370 s of one call; a Table 2 row with 100
fine-tuning steps of batch 8: 164 s of training for the first one of a fresh machine (the
trainer's compiles), 39-99 s for later ones (seed 1 of a row: 39-44 s), plus ~10 s of
sampling and scoring; the start of a call 19 s, 55-115 s where its first row is a
fine-tuned one (its compiles come first).

Command plan for the coordinator (device calls of at most 10 minutes; each a fresh machine):
keep the results in a folder the calls carry, e.g. `qrun/` ignored by `.git/info/exclude`:

    echo /qrun/ >> .git/info/exclude; mkdir -p qrun
    # each call, carry ["qrun"], timeout_s 600:
    mkdir -p $OUT/q && cp qrun/* $OUT/q/ 2>/dev/null; set -o pipefail; PYTHONUNBUFFERED=1 PYTHONPATH=. \\
      JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache python3 benchmarks/quality.py --out $OUT/q --part PART \\
      --budget-s 480 --clips 64 --steps 20 --guidance 1 --levels 0.8 0.9 0.95 --seeds 2 \\
      --finetune-steps 100 --batch 8 --lr 1e-4 2>&1 | tee $OUT/q/log.txt
    # then copy the call's q/quality.json and q/frames.npz back into qrun/

  Session 38 (2026-12-05, the shipped teacher, one H100) ran the whole study in four calls: `--part all
  --workers 1 --budget-s 470 --finetune-set data.procedural.render_on=accelerator` (451 s: Table 1's 21 rows
  and one fine-tuned row; start 32 s), then `--part table2` with budgets 480, 330 and 150 (435, 214, 96 s; a
  fine-tuned row 53-107 s of training, its start 76-88 s).
  Session 18 (2026-12-02) completed both tables (SVG2 at 90 %, the Top-k / Top-p students:
  two calls of PART=all, `--workers 1`, 349 s and 290 s; the first, on a fresh machine, started in
  27 s: its first row was a Table 1 one) and ran claim
  (c) on shifted fine-tuning data in another OUT: `--part table2 --objectives distill flow
  --tune-rules hybrid --seeds 2 --finetune-set data.procedural.max_shapes=1
  eval_procedural.max_shapes=3` (one-shape clips for fine-tuning; the gap curve on the
  teacher's clips, the samples on the study's clips; 417 s + 106 s, ~100-135 s a row).
  Session 20 ran claim (c) on motion the teacher never saw and its control, two OUTs:
  `--part table2 --objectives distill flow --tune-rules hybrid --seeds 2 --finetune-steps 300
  --finetune-set data.procedural.render_on=accelerator [data.procedural.motion_scale=2.5
  eval_procedural.motion_scale=1]` (8 rows in two calls, 500 s + 311 s, the second on the
  first's warm machine): with the clips rendered on the GPU a 300-step row trained in 49-132 s,
  where 100 steps rendered on the host took 80-134 s.
  JAX's persistent compilation cache (on in the H200 calls of 2026-12-01) lets a row's seed 1
  reuse the trainer programs compiled for its seed 0 when seed 0 compiled first, as with one
  training at a time (on the CPU: 81 s -> 41 s for a small fine-tuned row). The budget of 480 s
  leaves room for the preparations under way at the end (at most one training with the
  default). Read each call's per-row `timing` before planning the next. Then
  `python benchmarks/quality_figures.py --quality qrun --out docs/images` and update
  docs/quality.md; copy qrun/quality.json and qrun/frames.npz to docs/data/quality.json and
  docs/data/quality_frames.npz (a new checkout resumes the study from those two, copied back
  into qrun/ under their OUT names).
`--small` runs a CPU-sized version (tests).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

# A row's host time is compiles (12-30 s each on the H200) against < 1-5 s of sampling, and XLA's
# GPU autotuner times candidate kernels at every compile (the GPU suite: 412 -> 304 s without it,
# benchmarks/RESULTS.md): the default kernels here unless XLA_FLAGS picks a level. Set before JAX
# starts its backends; no effect on a CPU.
if "xla_gpu_autotune_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip()
# XLA's command buffers (CUDA graphs) capture streams at a program's first run, as cuDNN does
# (`DeviceGate`); off, so that only the gated first calls capture.
if "xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] += " --xla_gpu_enable_command_buffer="

import jax
import jax.numpy as jnp
import numpy as np

from sparge_jax.tools.capture import skipped_fraction, token_grid
from train.config import load_config
from train.generate import block_sparsity, capture_layers, generate, make_velocity
from train.heldout import heldout_batch
from train.loop import train
from train.model import DTYPES, abstract_model, init_on_device, wan_config
from train.objective import mse
from train.procedural import ProceduralClips, clip_spec, depth_to_space, latents_to_rgb
from train.report import evenly_spaced
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
RUN_SETTINGS = ("device", "teacher", "clips", "sampler_steps", "guidance", "finetune_steps", "batch", "lr",
                "latent_shape", "finetune_set", "scan_layers")
RUN_SETTING_DEFAULTS = {"finetune_set": [], "scan_layers": False}  # what results written before a setting existed had
STRIP_FRAMES = 4


def with_sparse(model_settings, sparse: dict):
    """The model section of a train config with `sparse` (a settings dict, `METHODS`'s form)
    merged into its `overrides["sparse"]`."""
    overrides = dict(model_settings.overrides)
    overrides["sparse"] = {**overrides.get("sparse", {}), **sparse}
    return dataclasses.replace(model_settings, overrides=overrides)


def bisect_knob(measure, lo: float, hi: float, target: float, steps: int) -> tuple[float, float, bool]:
    """(knob, its sparsity, reached): the knob in [lo, hi] whose `measure` (a sparsity that falls as
    the knob grows) is the smallest found >= target after `steps` bisection steps; `hi` itself where it
    reaches the target (e.g. target 0: every block kept). Where `lo` itself falls short, no bisection:
    (lo, its sparsity, False)."""
    knob, achieved = lo, measure(lo)
    reached = achieved >= target
    if reached:
        densest = measure(hi)
        if densest >= target:
            return hi, densest, True
    for _ in range(steps if reached else 0):
        mid = (lo + hi) / 2
        s = measure(mid)
        if s >= target:
            lo, knob, achieved = mid, mid, s
        else:
            hi = mid
    return knob, achieved, reached


def default_device():
    """The device new arrays go to: `jax.default_device` where set (the tests' `cpu` marker), else the first."""
    return next(iter(jnp.zeros(()).devices()))


def settings_key(sparse: dict | None) -> str:
    return json.dumps(sparse, sort_keys=True)


class DeviceGate:
    """Shared / exclusive use of the GPU by the study's threads.

    Compiling or first running a program with cuDNN attention (every sampler and trainer program
    here: cross-attention, dense layers) captures a CUDA stream in global mode; any CUDA work of
    another thread meanwhile invalidates the capture (H200, 2026-12-02: "capturing stream has
    unjoined work", then CUDA_ERROR_STREAM_CAPTURE_INVALIDATED in the sampling thread). Such
    first calls take the gate alone (`exclusive`), in the order they asked for it; calibration
    and sampling share it (`shared`), and a shared use waits while an exclusive one is asked for."""

    def __init__(self):
        self._cond = threading.Condition()
        self._sharing = 0
        self._alone = False
        self._tickets = 0  # exclusive uses asked for
        self._served = 0  # exclusive uses begun

    @contextlib.contextmanager
    def shared(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._alone and self._served == self._tickets)
            self._sharing += 1
        try:
            yield
        finally:
            with self._cond:
                self._sharing -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cond:
            ticket = self._tickets
            self._tickets += 1
            self._cond.wait_for(lambda: not self._alone and self._sharing == 0 and self._served == ticket)
            self._alone = True
            self._served += 1
        try:
            yield
        finally:
            with self._cond:
                self._alone = False
                self._cond.notify_all()


class Study:
    """The teacher, the evaluation clips and the shared sampling / calibration / scoring code."""

    def __init__(self, args):
        size = (["data.procedural.frames=4", "data.procedural.height=64", "data.procedural.width=64",
                 "model.overrides.sparse.block_q=32", "model.overrides.sparse.block_k=16",
                 "model.compute_dtype=float32"] if args.small else [])
        self.base = [f"model.weights={TEACHER}", *size, f"model.overrides.scan_layers={str(args.scan_layers).lower()}"]
        self.cfg = load_config(TEACHER_CONFIG, self.base)
        self.args = args
        self.config = wan_config(self.cfg.model)
        self.spec = clip_spec(self.cfg.data.procedural, self.config.text_dim, self.config.in_dim)
        # made from the main thread: `jax.default_device` (the tests' `cpu` marker) is thread-local, so
        # the threads preparing rows set it as it is here (`on_device`); it keys jit's caches, so a
        # program compiled in a thread then serves the main thread
        self.device = default_device()
        self.default_device_setting = jax.config.jax_default_device
        self.velocities: dict = {}
        self.first_flow: dict = {}  # settings key -> flow loss of the teacher's params (the compiling call)
        self.mask_counters: dict = {}
        self.calibrations: dict = {}  # "method@target" -> `calibrate`'s result
        self.scored: set = set()  # settings keys of Table 1's rows done (their samples are not made again)
        self._captured = None
        self._lock = threading.Lock()
        self._key_locks: dict = {}
        self._training = threading.Semaphore(args.train_workers)
        self.gate = DeviceGate()

    def once(self, key) -> threading.Lock:
        """The lock of `key`: threads preparing rows that need one program or one calibration wait for
        the first of them instead of making it again."""
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def on_device(self):
        return jax.default_device(self.default_device_setting)

    def load(self):
        """Load the teacher and the clips (what rows are prepared from)."""
        args = self.args
        # `train` turns this on (same random bits); it keys the compile caches, so it is set before the
        # first compile: Table 1's samplers then serve Table 2's rows of the same call.
        jax.config.update("jax_threefry_gpu_kernel_lowering", True)
        self.parts, self.params = init_on_device(self.cfg.model, self.device)
        self.dtype = DTYPES[self.cfg.model.compute_dtype]
        clips = ProceduralClips(self.spec, args.clips + 2, seed=1, split="heldout")
        self.eval = clips.read(np.arange(args.clips))
        self.calibration = clips.read(np.arange(args.clips, args.clips + 2))
        self.noise = jax.random.normal(jax.random.key(0), self.eval["latents"].shape, jnp.float32)
        calls = args.clips * (1 if args.guidance == 1.0 else 2)  # rows of one velocity call while sampling
        self.flow_batch = heldout_batch(ProceduralClips(self.spec, calls, seed=2, split="heldout"), calls,
                                        self.cfg.objective.shift)

    def reference(self):
        """Sample the dense reference (compiling its sampler) and its held-out flow loss."""
        dense = self.velocity(None)
        with self.gate.exclusive():
            self.dense_flow_loss = self.flow_loss(dense, self.params)
        with self.gate.shared():
            self.dense = self.sample(dense, self.params)
        self.dense_pixels = self.decode(self.dense)

    @property
    def captured(self) -> list[dict]:
        """q, k, v of every layer on the calibration clips at noise levels 0.9 / 0.5 / 0.2 (made on first use)."""
        with self.once("captured"):
            if self._captured is None:
                with self.gate.exclusive():  # eager forwards: cuDNN attention's first calls
                    self._captured = [capture_layers(self.parts, self.params, self.calibration, s)
                                      for s in (0.9, 0.5, 0.2)]
        return self._captured

    def parts_for(self, sparse: dict):
        return abstract_model(with_sparse(self.cfg.model, sparse))[0]

    def velocity(self, sparse: dict | None):
        """The jitted velocity of the teacher (None) or of the model with `sparse` settings, one per settings."""
        key = settings_key(sparse)
        with self._lock:
            if key not in self.velocities:
                parts = self.parts if sparse is None else self.parts_for(sparse)
                run = make_velocity(parts, "dense" if sparse is None else "sparse", self.dtype)
                # every argument committed to one device: jit compiles again for a committed argument where it
                # saw an uncommitted one (the sampler's later steps), and for other param shardings (the trainer's)
                device = jax.sharding.SingleDeviceSharding(self.device)
                self.velocities[key] = lambda *args: run(*jax.device_put(args, device))
            return self.velocities[key]

    def compiled(self, sparse: dict) -> tuple[float, float | None]:
        """(the held-out flow loss of the teacher's params with `sparse` settings, its seconds or None
        where it was made before): the first call of `velocity(sparse)`, which compiles the
        sampler's program (once per settings, whichever thread asks first)."""
        key = settings_key(sparse)
        with self.once(("compile", key)):
            if key in self.first_flow:
                return self.first_flow[key], None
            tick = time.perf_counter()
            with self.gate.exclusive():
                self.first_flow[key] = self.flow_loss(self.velocity(sparse), self.params)
            return self.first_flow[key], time.perf_counter() - tick

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
        with self._lock:
            if key not in self.mask_counters:
                self.mask_counters[key] = self._mask_counter(config, field)
        stacked = [jnp.stack([c[name][i] for c in self.captured for name in c]) for i in range(3)]
        lock = self.once(("mask", key))

        def measure(x=1.0):
            with lock:  # the first call compiles: once, even when two threads calibrate one method
                return float(self.mask_counters[key](jnp.float32(x), *stacked))

        return measure

    def _mask_counter(self, config, field: str | None):
        """`mask_sparsity`'s jitted (knob, q, k, v) -> mean skipped fraction of `config` over the
        stacked captures (all of one size, so the fraction of all their block pairs)."""
        grid = token_grid(self.spec.latent_shape[:3], self.config.patch_size)

        @jax.jit
        def skipped(x, q, k, v):
            method = config.method if field is None else dataclasses.replace(config.method, **{field: x})
            one = lambda q, k, v: skipped_fraction(q, k, v, config.replace(method=method), grid, layer=0)
            return jnp.mean(jax.vmap(one)(q, k, v))  # the captures (layer, noise level) stacked

        return skipped

    def calibration_of(self, method: str, target: float) -> tuple[dict, float | None]:
        """(`calibrate(method, target)`, its seconds or None where it was made before or by another
        thread), made once per call (`calibrations` holds the earlier calls' too)."""
        name = f"{method}@{target}"
        with self.once(("calibrate", name)):
            if name in self.calibrations:
                return self.calibrations[name], None
            tick = time.perf_counter()
            self.captured  # made first, alone (`DeviceGate`)
            with self.gate.shared():
                self.calibrations[name] = self.calibrate(method, target)
            return self.calibrations[name], time.perf_counter() - tick

    def calibrate(self, method: str, target: float) -> dict:
        """Bisect the method's knob to the smallest sparsity >= target (a traced knob where
        `METHODS` names its field, else the eager `sparsity`); the chosen settings' sparsity,
        measured again with the concrete config (`mask_sparsity`), is the reported one.

        Where even the range's sparsest knob falls short of the target (SpargeAttn's similarity
        guard keeps every block of a rough q row or k column, so its sparsity has a ceiling; so
        have SVG's and Radial's masks on a small grid), that knob is kept, `reached` is False
        and the achieved value is the ceiling, below the target."""
        build, field, (lo, hi) = METHODS[method]
        if field is None:
            measure = lambda x: self.sparsity(build(x, target))
        else:
            measure = self.mask_sparsity(build(1.0, target), field)
        knob, calibrated, reached = bisect_knob(measure, lo, hi, target, self.args.bisect)
        sparse = build(knob, target)
        return {"sparse": sparse, "knob": knob, "calibrated": calibrated, "reached": reached,
                "sparsity": self.mask_sparsity(sparse)()}

    def score(self, velocity, params, flow: float | None = None) -> tuple[dict, dict]:
        """(metrics against the dense samples, timing) of the model behind `velocity` with `params`
        (`flow`: their held-out flow loss where known, e.g. from `compiled`)."""
        from skimage.metrics import structural_similarity

        tick = time.perf_counter()
        with self.gate.shared():
            if flow is None:
                flow = self.flow_loss(velocity, params)
            flowed = time.perf_counter()
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
        timing = {"sample_s": sampled - flowed, "score_s": time.perf_counter() - sampled + flowed - tick}
        return scores, timing

    def strip(self, latents) -> np.ndarray:
        """`STRIP_FRAMES` evenly spaced uint8 RGB frames of one clip's latents."""
        frames = latents_to_rgb(latents, self.spec.space_to_depth)
        return frames[evenly_spaced(len(frames), STRIP_FRAMES)]

    def prepare(self, row: tuple, target: float, workdir: Path) -> dict:
        """What `row` needs before it samples, made in a worker thread while earlier rows sample and
        score: its calibration at `target`, its sampler's compile (with the teacher's params'
        held-out flow loss; not for a free row whose settings are `scored` already) and, for a
        fine-tuned row, the training. Returns {"calibration", "flow" (None for a fine-tuned row
        or no compile), "params", "evaluations", "timing"}: the seconds of the
        parts this call made (a calibration or compile made before, or by another row's thread,
        is not timed again; waiting for it is in "prepare_s")."""
        with self.on_device():
            tick = time.perf_counter()
            kind, method, *rest = row
            calibration, seconds = self.calibration_of(method, target)
            timing = {} if seconds is None else {"calibrate_s": seconds}
            flow = None
            if kind == "tune" or settings_key(calibration["sparse"]) not in self.scored:
                flow, seconds = self.compiled(calibration["sparse"])
                if seconds is not None:
                    timing["compile_s"] = seconds
            ready = {"calibration": calibration, "flow": flow, "params": self.params, "evaluations": None}
            if kind == "tune":
                objective, seed = rest
                with self._training:  # at most `--train-workers` at once; waiting for a slot is in prepare_s
                    trained = time.perf_counter()
                    with self.gate.exclusive():
                        ready["params"], ready["evaluations"] = self.finetune(
                            calibration["sparse"], *OBJECTIVES[objective], seed, workdir)
                    timing["train_s"] = time.perf_counter() - trained
                ready["flow"] = None
            timing["prepare_s"] = time.perf_counter() - tick
            return {**ready, "timing": timing}

    def finetune(self, sparse: dict, distill: float, flow: float, seed: int, workdir: Path):
        result = train(self.finetune_config(sparse, distill, flow, seed, workdir), progress=False)
        return result.per_layer(result.state.params), result.evaluations

    def finetune_config(self, sparse: dict, distill: float, flow: float, seed: int, workdir: Path):
        """The trainer's config of a Table 2 row (`--finetune-set` last)."""
        sparse = with_sparse(self.cfg.model, sparse).overrides["sparse"]
        overrides = [*self.base, f"model.overrides.sparse={json.dumps(sparse)}",
                     f"objective.distill_weight={distill}", f"objective.flow_weight={flow}",
                     "objective.student_attention=sparse", f"steps={self.args.finetune_steps}",
                     f"optim.lr={self.args.lr}", "optim.warmup_steps=10", "optim.weight_decay=0.0",
                     "optim.ema_decay=null",  # the rows score the fine-tuned params themselves
                     f"data.batch_size={self.args.batch}", f"data.seed={100 + seed}", f"seed={seed}",
                     f"eval_every={max(1, self.args.finetune_steps // 5)}", "eval_examples=8",
                     f"log_every={self.args.finetune_steps}",
                     f"metrics_path={workdir / f'ft_{seed}_{distill}_{flow}.jsonl'}", *self.args.finetune_set]
        return load_config(TEACHER_CONFIG, overrides)


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
        below = "*" if r["sparsity"] < r["target"] else " "
        lines.append(f"{r['method']:<11} {r['target']:>6.2f} {r['sparsity']:>7.3f}{below} {r['psnr_db']:>8.2f} "
                     f"{r['ssim']:>6.3f} {r['rel_l2']:>7.3f} {r['flow_loss']:>7.4f}")
    if any(r["sparsity"] < r["target"] for r in results["free"]):
        lines.append("* below the target: the sparsest knob of the method's range does not reach it")
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


def teacher_fingerprint(directory: Path = TEACHER) -> str:
    """The first 16 hex digits of a SHA-256 over the teacher's files (names and bytes): rows
    measured on other weights are not resumed into the same results."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def load_results(path: Path, fresh: dict) -> dict:
    """The results of earlier calls at `path` (checked against this call's `fresh` settings), else `fresh`."""
    if not path.is_file():
        return fresh
    results = json.loads(path.read_text())
    there = {name: results.get(name, RUN_SETTING_DEFAULTS.get(name)) for name in RUN_SETTINGS}
    differ = [f"{name}: {there[name]!r} there vs {fresh[name]!r} now" for name in RUN_SETTINGS
              if there[name] != fresh[name]]
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
    p.add_argument("--finetune-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra trainer settings of Table 2's fine-tuning, e.g. data.procedural.max_shapes=1 "
                        "eval_procedural.max_shapes=3 (fine-tune on shifted clips; the samples are scored on the "
                        "study's clips either way, the gap curve on eval_procedural's)")
    p.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=True,
                   help="run the teacher's blocks as one scan when sampling and fine-tuning (one lowering of each "
                        "kernel instead of one per block: shorter compiles; the same values to round-off)")
    p.add_argument("--budget-s", type=float, default=float("inf"),
                   help="start no row that would end after this many seconds of the call")
    p.add_argument("--workers", type=int, default=max(1, min(4, (os.cpu_count() or 2) - 1)),
                   help="threads preparing the next rows (calibration, compiles, fine-tuning) while one "
                        "samples and scores")
    p.add_argument("--train-workers", type=int, default=1,
                   help="of those, how many may fine-tune at once (Table 2); more than one is untried on "
                        "the GPU and gained nothing on a 2-core CPU")
    args = p.parse_args(argv)
    if args.workers < 1 or args.train_workers < 1:
        p.error(f"--workers and --train-workers must be at least 1; got {args.workers} and {args.train_workers}")
    start = time.perf_counter()
    study = Study(args)
    try:  # refused here, not in a worker thread minutes later
        study.finetune_config({}, *OBJECTIVES["distill"], 0, Path(tempfile.gettempdir()))
    except ValueError as err:
        p.error(f"--finetune-set: {err}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    top = max(args.levels)
    fresh = {"device": default_device().device_kind, "teacher": teacher_fingerprint(), "clips": args.clips,
             "sampler_steps": args.steps,
             "guidance": args.guidance, "finetune_steps": args.finetune_steps, "batch": args.batch, "lr": args.lr,
             "latent_shape": list(study.spec.latent_shape), "finetune_set": args.finetune_set,
             "scan_layers": args.scan_layers,
             "calibrations": {}, "free": [], "tuned": [],
             "not_run": [], "calls": []}
    results = load_results(out / "quality.json", fresh)
    frames = {}
    if (out / "frames.npz").is_file():
        with np.load(out / "frames.npz") as saved:
            frames = dict(saved)
    rows = [row for row in plan(args, args.part) if row not in done_rows(results)]
    call = {"part": args.part, "ran": [], "not_run": []}
    target_of = lambda row: row[2] if row[0] == "free" else top
    pool = ThreadPoolExecutor(args.workers, thread_name_prefix="prepare")
    prepared: dict = {}  # row -> future of `Study.prepare`
    longest: dict = {}  # kind -> the longest row of this call (its wait for its preparation, sampling, scoring)
    longest_prepare: dict = {}  # kind -> the longest preparation of this call
    workdir = Path(tempfile.mkdtemp())

    def prepare_ahead(i: int) -> None:
        """Start preparing rows i .. i + workers - 1; none whose preparation would end past the budget
        (judged by the longest of its table so far; a fine-tuned row's is at least a free row's)."""
        for row in rows[i:i + args.workers]:
            expected = longest_prepare.get(row[0], longest_prepare.get("free", 0.0))
            if row not in prepared and time.perf_counter() - start + expected <= args.budget_s:
                prepared[row] = pool.submit(study.prepare, row, target_of(row), workdir)

    try:
        if rows:
            study.load()
            study.calibrations.update(results["calibrations"])
            study.scored.update(settings_key(r["sparse"]) for r in results["free"])
            prepare_ahead(0)  # calibrating and compiling while the dense reference is sampled
            study.reference()
            dense_rms = float(np.sqrt(np.mean(np.square(study.dense))))
            if "dense_rms" in results and abs(dense_rms / results["dense_rms"] - 1) > 1e-4:
                print(f"warning: the dense samples differ from the earlier calls' (rms {dense_rms} vs "
                      f"{results['dense_rms']}); rows of different calls are scored against different references")
            results.setdefault("dense_rms", dense_rms)
            results.setdefault("dense_flow_loss", study.dense_flow_loss)
            frames.setdefault("dense", study.strip(study.dense[0]))
            call["start_s"] = time.perf_counter() - start
            print(f"start: {call['start_s']:.0f} s (dense flow loss {study.dense_flow_loss:.4f})", flush=True)
        for i, row in enumerate(rows):
            kind, method, *rest = row
            tick = time.perf_counter()
            prepare_ahead(i)
            if row not in prepared or tick - start + longest.get(kind, 0.0) > args.budget_s:
                call["not_run"].append(row)
                continue
            try:
                left = args.budget_s - (tick - start)
                ready = prepared[row].result(timeout=max(1.0, left) if np.isfinite(left) else None)
            except FutureTimeout:  # the budget is spent and this preparation has not ended
                call["stuck"] = row
                call["not_run"].append(row)
                print(f"{'/'.join(map(str, row))}: still preparing when the budget of {args.budget_s:.0f} s ran out; "
                      "where every thread is:", flush=True)
                faulthandler.dump_traceback(file=sys.stdout, all_threads=True)
                break
            target = target_of(row)
            timing = {"wait_s": time.perf_counter() - tick, **ready["timing"]}
            longest_prepare[kind] = max(longest_prepare.get(kind, 0.0), timing["prepare_s"])
            calibration = results["calibrations"][f"{method}@{target}"] = ready["calibration"]
            velocity = study.velocity(calibration["sparse"])
            record = {"sparsity": calibration["sparsity"], "sparse": calibration["sparse"]}
            if kind == "free":
                same = [r for r in results["free"] if settings_key(r["sparse"]) == settings_key(calibration["sparse"])]
                if same:  # e.g. a target beyond the method's ceiling: the settings of a row done, its samples
                    scores = {name: same[0][name] for name in ("psnr_db", "ssim", "rel_l2", "flow_loss")}
                    record["same_settings_as"] = [same[0]["method"], same[0]["target"]]
                    if f"{same[0]['method']}_{same[0]['target']}" in frames:
                        frames[f"{method}_{target}"] = frames[f"{same[0]['method']}_{same[0]['target']}"]
                else:
                    scores, score_timing = study.score(velocity, study.params, ready["flow"])
                    timing.update(score_timing)
                    frames[f"{method}_{target}"] = scores.pop("frames")
                results["free"].append({"method": method, "target": target, **record, **scores, "timing": timing})
                study.scored.add(settings_key(calibration["sparse"]))
            else:
                objective, seed = rest
                scores, score_timing = study.score(velocity, ready["params"])
                timing.update(score_timing)
                frames[f"tuned_{method}_{objective}_{seed}"] = scores.pop("frames")
                results["tuned"].append({"rule": method, "objective": objective, "seed": seed, **record,
                                         "evaluations": ready["evaluations"], **scores, "timing": timing})
            seconds = time.perf_counter() - tick
            longest[kind] = max(longest.get(kind, 0.0), seconds)
            call["ran"].append(row)
            below = "" if record["sparsity"] >= target else f" (below the target {target}: the method's ceiling)"
            print(f"{'/'.join(map(str, row))}: sparsity {record['sparsity']:.3f}{below} "
                  f"PSNR {scores['psnr_db']:.2f} dB "
                  f"({seconds:.0f} s: {', '.join(f'{k} {v:.1f}' for k, v in timing.items())}; "
                  f"{time.perf_counter() - start:.0f} s total)", flush=True)
            (out / "quality.json").write_text(json.dumps(results, indent=1, default=str))
            np.savez_compressed(out / "frames.npz", **frames)
    finally:  # rows not started are not prepared; preparations under way are waited for (not a stuck one)
        draining = time.perf_counter()
        pool.shutdown(wait="stuck" not in call, cancel_futures=True)
        call["drain_s"] = time.perf_counter() - draining
    for row, future in prepared.items():  # calibrations of rows prepared but not run serve the next call
        if future.done() and not future.cancelled() and future.exception() is None:
            results["calibrations"].setdefault(f"{row[1]}@{target_of(row)}", future.result()["calibration"])
    results["not_run"] = [row for row in plan(args, "all") if row not in done_rows(results)]  # both tables
    call["wall_s"] = time.perf_counter() - start
    results["calls"].append(call)
    (out / "quality.json").write_text(json.dumps(results, indent=1, default=str))
    if frames:
        np.savez_compressed(out / "frames.npz", **frames)
    print(table(results))
    return results


if __name__ == "__main__":
    if "stuck" in main()["calls"][-1]:  # its thread would hold the interpreter's exit; the results are written
        sys.stdout.flush()
        os._exit(3)

"""Held-out evaluation: student-teacher velocity gap and flow-matching loss on a fixed batch.

The batch, its noise and its noise levels are fixed once (procedural held-out clips, noise
from `seed`, sigmas evenly spread over the training schedule's quantiles), so the numbers of
different steps, runs and students are comparable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparge_jax.sampling import guided, shift_sigma
from train.generate import layer_sparsity
from train.model import ModelParts, velocity_fn
from train.objective import mse, uncaptioned
from train.procedural import ProceduralClips
from train.schedule import noisy_latents, timesteps

SPARSITY_SIGMA = 0.5  # noise level of the held-out block-sparsity measurement


def heldout_batch(source: ProceduralClips, examples: int, shift: float, seed: int = 0) -> dict[str, jax.Array]:
    """Fixed evaluation inputs: clean "latents" x0 `(n, F, H, W, C)`, "context" `(n, L, D)`,
    "noise" like x0 and "sigma" `(n,)` float32 at the shifted midpoints of n equal
    quantiles of U[0, 1) (the training distribution)."""
    batch = source.read(np.arange(examples))
    noise = jax.random.normal(jax.random.key(seed), batch["latents"].shape, jnp.float32)
    sigma = shift_sigma((np.arange(examples, dtype=np.float32) + 0.5) / examples, shift)
    return {"latents": jnp.asarray(batch["latents"]), "context": jnp.asarray(batch["context"]),
            "noise": noise, "sigma": jnp.asarray(sigma, jnp.float32)}


def make_evaluator(parts: ModelParts, student_mode: str, compute_dtype, guidance: float):
    """A jitted `(params, teacher_params, batch) -> {"heldout_gap", "heldout_rel_gap",
    "heldout_flow_loss", "heldout_uncond_gap", "heldout_guided_gap"}` (float32 scalars):
    MSE(v_student, v_teacher), that over mean(v_teacher^2), and MSE(v_student, noise - x0), on
    `heldout_batch` inputs under their captions; MSE(v_student, v_teacher) of the unconditional
    branch (the same inputs under an all-zero context, the negative of classifier-free
    guidance); and that of the guided velocities `g v_cond - (g - 1) v_uncond` at `guidance` g,
    what a guided sampler integrates (its error mixes both branches' errors, so it can grow
    while each branch's shrinks)."""

    @jax.jit
    def evaluate(params, teacher_params, batch):
        x0, noise, sigma = batch["latents"], batch["noise"], batch["sigma"]
        x_t, t = noisy_latents(x0, noise, sigma), timesteps(sigma)
        student = velocity_fn(parts, params, student_mode, compute_dtype)
        teacher = velocity_fn(parts, teacher_params, "dense", compute_dtype)
        v_student, v_teacher = student(x_t, t, batch), teacher(x_t, t, batch)
        blank = uncaptioned(batch)
        u_student, u_teacher = student(x_t, t, blank), teacher(x_t, t, blank)
        gap = mse(v_student, v_teacher)
        return {"heldout_gap": gap, "heldout_rel_gap": gap / jnp.mean(jnp.square(v_teacher)),
                "heldout_flow_loss": mse(v_student, noise - x0),
                "heldout_uncond_gap": mse(u_student, u_teacher),
                "heldout_guided_gap": mse(guided(v_student, u_student, guidance), guided(v_teacher, u_teacher, guidance))}

    return evaluate


class HeldoutEvaluation:
    """`(params, teacher_params) -> dict of float` on `examples` held-out clips of `spec`
    (`ProceduralClips` split "heldout"), fixed at construction; `guidance`: the scale of
    `heldout_guided_gap` (`make_evaluator`)."""

    def __init__(self, parts: ModelParts, spec, examples: int, *, student_mode: str, compute_dtype, shift: float,
                 seed: int = 0, guidance: float = 5.0):
        self.batch = heldout_batch(ProceduralClips(spec, examples, seed, split="heldout"), examples, shift, seed)
        self.evaluate = make_evaluator(parts, student_mode, compute_dtype, guidance)
        self.layer_sparsity = jax.jit(lambda params, batch: layer_sparsity(parts, params, batch, SPARSITY_SIGMA,
                                                                             dtype=compute_dtype))
        self.student_mode = student_mode

    def __call__(self, params, teacher_params) -> dict[str, float]:
        out = self.evaluate(params, teacher_params, self.batch)
        return {**{name: float(value) for name, value in out.items()},
                "heldout_block_sparsity": self.block_sparsity(params)}

    def block_sparsity(self, params) -> float:
        """The student's achieved block sparsity on the held-out clips at noise level
        `SPARSITY_SIGMA`, in the compute dtype as the training probe
        (`train.generate.layer_sparsity`; dense layers, and a dense student, count as skipping
        nothing)."""
        if self.student_mode == "dense":
            return 0.0
        return float(np.mean(np.asarray(self.layer_sparsity(params, self.batch), np.float64)))

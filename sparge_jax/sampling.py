"""Flow-matching samplers for Wan: shifted sigma schedule, Euler and UniPC (bh2, order <= 2).

Convention: x_s = (1 - s) x0 + s noise, s from 1 (noise) to 0 (data); the model predicts
the velocity v = noise - x0 at timestep 1000 * s. All state is fp32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

SOLVERS = ("euler", "unipc")


SIGMA_MAX = 0.999  # 1 - 1/1000: the noisiest level of Wan's 1000-step training schedule


def shift_sigma(sigma, shift: float):
    """Wan's shift s' = shift * s / (1 + (shift - 1) * s) of sigmas in [0, 1] (NumPy or jax arrays,
    same shape and dtype); shift > 1 moves mass towards 1 (noisier). Training draws and the
    sampler's schedule both use it."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def shifted_sigmas(steps: int, shift: float) -> np.ndarray:
    """float64 `(steps + 1,)`: s_i = shift u_i / (1 + (shift - 1) u_i) with u_i evenly spaced from
    SIGMA_MAX down to 0 (excluded), then a final 0."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int; got {steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be positive; got {shift!r}")
    u = np.linspace(SIGMA_MAX, 0.0, steps + 1)[:-1]
    return np.append(shift_sigma(u, shift), 0.0)


def guided(v_cond: jax.Array, v_uncond: jax.Array, scale: float) -> jax.Array:
    """Classifier-free guidance: v_uncond + scale (v_cond - v_uncond)."""
    return v_uncond + scale * (v_cond - v_uncond)


def euler_step(x: jax.Array, v: jax.Array, s: float, s_next: float) -> jax.Array:
    """x_{s_next} = x_s + (s_next - s) v."""
    return x + (s_next - s) * v


def _lambda(s: float) -> float:
    """log-SNR log((1 - s) / s) of the flow schedule (s in (0, 1))."""
    return math.log(1.0 - s) - math.log(s)


@dataclasses.dataclass
class UniPC:
    """UniPC multistep (B(h) = e^h - 1 variant, data prediction) of order <= 2 with its
    corrector, for the flow schedule (alpha_s = 1 - s, sigma_s = s). The last step is first order.

    Use: for each i, `x = solver.step(i, x, v_i)` with v_i the velocity at (x, sigmas[i]).
    """

    sigmas: np.ndarray
    order: int = 2
    x0_preds: list = dataclasses.field(default_factory=list)
    last_x: jax.Array | None = None

    def __post_init__(self):
        if self.order not in (1, 2):
            raise ValueError(f"order must be 1 or 2; got {self.order!r}")

    def _update(self, i: int, x, m0, m_prev, order: int, m_new=None):
        """Move x from sigmas[i] to sigmas[i + 1] using data predictions; with m_new (the
        prediction at the new point) this is the corrector, otherwise the predictor."""
        s0, t = float(self.sigmas[i]), float(self.sigmas[i + 1])
        if t == 0.0:
            return m0
        h = _lambda(t) - _lambda(s0)
        hh = -h
        h_phi_1 = math.expm1(hh)
        b_h = math.expm1(hh)
        base = (t / s0) * x - (1.0 - t) * h_phi_1 * m0
        terms = []
        if order == 2 and m_prev is not None:
            rk = (_lambda(float(self.sigmas[i - 1])) - _lambda(s0)) / h
            d1 = (m_prev - m0) / rk
            if m_new is None:
                terms.append(0.5 * d1)
            else:
                h_phi_k = h_phi_1 / hh - 1.0
                b = [h_phi_k / b_h, (h_phi_k / hh - 0.5) * 2.0 / b_h]
                rhos = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), np.array(b))
                terms += [rhos[0] * d1, rhos[1] * (m_new - m0)]
        elif m_new is not None:
            terms.append(0.5 * (m_new - m0))
        return base - (1.0 - t) * b_h * sum(terms) if terms else base

    def step(self, i: int, x: jax.Array, v: jax.Array) -> jax.Array:
        """x at sigmas[i] (and its velocity v) -> x at sigmas[i + 1]; corrects x first when i > 0."""
        s = float(self.sigmas[i])
        m = x - s * v
        if i > 0:
            prev = self.x0_preds[-2] if len(self.x0_preds) > 1 else None
            x = self._update(i - 1, self.last_x, self.x0_preds[-1], prev, min(self.order, i), m_new=m)
        self.x0_preds = (self.x0_preds + [m])[-2:]
        self.last_x = x
        final = i == len(self.sigmas) - 2
        order = 1 if final else min(self.order, i + 1)
        prev = self.x0_preds[-2] if len(self.x0_preds) > 1 else None
        return self._update(i, x, m, prev, order)


def sample(velocity: Callable[[jax.Array, float, int], jax.Array], noise: jax.Array, sigmas: np.ndarray, *,
           solver: str = "unipc", on_step: Callable[[int, jax.Array], None] | None = None) -> jax.Array:
    """Integrate from `noise` (at sigmas[0]) to sigmas[-1] = 0.

    velocity(x, s, i) returns the (guided) velocity at x, noise level s, step i.
    on_step(i, x) is called after each step (e.g. to time it).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}")
    x = noise.astype(jnp.float32)
    unipc = UniPC(np.asarray(sigmas)) if solver == "unipc" else None
    for i in range(len(sigmas) - 1):
        v = velocity(x, float(sigmas[i]), i).astype(jnp.float32)
        x = unipc.step(i, x, v) if unipc else euler_step(x, v, float(sigmas[i]), float(sigmas[i + 1]))
        if on_step is not None:
            on_step(i, x)
    return x

"""Mosaic GPU (Hopper) block-sparse flash-attention forward kernel.

Persistent CTAs (one per SM), each walking every num_ctas-th work item
(q block, head, batch). `block_q / 64` compute warpgroups own 64 q rows each; one
memory warpgroup loads q (double-buffered) and streams the kept K/V blocks
`kv_indices[b, h, q_block, :kv_counts]` through TMA into a ring of shared-memory slots
that runs on across items, so the next item's loads overlap this item's work.
One step of the compute loop covers `keys_per_step` keys: with the default 128 it
takes two consecutive list entries (two 64-key mask blocks, loaded into the two halves
of one slot), so S = q Kᵀ and P V are 64x128 wgmmas. The trip count is read from
`kv_counts` at run time. Only the last step can hold keys that must not count (a
second half past the end of the list, or keys past `seq_k`: the tail block is the
largest index, hence the last entry), so only that step is masked.

Shapes: q `(batch, seq_q, heads, head_dim)`, k/v `(batch, seq_k, heads, head_dim)`, bf16
or fp16, head_dim 64 or 128; out like q; lse `(batch, heads, seq_q)` fp32, -inf (and
out 0) on rows whose q block keeps no k block. Any sequence length, with no padding of
q/k/v: TMA loads past the end fill zeros, TMA stores past the end are dropped; for a
length that is not a multiple of 8 the last block goes through zero-padded side buffers
(`pallas_kernels.mosaic_gpu.tma`). The lse is written
padded to whole q blocks and sliced: a 1-D TMA store past the end of a (batch, head) row
is not dropped on the GPU but lands in the next row.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.backend import check_inputs
from pallas_kernels.block_index import BlockIndex
from pallas_kernels.mosaic_gpu.common import (
    ROWS,
    check_supported,
    interpret_params,
    mma,
    split_registers,
    staging_tiles,
    tile_smem,
)
from pallas_kernels.mosaic_gpu.tma import install as install_ragged_tma
from pallas_kernels.mosaic_gpu.tma import bind_kernel, is_ragged, last_block, load_rows, merge_last_block, store_rows

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_STAGES = {64: 3, 128: 2}  # K/V ring depth per keys_per_step (shared memory holds 2 x 64 KB slots at 128)


def _default_num_ctas(interpret: bool) -> int:
    """One persistent CTA per SM on the GPU; 2 in interpret mode (exercises several items per CTA)."""
    return 2 if interpret else jax.devices()[0].core_count


def sparge_forward_kernel(
    *refs, num_compute, block_q, block_k, seq_k, sm_scale, stages, per_step, pingpong, ragged_q, ragged_k,
):
    """Persistent: CTA `c` handles work items c, c + num_ctas, ... (item = q block, head, batch).

    The K/V ring runs on one global step counter across items, and q is double-buffered,
    so the memory warpgroup loads the next item's q and K/V while this item computes.
    Refs: q, k, v, kv_indices, kv_counts, [q_last if ragged_q], [k_last, v_last if
    ragged_k], out, lse, [out_last if ragged_q], then the scratch buffers and barriers.
    """
    q_ref, k_ref, v_ref, idx_ref, cnt_ref, *refs = refs
    q_last = refs.pop(0) if ragged_q else None
    k_last, v_last = (refs.pop(0), refs.pop(0)) if ragged_k else (None, None)
    out_ref, lse_ref, *refs = refs
    out_last = refs.pop(0) if ragged_q else None
    (q_smem, k_smem, v_smem, lse_smem, staging, q_ready, q_free, k_ready, v_ready, slot_free, schedule) = refs
    cta, num_ctas = lax.axis_index("c"), lax.axis_size("c")
    wg = lax.axis_index("wg")
    _, num_heads, num_q_blocks, num_k_blocks = idx_ref.shape
    num_items = idx_ref.shape[0] * num_heads * num_q_blocks
    my_items = (num_items - cta + num_ctas - 1) // num_ctas
    tile_k = per_step * block_k

    def item(i):
        """(q block, head, batch, kept count, steps) of this CTA's i-th item."""
        w = cta + i * num_ctas
        qb, h, b = lax.rem(w, num_q_blocks), lax.rem(w // num_q_blocks, num_heads), w // (num_q_blocks * num_heads)
        count = cnt_ref[b, h, qb]
        return qb, h, b, count, (count + per_step - 1) // per_step

    def entry(b, h, qb, j):
        """Block index of list entry j (clamped into the list; padding repeats the last kept block)."""
        return idx_ref[b, h, qb, jnp.minimum(j, num_k_blocks - 1)]

    @pl.when(wg < num_compute)
    def _compute():
        split_registers(num_compute, True)
        p_tile = staging[0].at[wg] if staging else None
        head_dim = q_smem.shape[-1]
        scale2 = sm_scale * _LOG2E
        shape = (ROWS, tile_k)

        def sync():
            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(schedule)

        def attend(i, base):
            qb, h, b, count, steps = item(i)
            buf = lax.rem(i, 2)
            q_tile = q_smem.at[buf, wg]
            plgpu.barrier_wait(q_ready.at[buf * num_compute + wg])

            def key_mask(j, s):
                """-inf on keys of step j that are past seq_k or past the end of the list."""
                col = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
                pos = None
                for half in range(per_step):
                    e = j * per_step + half
                    start = jnp.where(e < count, entry(b, h, qb, e) * block_k, seq_k) - half * block_k
                    pos = col + start if pos is None else jnp.where(col < half * block_k, pos, col + start)
                return jnp.where(pos < seq_k, s, -jnp.inf)

            def values(p16, slot):
                """P V for this step as a fresh fp32 array (the wgmma has completed on return)."""

                def run(pv_ref):
                    mma(pv_ref, p16, v_smem.at[slot], p_tile)
                    return pv_ref[...]

                return pl.run_scoped(run, plgpu.ACC((ROWS, head_dim), jnp.float32))

            def step(j, carry, masked):
                acc, m, l = carry
                slot = lax.rem(base + j, stages)
                plgpu.barrier_wait(k_ready.at[slot])

                def scores(s_ref):
                    plgpu.wgmma(s_ref, q_tile, k_smem.at[slot].transpose((1, 0)))
                    if pingpong:
                        sync()
                    return s_ref[...]

                s = pl.run_scoped(scores, plgpu.ACC(shape, jnp.float32))
                if masked:
                    s = key_mask(j, s)
                m_new = jnp.maximum(m, s.max(axis=1) * scale2)
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s * scale2 - lax.broadcast_in_dim(m_new, shape, [0]))
                l = l * alpha + p.sum(axis=1)
                p16 = p.astype(q_smem.dtype)
                if pingpong:
                    plgpu.barrier_arrive(schedule)
                plgpu.barrier_wait(v_ready.at[slot])
                if pingpong:
                    plgpu.barrier_wait(schedule)
                pv = values(p16, slot)
                plgpu.barrier_arrive(slot_free.at[slot])
                return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv, m_new, l

            m = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc = plgpu.layout_cast(jnp.zeros((ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA)
            needs_mask = per_step > 1 or seq_k % block_k != 0
            unmasked_steps = jnp.maximum(steps - 1, 0) if needs_mask else steps
            # Warpgroup 1 starts one schedule phase ahead; warpgroup 0 closes the item with
            # the matching phase, so no item waits on the next one's steps.
            if pingpong:
                pl.when(wg == 1)(sync)
            carry = lax.fori_loop(0, unmasked_steps, functools.partial(step, masked=False), (acc, m, l))
            if needs_mask:
                carry = lax.fori_loop(unmasked_steps, steps, functools.partial(step, masked=True), carry)
            if pingpong:
                pl.when(wg == 0)(sync)
            acc, m, l = carry

            # The output leaves through the q tile (its last wgmma has completed); the
            # tile is handed back once the TMA store has read it.
            kept = l > 0.0
            inv_l = 1.0 / jnp.where(kept, l, 1.0)
            q_tile[...] = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])).astype(q_smem.dtype)
            lse_smem[wg] = jnp.where(kept, m * _LN2 + jnp.log(jnp.where(kept, l, 1.0)), -jnp.inf)
            plgpu.commit_smem()
            r0 = qb * block_q + wg * ROWS
            store_rows(q_tile, out_ref, out_last, b, h, qb, block_q, wg * ROWS, ROWS)
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(r0, ROWS)], commit_group=False)
            plgpu.commit_smem_to_gmem_group()
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            plgpu.barrier_arrive(q_free.at[buf])
            return base + steps

        lax.fori_loop(0, my_items, attend, jnp.int32(0))

    @pl.when(wg == num_compute)
    def _memory():
        split_registers(num_compute, False)

        def load_q(i, buf, qb, h, b):
            @pl.when(i >= 2)
            def _():
                plgpu.barrier_wait(q_free.at[buf])

            for w in range(num_compute):
                load_rows(q_ref, q_last, b, h, qb, block_q, w * ROWS, ROWS, q_smem.at[buf, w],
                          q_ready.at[buf * num_compute + w])

        def stream_item(i, t):
            qb, h, b, _, steps = item(i)
            load_q(i, lax.rem(i, 2), qb, h, b)

            @pl.loop(0, steps)
            def _fetch(j):
                slot = lax.rem(t + j, stages)

                @pl.when(t + j >= stages)
                def _():
                    plgpu.barrier_wait(slot_free.at[slot])

                for half in range(per_step):
                    kb = entry(b, h, qb, j * per_step + half)
                    part = pl.ds(half * block_k, block_k)
                    load_rows(k_ref, k_last, b, h, kb, block_k, 0, block_k, k_smem.at[slot, part], k_ready.at[slot])
                    load_rows(v_ref, v_last, b, h, kb, block_k, 0, block_k, v_smem.at[slot, part], v_ready.at[slot])

            return t + steps

        total = lax.fori_loop(0, my_items, stream_item, jnp.int32(0))

        # Observe the last hand-backs, so no barrier phase is left unwaited.
        @pl.loop(jnp.maximum(total - stages, 0), total)
        def _drain_slots(t):
            plgpu.barrier_wait(slot_free.at[lax.rem(t, stages)])

        @pl.loop(jnp.maximum(my_items - 2, 0), my_items)
        def _drain_q(i):
            plgpu.barrier_wait(q_free.at[lax.rem(i, 2)])


def forward(
    q, k, v, index: BlockIndex, *, block_q: int, block_k: int, sm_scale: float, interpret: bool = False,
    keys_per_step: int = 128, pingpong: bool = True, num_ctas: int | None = None,
):
    """Block-sparse attention forward over the kept blocks of `index`: (out, lse).

    Args:
      q: `(batch, seq_q, heads, head_dim)` bf16/fp16; k, v: `(batch, seq_k, heads, head_dim)`, same dtype.
      index: `BlockIndex` of the `(batch, heads, ceil(seq_q/block_q), ceil(seq_k/block_k))` mask.
      block_q: 64 or 128 (one or two compute warpgroups); block_k: 64.
      interpret: run on CPU through Mosaic GPU interpret mode.
      keys_per_step: keys per loop step, 64 (one list entry) or 128 (two entries, the default).
      pingpong: offset the two compute warpgroups so one's softmax overlaps the other's wgmmas.
      num_ctas: persistent CTAs (each walks every num_ctas-th (q block, head, batch) item);
        default: the GPU's SM count (2 in interpret mode).
    Returns:
      out `(batch, seq_q, heads, head_dim)` in q.dtype and lse `(batch, heads, seq_q)` fp32.
    """
    check_inputs(q, k, v, index, block_q, block_k)
    check_supported(q, k, block_q, block_k, "forward")
    if keys_per_step not in (block_k, 2 * block_k):
        raise ValueError(f"keys_per_step must be {block_k} or {2 * block_k}; got {keys_per_step}")
    batch, seq_q, heads, head_dim = q.shape
    num_compute = block_q // ROWS
    per_step = keys_per_step // block_k
    stages = _STAGES[keys_per_step]
    pingpong = pingpong and num_compute == 2
    ragged_q, ragged_k = is_ragged(seq_q), is_ragged(k.shape[1])
    if ragged_q or ragged_k:
        install_ragged_tma()
    kernel = bind_kernel(
        sparge_forward_kernel, num_compute=num_compute, block_q=block_q, block_k=block_k, seq_k=k.shape[1],
        sm_scale=float(sm_scale), stages=stages, per_step=per_step, pingpong=pingpong,
        ragged_q=ragged_q, ragged_k=ragged_k,
    )
    stream = tile_smem((stages, keys_per_step, head_dim), k.dtype)
    side_in = ([last_block(q, block_q)] if ragged_q else []) + (
        [last_block(k, block_k), last_block(v, block_k)] if ragged_k else [])
    side_out = [jax.ShapeDtypeStruct((batch, block_q, heads, head_dim), q.dtype)] if ragged_q else []
    out, lse, *out_last = plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, index.num_q_blocks * block_q), jnp.float32),
            *side_out,
        ),
        scratch_types=[
            tile_smem((2, num_compute, ROWS, head_dim), q.dtype),
            stream,
            stream,
            plgpu.SMEM((num_compute, ROWS), jnp.float32),
            staging_tiles(interpret, 1, (num_compute, ROWS, keys_per_step), q.dtype),
            plgpu.Barrier(num_barriers=2 * num_compute),
            plgpu.Barrier(num_arrivals=num_compute, num_barriers=2),
            plgpu.Barrier(num_arrivals=per_step, num_barriers=stages),
            plgpu.Barrier(num_arrivals=per_step, num_barriers=stages),
            plgpu.Barrier(num_arrivals=num_compute, num_barriers=stages),
            plgpu.Barrier(num_arrivals=num_compute),
        ],
        grid=(min(num_ctas or _default_num_ctas(interpret), batch * heads * index.num_q_blocks),),
        grid_names=("c",),
        num_threads=num_compute + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(interpret),
    )(q, k, v, index.kv_indices, index.kv_counts, *side_in)
    if ragged_q:
        out = merge_last_block(out, out_last[0])
    return out, lse[..., :seq_q]

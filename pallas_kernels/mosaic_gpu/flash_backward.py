"""Mosaic GPU (Hopper) block-sparse flash-attention backward: a dQ and a dK/dV kernel, or one
fused dQ/dK/dV kernel (`backward(..., fused=True)`); by default (`fused=None`) the fused one
where a head's fp32 dQ slice fits `FUSED_DQ_SLICE_BYTES`, else the mask's kept density picks one
of the two at run time (`uses_fused`).

All kernels walk only kept blocks, read from a `BlockIndex`:
  * dQ: one CTA per (batch, head, q block); its compute warpgroups own 64 rows each
    and stream the kept K/V blocks `kv_indices[b, h, q_block, :kv_counts]`.
  * dK/dV: one CTA per (batch, head, k block); it streams the q blocks that keep it,
    `q_indices[b, h, k_block, :q_counts]` (the transposed lists), each compute
    warpgroup taking 64 rows of every q block; the partial dK/dV of the warpgroups
    are summed through shared memory at the end.
  * fused dQ/dK/dV: the dK/dV kernel that also computes, for each q block it visits,
    every warpgroup's dQ partial dS K (64 rows, fp32) and adds it into a zeroed fp32
    `(batch, seq_q padded to whole q blocks, heads, head_dim)` buffer with a TMA reduce
    store; the wrapper scales that and casts it to q.dtype. 5 matmuls per kept block
    instead of the 7 of the pair (S and dP are computed by both split kernels). Shared
    memory at head_dim 128, block_q 128: K/V 32 KB, q/dO ring 128 KB, lse/delta 2 KB and
    one 32 KB fp32 dQ tile per warpgroup (it also holds the warpgroup's dS tile, and
    passes the dK/dV partial sums) = 226 KB of the 227 KB a CTA can have.
The grids are (batch, heads, blocks), and Pallas runs the last axis fastest, so the CTAs
resident at one time are neighbouring blocks of one head: they stream the same q/dO (or
K/V) blocks, which then come from L2. (With heads varying fastest they spanned all 12
heads: L2 hit rate 10-15 % and ~250 GB read from DRAM per kernel at N=75600, H100.)
A memory warpgroup issues the TMA copies into a ring of shared-memory slots; the
compute warpgroups run wgmma on them and hand each slot back through a barrier.
Sequence tails need no padding of q/k/v/dout: TMA reads past the end fill zeros and
TMA writes past the end are dropped; keys past seq_k are masked to -inf (dQ and fused
kernels). For a length that is not a multiple of 8 the last block goes through
zero-padded side buffers (`pallas_kernels.mosaic_gpu.tma`).

Shapes: q/out/dout `(batch, seq_q, heads, head_dim)`, k/v `(batch, seq_k, heads, head_dim)`,
bf16 or fp16, head_dim 64 or 128; lse `(batch, heads, seq_q)` fp32 (-inf on empty rows).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.backend import check_fused, check_inputs
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
_DQ_STAGES = 3  # depth of the K/V ring of the dQ kernel
_DKV_STAGES = 2  # depth of the Q/dO ring of the dK/dV kernel (shared memory is full)
# `backward(fused=None)`'s rule, from the density sweep of benchmarks/mosaic_gpu_backward_bench.py
# on one H200 (2026-12-02; B=1, H=12, D=128, bf16, uniformly random masks at densities 1, 0.5,
# 0.25, 0.1 and 0.05, and a band at 0.05). The resident CTAs of the fused kernel are neighbouring
# k blocks of one head, so what its fp32 dQ reduce-adds touch is one head's slice of the dQ buffer,
# `seq_q * head_dim * 4` bytes. At N=32760 (a 16.8 MB slice) fused was the faster path at every
# density but 0.25 (1.05-1.13x; 0.97x there); at N=75600 (38.7 MB, with as much q/dO beside it
# against an L2 of 50 MB) only at density 1 (1.10x) and on the band mask (1.10x): at densities
# 0.5 and below it was 0.75-0.77x. So: fused whenever the slice is at most FUSED_DQ_SLICE_BYTES
# (between the two measured slices; no length in between was measured), else fused only from
# kept density FUSED_MIN_DENSITY, where straight lines through the N=75600 times at densities
# 0.5 and 1 (split 102.5 and 198.3 ms, fused 133.6 and 179.9 ms) cross (0.81).
FUSED_DQ_SLICE_BYTES = 24 << 20
FUSED_MIN_DENSITY = 0.8


def _row_terms(out, dout, lse, rows: int) -> tuple[jax.Array, jax.Array]:
    """fp32 `(batch, heads, rows)`: lse in log2 units (0 on empty rows) and delta = rowsum(dout*out).

    Zero-padded from seq_q to `rows` (a multiple of the q block) so every 1-D TMA
    window is in bounds and 16-byte aligned.
    """
    delta = jnp.einsum("bqhd,bqhd->bhq", dout.astype(jnp.float32), out.astype(jnp.float32))
    lse2 = jnp.where(jnp.isfinite(lse), lse * _LOG2E, 0.0)
    pad = ((0, 0), (0, 0), (0, rows - lse.shape[-1]))
    return jnp.pad(lse2, pad), jnp.pad(delta, pad)


def _scores(a_tile, b_tile, c_tile, d_tile, shape):
    """Both score-like products of one step, `a @ b.T` and `c @ d.T`, as fp32 WGMMA arrays."""

    def run(x_acc, y_acc):
        plgpu.wgmma(x_acc, a_tile, b_tile.transpose((1, 0)))
        plgpu.wgmma(y_acc, c_tile, d_tile.transpose((1, 0)))
        return x_acc[...], y_acc[...]

    return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32), plgpu.ACC(shape, jnp.float32))


def _side_refs(refs: list, ragged_q: bool, ragged_k: bool, outs_q: int, outs_k: int):
    """Split `refs` after the lists: (q_last, do_last, k_last, v_last), the outputs
    (`outs_q` per-q then `outs_k` per-k tensors), their side outputs, and the rest."""
    q_last, do_last = (refs.pop(0), refs.pop(0)) if ragged_q else (None, None)
    k_last, v_last = (refs.pop(0), refs.pop(0)) if ragged_k else (None, None)
    outs = [refs.pop(0) for _ in range(outs_q + outs_k)]
    lasts = [refs.pop(0) if ragged_q else None for _ in range(outs_q)]
    lasts += [refs.pop(0) if ragged_k else None for _ in range(outs_k)]
    return (q_last, do_last, k_last, v_last), outs, lasts, refs


def sparge_dq_kernel(*refs, num_compute, block_q, block_k, seq_k, sm_scale, stages, ragged_q, ragged_k):
    """One CTA per (batch, head, q block). Refs: q, k, v, dout, lse, delta, kv_indices,
    kv_counts, [q_last, do_last if ragged_q], [k_last, v_last if ragged_k], dq,
    [dq_last if ragged_q], then the scratch buffers and barriers."""
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, idx_ref, cnt_ref, *refs = refs
    (q_last, do_last, k_last, v_last), (dq_ref,), (dq_last,), refs = _side_refs(refs, ragged_q, ragged_k, 1, 0)
    (q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, staging, rows_ready, k_ready, v_ready, slot_free) = refs
    qb, h, b = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
    wg = lax.axis_index("wg")
    count = cnt_ref[b, h, qb]

    @pl.when(wg < num_compute)
    def _compute():
        split_registers(num_compute, True)
        r0 = qb * block_q + wg * ROWS
        ready = rows_ready.at[wg]
        load_rows(q_ref, q_last, b, h, qb, block_q, wg * ROWS, ROWS, q_smem.at[wg], ready)
        load_rows(do_ref, do_last, b, h, qb, block_q, wg * ROWS, ROWS, do_smem.at[wg], ready)
        plgpu.copy_gmem_to_smem(lse_ref.at[b, h, pl.ds(r0, ROWS)], lse_smem.at[wg], ready)
        plgpu.copy_gmem_to_smem(delta_ref.at[b, h, pl.ds(r0, ROWS)], delta_smem.at[wg], ready)
        plgpu.barrier_wait(ready)
        tile = (ROWS, block_k)
        lse = lax.broadcast_in_dim(plgpu.load(lse_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1)), tile, [0])
        delta = lax.broadcast_in_dim(plgpu.load(delta_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1)), tile, [0])
        q_tile, do_tile = q_smem.at[wg], do_smem.at[wg]
        ds_tile = staging[0].at[wg] if staging else None

        def accumulate(dq_acc):
            def step(j, _):
                slot = lax.rem(j, stages)
                k_tile, v_tile = k_smem.at[slot], v_smem.at[slot]
                plgpu.barrier_wait(k_ready.at[slot])
                plgpu.barrier_wait(v_ready.at[slot])
                s, dp = _scores(q_tile, k_tile, do_tile, v_tile, tile)
                if seq_k % block_k:
                    col = plgpu.broadcasted_iota(jnp.int32, tile, 1, layout=plgpu.Layout.WGMMA)
                    col = col + idx_ref[b, h, qb, j] * block_k
                    s = jnp.where(col < seq_k, s, -jnp.inf)
                p = jnp.exp2(s * (sm_scale * _LOG2E) - lse)
                mma(dq_acc, (p * (dp - delta)).astype(q_smem.dtype), k_tile, ds_tile)
                _hand_back(slot, slot_free)

            lax.fori_loop(0, count, step, None)
            return dq_acc[...]

        dq = pl.run_scoped(accumulate, plgpu.ACC((ROWS, q_smem.shape[-1]), jnp.float32))
        q_tile[...] = (dq * sm_scale).astype(q_smem.dtype)
        plgpu.commit_smem()
        store_rows(q_tile, dq_ref, dq_last, b, h, qb, block_q, wg * ROWS, ROWS)
        plgpu.commit_smem_to_gmem_group()
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    @pl.when(wg == num_compute)
    def _memory():
        split_registers(num_compute, False)

        def fetch(j, slot):
            kb = idx_ref[b, h, qb, j]
            load_rows(k_ref, k_last, b, h, kb, block_k, 0, block_k, k_smem.at[slot], k_ready.at[slot])
            load_rows(v_ref, v_last, b, h, kb, block_k, 0, block_k, v_smem.at[slot], v_ready.at[slot])

        _stream(count, fetch, slot_free, stages)


def _hand_back(slot, slot_free) -> None:
    """Wait for this step's accumulation wgmma (it reads the slot), then release the slot."""
    plgpu.wgmma_wait(0)
    plgpu.barrier_arrive(slot_free.at[slot])


def _stream(count, fetch, slot_free, stages) -> None:
    """Memory warpgroup: fetch steps 0..count-1 into the ring, each slot once it is handed back.

    The last `stages` hand-backs are awaited too, so no barrier phase is left unobserved.
    """

    @pl.loop(0, jnp.minimum(count, stages))
    def _prologue(j):
        fetch(j, j)

    @pl.loop(stages, jnp.maximum(count, stages))
    def _steady(j):
        slot = lax.rem(j, stages)
        plgpu.barrier_wait(slot_free.at[slot])
        fetch(j, slot)

    @pl.loop(jnp.maximum(count - stages, 0), count)
    def _drain(j):
        plgpu.barrier_wait(slot_free.at[lax.rem(j, stages)])


def sparge_dkv_kernel(*refs, **params):
    """One CTA per (batch, head, k block): dK and dV. Refs: q, k, v, dout, lse, delta,
    q_indices, q_counts, [q_last, do_last if ragged_q], [k_last, v_last if ragged_k], dk,
    dv, [dk_last, dv_last if ragged_k], then the scratch buffers and barriers."""
    _kv_block(*refs, fused=False, **params)


def sparge_dqkv_kernel(*refs, **params):
    """`sparge_dkv_kernel` that also adds each visited q block's dQ partial dS K (fp32,
    unscaled) into the dq accumulator, a ref input after q_counts with TMA reduce stores."""
    _kv_block(*refs, fused=True, **params)


def _kv_block(*refs, num_compute, block_q, block_k, seq_k, sm_scale, stages, ragged_q, ragged_k, fused):
    """Body of the dK/dV kernels (see the module docstring); `fused` adds the dQ partials."""
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, idx_ref, cnt_ref, *refs = refs
    dq_ref = refs.pop(0) if fused else None
    (q_last, do_last, k_last, v_last), outs, lasts, refs = _side_refs(refs, ragged_q, ragged_k, 0, 2)
    (k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, sums, staging,
     kv_ready, rows_ready, slot_free, sum_full, sum_empty, *dq_read) = refs
    kb, h, b = lax.axis_index("k"), lax.axis_index("h"), lax.axis_index("b")
    wg = lax.axis_index("wg")
    count = cnt_ref[b, h, kb]
    head_dim = k_smem.shape[-1]
    if fused:  # the warpgroups' fp32 dQ tiles, with each one's dS tile inside its own
        dq_tiles, ds_tiles = sums
        sum_smem = dq_tiles.at[num_compute - 1]
    else:
        sum_smem = sums

    def store(dk, dv):
        """Write the finished dK (scaled) and dV through the K/V tiles, whose reads are done."""
        k_smem[...] = (dk * sm_scale).astype(k_smem.dtype)
        v_smem[...] = dv.astype(v_smem.dtype)
        plgpu.commit_smem()
        for src, out, last in zip((k_smem, v_smem), outs, lasts):
            store_rows(src, out, last, b, h, kb, block_k, 0, block_k)
        plgpu.commit_smem_to_gmem_group()
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    @pl.when(wg < num_compute)
    def _compute():
        split_registers(num_compute, True)
        plgpu.barrier_wait(kv_ready)
        tile = (block_k, ROWS)
        p_tile, ds_tile = (staging[0].at[wg], staging[1].at[wg]) if staging else (None, None)

        def accumulate(dk_acc, dv_acc):
            def step(i, _):
                slot = lax.rem(i, stages)
                q_tile, do_tile = q_smem.at[slot, wg], do_smem.at[slot, wg]
                plgpu.barrier_wait(rows_ready.at[slot])
                s, dp = _scores(k_smem, q_tile, v_smem, do_tile, tile)
                if fused and seq_k % block_k:  # keys past seq_k: p = 0, so they add nothing to dQ
                    row = plgpu.broadcasted_iota(jnp.int32, tile, 0, layout=plgpu.Layout.WGMMA)
                    s = jnp.where(row + kb * block_k < seq_k, s, -jnp.inf)
                lse = plgpu.load(lse_smem.at[slot, wg], layout=plgpu.Layout.WGMMA.reduce(0))
                delta = plgpu.load(delta_smem.at[slot, wg], layout=plgpu.Layout.WGMMA.reduce(0))
                p = jnp.exp2(s * (sm_scale * _LOG2E) - lax.broadcast_in_dim(lse, tile, [1]))
                ds = p * (dp - lax.broadcast_in_dim(delta, tile, [1]))
                mma(dv_acc, p.astype(q_smem.dtype), do_tile, p_tile)
                ds = ds.astype(q_smem.dtype)
                mma(dk_acc, ds, q_tile, ds_tile)
                if fused:  # dS into shared memory, inside the dQ tile once the last reduce store has read it
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    ds_tiles[wg, 0] = ds
                    plgpu.commit_smem()
                _hand_back(slot, slot_free)  # the dK/dV wgmmas are done: their P/dS registers are free
                if fused:
                    dq = _dq_partial(ds_tiles.at[wg, 0], k_smem)
                    rows = dq_ref.at[b, pl.ds(idx_ref[b, h, kb, i] * block_q + wg * ROWS, ROWS), h]
                    _reduce_add(dq, dq_tiles.at[wg], rows, dq_read[0].at[wg] if dq_read else None)

            lax.fori_loop(0, count, step, None)
            return dk_acc[...], dv_acc[...]

        acc = plgpu.ACC((block_k, head_dim), jnp.float32)
        dk, dv = pl.run_scoped(accumulate, acc, acc)
        if num_compute == 1:
            store(dk, dv)
            return

        @pl.when(wg == 1)
        def _give_partials():
            if fused:  # sum_smem is this warpgroup's dQ tile: wait for its last reduce store
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            sum_smem[...] = dk
            plgpu.barrier_arrive(sum_full)
            plgpu.barrier_wait(sum_empty)
            sum_smem[...] = dv
            plgpu.barrier_arrive(sum_full)

        @pl.when(wg == 0)
        def _sum_and_store():
            plgpu.barrier_wait(sum_full)
            dk_total = dk + plgpu.load(sum_smem, layout=plgpu.Layout.WGMMA)
            plgpu.barrier_arrive(sum_empty)
            plgpu.barrier_wait(sum_full)
            dv_total = dv + plgpu.load(sum_smem, layout=plgpu.Layout.WGMMA)
            store(dk_total, dv_total)

    @pl.when(wg == num_compute)
    def _memory():
        split_registers(num_compute, False)
        load_rows(k_ref, k_last, b, h, kb, block_k, 0, block_k, k_smem, kv_ready)
        load_rows(v_ref, v_last, b, h, kb, block_k, 0, block_k, v_smem, kv_ready)

        def fetch(i, slot):
            qb = idx_ref[b, h, kb, i]
            ready = rows_ready.at[slot]
            for w in range(num_compute):
                r0 = qb * block_q + w * ROWS
                load_rows(q_ref, q_last, b, h, qb, block_q, w * ROWS, ROWS, q_smem.at[slot, w], ready)
                load_rows(do_ref, do_last, b, h, qb, block_q, w * ROWS, ROWS, do_smem.at[slot, w], ready)
                plgpu.copy_gmem_to_smem(lse_ref.at[b, h, pl.ds(r0, ROWS)], lse_smem.at[slot, w], ready)
                plgpu.copy_gmem_to_smem(delta_ref.at[b, h, pl.ds(r0, ROWS)], delta_smem.at[slot, w], ready)

        _stream(count, fetch, slot_free, stages)


def _dq_partial(ds_tile, k_tile):
    """dS K for one warpgroup's 64 q rows, fp32 `(ROWS, head_dim)`, from `ds_tile`
    `(block_k, ROWS)` read transposed as the A operand."""

    def run(acc):
        plgpu.wgmma(acc, ds_tile.transpose((1, 0)), k_tile)
        return acc[...]

    return pl.run_scoped(run, plgpu.ACC((ROWS, k_tile.shape[-1]), jnp.float32))


def _reduce_add(x, tile, dst, barrier) -> None:
    """dst += x (fp32) through the shared-memory `tile`: a TMA reduce store, committed.

    Interpret mode (`barrier` given) cannot run TMA reductions (jax 0.11.2 raises
    NotImplementedError for `reduction_op`), so there it reads dst into the tile, adds
    and stores: the same sums, as its CTAs run one at a time."""
    if barrier is None:
        tile[...] = x
    else:
        plgpu.copy_gmem_to_smem(dst, tile, barrier)
        plgpu.barrier_wait(barrier)
        tile[...] = plgpu.load(tile, layout=plgpu.Layout.WGMMA) + x
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(tile, dst, reduction_op=None if barrier is not None else "add")


def _dq(q, k, v, dout, lse2, delta, index, side_in, *, block_q, block_k, sm_scale, interpret):
    batch, _, heads, head_dim = q.shape
    num_compute = block_q // ROWS
    ragged_q, ragged_k = is_ragged(q.shape[1]), is_ragged(k.shape[1])
    if ragged_q or ragged_k:
        install_ragged_tma()
    kernel = bind_kernel(
        sparge_dq_kernel, num_compute=num_compute, block_q=block_q, block_k=block_k, seq_k=k.shape[1],
        sm_scale=sm_scale, stages=_DQ_STAGES, ragged_q=ragged_q, ragged_k=ragged_k,
    )
    side_out = [jax.ShapeDtypeStruct((batch, block_q, heads, head_dim), q.dtype)] if ragged_q else []
    rows = tile_smem((num_compute, ROWS, head_dim), q.dtype)
    stream = tile_smem((_DQ_STAGES, block_k, head_dim), q.dtype)
    stats = plgpu.SMEM((num_compute, ROWS), jnp.float32)
    dq, *dq_last = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype), *side_out),
        scratch_types=[
            rows, rows, stats, stats, stream, stream,
            staging_tiles(interpret, 1, (num_compute, ROWS, block_k), q.dtype),
            plgpu.Barrier(num_arrivals=4, num_barriers=num_compute),
            plgpu.Barrier(num_barriers=_DQ_STAGES),
            plgpu.Barrier(num_barriers=_DQ_STAGES),
            plgpu.Barrier(num_arrivals=num_compute, num_barriers=_DQ_STAGES),
        ],
        grid=(batch, heads, index.num_q_blocks),  # row-major: q blocks of one head run side by side
        grid_names=("b", "h", "q"),
        num_threads=num_compute + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(interpret),
    )(q, k, v, dout, lse2, delta, index.kv_indices, index.kv_counts, *side_in)
    return merge_last_block(dq, dq_last[0]) if ragged_q else dq


def _dkv(q, k, v, dout, lse2, delta, index, side_in, *, block_q, block_k, sm_scale, interpret, fused=False):
    """(dk, dv) from the dK/dV kernel; with `fused`, (dq, dk, dv) from the fused one."""
    batch, seq_q, heads, head_dim = q.shape
    num_compute = block_q // ROWS
    ragged_q, ragged_k = is_ragged(seq_q), is_ragged(k.shape[1])
    if ragged_q or ragged_k:
        install_ragged_tma()
    kernel = bind_kernel(
        sparge_dqkv_kernel if fused else sparge_dkv_kernel, num_compute=num_compute, block_q=block_q,
        block_k=block_k, seq_k=k.shape[1], sm_scale=sm_scale, stages=_DKV_STAGES, ragged_q=ragged_q,
        ragged_k=ragged_k,
    )
    kv_tile = tile_smem((block_k, head_dim), k.dtype)
    rows = tile_smem((_DKV_STAGES, num_compute, ROWS, head_dim), q.dtype)
    stats = plgpu.SMEM((_DKV_STAGES, num_compute, ROWS), jnp.float32)
    if fused:
        # One fp32 dQ tile per warpgroup (the last one also passes the dK/dV partial sums);
        # both union members start at byte 0, so warpgroup w's dS tile, ds_tiles[w, 0],
        # is the start of its own dQ tile.
        ds_per_dq = head_dim * 4 // (block_k * q.dtype.itemsize)
        sums = plgpu.RefUnion(tile_smem((num_compute, ROWS, head_dim), jnp.float32),
                              tile_smem((num_compute, ds_per_dq, block_k, ROWS), q.dtype))
        dq_acc = [jax.new_ref(jnp.zeros((batch, index.num_q_blocks * block_q, heads, head_dim), jnp.float32))]
    else:
        sums, dq_acc = tile_smem((block_k, head_dim), jnp.float32), []
    out = jax.ShapeDtypeStruct(k.shape, k.dtype)
    side_out = [jax.ShapeDtypeStruct((batch, block_k, heads, head_dim), k.dtype)] * 2 if ragged_k else []
    dk, dv, *lasts = plgpu.kernel(
        kernel,
        out_type=(out, out, *side_out),
        scratch_types=[
            kv_tile, kv_tile, rows, rows, stats, stats, sums,
            staging_tiles(interpret, 2, (num_compute, block_k, ROWS), q.dtype),
            plgpu.Barrier(num_arrivals=2),
            plgpu.Barrier(num_arrivals=4 * num_compute, num_barriers=_DKV_STAGES),
            plgpu.Barrier(num_arrivals=num_compute, num_barriers=_DKV_STAGES),
            plgpu.Barrier(),
            plgpu.Barrier(),
            *([plgpu.Barrier(num_barriers=num_compute)] if fused and interpret else []),
        ],
        grid=(batch, heads, index.num_k_blocks),  # row-major: k blocks of one head run side by side
        grid_names=("b", "h", "k"),
        num_threads=num_compute + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(interpret),
    )(q, k, v, dout, lse2, delta, index.q_indices, index.q_counts, *dq_acc, *side_in)
    if ragged_k:
        dk, dv = merge_last_block(dk, lasts[0]), merge_last_block(dv, lasts[1])
    if not fused:
        return dk, dv
    return (dq_acc[0][:, :seq_q] * sm_scale).astype(q.dtype), dk, dv


@jax.custom_batching.custom_vmap
def _dense_enough(kv_counts, q_counts):
    """Bool scalar: kept pairs / all pairs >= FUSED_MIN_DENSITY (q_counts' last axis: the k blocks)."""
    return jnp.sum(kv_counts, dtype=jnp.float32) >= FUSED_MIN_DENSITY * kv_counts.size * q_counts.shape[-1]


@_dense_enough.def_vmap
def _dense_enough_batched(axis_size, in_batched, kv_counts, q_counts):
    """One decision over all the masks of a vmap (batch axes in front): an unbatched predicate
    keeps `backward`'s `lax.cond` a cond, where a batched one would make it a select that runs
    both paths."""
    del axis_size, in_batched
    return _dense_enough(kv_counts, q_counts), False


def uses_fused(index: BlockIndex) -> jax.Array:
    """Bool scalar: whether `backward(..., fused=None)` runs the fused kernel for `index` when a
    head's dQ slice does not fit (`dq_slice_fits`): its kept density over all batch entries and
    heads (under vmap, over all the masks) is at least `FUSED_MIN_DENSITY`."""
    return _dense_enough(index.kv_counts, index.q_counts)


def dq_slice_fits(seq_q: int, head_dim: int) -> bool:
    """Whether one head's fp32 dQ slice, `seq_q * head_dim * 4` bytes, is at most
    `FUSED_DQ_SLICE_BYTES`: then `backward(..., fused=None)` always runs the fused kernel."""
    return seq_q * head_dim * 4 <= FUSED_DQ_SLICE_BYTES


def auto_fused(seq_q: int, head_dim: int, index: BlockIndex) -> bool | jax.Array:
    """What `backward(..., fused=None)` runs: True (the fused kernel, decided at trace time)
    where `dq_slice_fits`, else `uses_fused(index)`, a bool scalar decided at run time."""
    return True if dq_slice_fits(seq_q, head_dim) else uses_fused(index)


def side_inputs(q, k, v, dout, block_q: int, block_k: int) -> list[jax.Array]:
    """The zero-padded last blocks the kernels read for ragged sequences (see
    `pallas_kernels.mosaic_gpu.tma`): q and dout's when seq_q is ragged, then k and v's when
    seq_k is; empty for lengths that are multiples of 8."""
    return ([last_block(q, block_q), last_block(dout, block_q)] if is_ragged(q.shape[1]) else []) + (
        [last_block(k, block_k), last_block(v, block_k)] if is_ragged(k.shape[1]) else [])


def backward(
    q, k, v, out, lse, dout, index: BlockIndex, *, block_q: int, block_k: int, sm_scale: float,
    interpret: bool = False, fused: bool | None = None,
):
    """Gradients (dq, dk, dv) of block-sparse attention, in q.dtype, visiting only kept blocks.

    Args:
      q, out, dout: `(batch, seq_q, heads, head_dim)` bf16/fp16; k, v: `(batch, seq_k, heads, head_dim)`.
      lse: `(batch, heads, seq_q)` fp32, the forward's (-inf on rows that keep no block).
      index: `BlockIndex` of the `(batch, heads, ceil(seq_q/block_q), ceil(seq_k/block_k))` mask.
      block_q: 64 or 128 (one or two compute warpgroups); block_k: 64.
      interpret: run the kernels on CPU through Mosaic GPU interpret mode (which sums the fused
        kernel's dQ without the TMA reduce, see `_reduce_add`).
      fused: True: one dQ/dK/dV kernel (5 matmuls per kept block; dQ summed in an fp32
        `(batch, padded seq_q, heads, head_dim)` buffer by TMA reduce stores), faster on dense
        masks and wherever a head's dQ slice stays in L2. False: the dQ and dK/dV kernels (7
        matmuls), faster on sparse random masks of long sequences, whose dQ reduce-adds miss
        L2. None (default, `auto_fused`): fused where `dq_slice_fits(seq_q, head_dim)`; longer
        sequences get a `lax.cond` on `uses_fused(index)` (kept density >= `FUSED_MIN_DENSITY`) that picks
        one at run time, so one compiled program serves every mask; it holds both paths,
        which doubles the kernels' compile time (pass True or False to compile one). Under
        vmap one decision covers all the masks; interpret mode cannot vmap the cond (jax
        refuses vmap of a cond whose branches make callbacks, as the interpreter does): pass
        True or False there.
    Returns:
      dq `(batch, seq_q, heads, head_dim)`, dk and dv `(batch, seq_k, heads, head_dim)`, in q.dtype.
    """
    check_fused(fused)
    check_inputs(q, k, v, index, block_q, block_k, out=out, lse=lse, dout=dout)
    check_supported(q, k, block_q, block_k, "backward")
    lse2, delta = _row_terms(out, dout, lse, index.num_q_blocks * block_q)
    kwargs = dict(block_q=block_q, block_k=block_k, sm_scale=float(sm_scale), interpret=interpret)
    side_in = side_inputs(q, k, v, dout, block_q, block_k)

    def fused_path():
        return _dkv(q, k, v, dout, lse2, delta, index, side_in, fused=True, **kwargs)

    def split_path():
        dq = _dq(q, k, v, dout, lse2, delta, index, side_in, **kwargs)
        dk, dv = _dkv(q, k, v, dout, lse2, delta, index, side_in, **kwargs)
        return dq, dk, dv

    if fused is None:
        fused = auto_fused(q.shape[1], q.shape[3], index)
        if not isinstance(fused, bool):
            return lax.cond(fused, fused_path, split_path)
    return fused_path() if fused else split_path()

"""benchmarks/step_profile.py without a GPU, on synthetic modules and traces. A GPU trace's shape
(`HLO`, `EVENTS`: two calls, durations in ns): kernels launched from a CUDA graph (their `hlo_op`
stat names the command buffer), fusions named after their instruction, and cuBLAS / cuDNN /
Mosaic GPU kernels with library names, matched to the module's custom calls in launch order.
`STACK_HLO`: which stacks make an op RoPE."""

from types import SimpleNamespace

import pytest

from benchmark_scripts import load_benchmark

profile = load_benchmark("step_profile")

HLO = """HloModule jit_step, is_scheduled=true

%fused_norm (param_0: bf16[8,4]) -> bf16[8,4] {
  %param_0 = bf16[8,4]{1,0} parameter(0)
  %convert.1 = f32[8,4]{1,0} convert(%param_0)
  %rsqrt.1 = f32[8,4]{1,0} rsqrt(%convert.1)
  ROOT %convert.2 = bf16[8,4]{1,0} convert(%rsqrt.1)
}

%fused_transpose (param_0.1: bf16[8,4]) -> bf16[4,8] {
  %param_0.1 = bf16[8,4]{1,0} parameter(0)
  ROOT %transpose.1 = bf16[4,8]{0,1} transpose(%param_0.1), dimensions={1,0}
}

ENTRY %main.1 (state__blocks___0___q____kernel___value.1: bf16[4,4], state__blocks___1___q____kernel___value.1: bf16[4,4], x.1: bf16[8,4]) -> bf16[4,8] {
  %state__blocks___0___q____kernel___value.1 = bf16[4,4]{1,0} parameter(0)
  %state__blocks___1___q____kernel___value.1 = bf16[4,4]{1,0} parameter(1)
  %x.1 = bf16[8,4]{1,0} parameter(2)
  %loop_rsqrt_fusion.1 = bf16[8,4]{1,0} fusion(%x.1), kind=kLoop, calls=%fused_norm
  %cublas-lt-matmul.1 = (bf16[8,4]{1,0}, s8[1024]{0}) custom-call(%loop_rsqrt_fusion.1, %state__blocks___0___q____kernel___value.1), custom_call_target="__cublas$lt$matmul"
  %get-tuple-element.1 = bf16[8,4]{1,0} get-tuple-element(%cublas-lt-matmul.1), index=0
  %cublas-lt-matmul.2 = (bf16[8,4]{1,0}, s8[1024]{0}) custom-call(%get-tuple-element.1, %state__blocks___1___q____kernel___value.1), custom_call_target="__cublas$lt$matmul"
  %get-tuple-element.2 = bf16[8,4]{1,0} get-tuple-element(%cublas-lt-matmul.2), index=0
  %fmha.1 = (bf16[8,4]{1,0}, u8[256]{0}) custom-call(%get-tuple-element.2, %x.1, %x.1), custom_call_target="__cudnn$fmhaSoftmax"
  %get-tuple-element.3 = bf16[8,4]{1,0} get-tuple-element(%fmha.1), index=0
  %mpmd_map.1 = bf16[8,4]{1,0} custom-call(%get-tuple-element.3, %x.1, %x.1), custom_call_target="mosaic_gpu_v2"
  ROOT %loop_transpose_fusion = bf16[4,8]{0,1} fusion(%mpmd_map.1), kind=kCustom, calls=%fused_transpose, backend_config={"fusion_backend_config":{"kind":"__triton"}}
}
"""

GRAPH = {"hlo_op": "command_buffer_1", "hlo_module": "jit_step", "cuda_graph_id": "746"}
NVJET = "nvjet_sm90_tst_256x136_64x4_1x2_h_bz_coopA_bias_NNT"
CUDNN = "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1x1_kernel0_0"
MOSAIC = "sparge_forward_kernel_mosaic_gpu_kernel"


def _call(first_gemm: int, second_gemm: int) -> list[tuple[str, dict, int]]:
    """One call's kernels, in launch order: (name, stats, duration_ns)."""
    return [("loop_rsqrt_fusion_1", GRAPH, 1000), ("Memset 0", GRAPH, 10), (NVJET, GRAPH, first_gemm),
            ("Memset 0", GRAPH, 10), (NVJET, GRAPH, second_gemm), (CUDNN, GRAPH, 4000), (MOSAIC, GRAPH, 500),
            ("loop_transpose_fusion", GRAPH, 100)]


# Two calls; the arguments' copy and another module's kernel carry no `jit_step` module.
EVENTS = ([("MemcpyH2D", {"correlation_id": "1"}, 800)] + _call(2000, 3000)
          + [("loop_add_fusion", {"hlo_module": "jit_other", "hlo_op": "command_buffer_2"}, 50)] + _call(2200, 3300))


def _by_name():
    instructions, _ = profile._parse(HLO)
    return {profile._kernel_name(name): name for name in instructions}


def _totals(pairs) -> dict[str, int]:
    out = {}
    for op, ns in pairs:
        out[op] = out.get(op, 0) + ns
    return out


def test_kernels_map_to_their_instruction_or_the_next_custom_call_of_their_library():
    assert profile.library_calls(HLO) == {"cublas": ["cublas-lt-matmul.1", "cublas-lt-matmul.2"],
                                          "cudnn": ["fmha.1"], "mosaic_gpu": ["mpmd_map.1"]}
    ops = profile.kernel_ops(EVENTS, _by_name(), profile.library_calls(HLO), "jit_step")
    assert len(ops) == 16  # the copy and jit_other's kernel left out
    assert _totals(ops) == {"loop_rsqrt_fusion.1": 2000, "Memset 0": 40, "cublas-lt-matmul.1": 4200,
                            "cublas-lt-matmul.2": 6300, "fmha.1": 8000, "mpmd_map.1": 1000,
                            "loop_transpose_fusion": 200}


def test_gpu_kernel_time_per_category_and_call():
    categories = profile.hlo_categories(HLO)
    assert [categories[name] for name in ("loop_rsqrt_fusion.1", "cublas-lt-matmul.1", "fmha.1", "mpmd_map.1",
                                          "loop_transpose_fusion")] == [
        "norm/modulation", "matmul", "attention", "attention", "copies/casts"]
    ops = {}
    for op, ns in profile.kernel_ops(EVENTS, _by_name(), profile.library_calls(HLO), "jit_step"):
        ops.setdefault(op, [0.0, 0])
        ops[op][0] += ns * 1e-9
        ops[op][1] += 1
    seconds = profile.category_seconds(ops, categories, calls=2)
    want_ns = {"matmul": 5250, "attention": 4500, "norm/modulation": 1000, "rope": 0, "copies/casts": 120, "other": 0}
    assert {category: seconds[category] * 1e9 for category in want_ns} == pytest.approx(want_ns)
    assert seconds["total"] * 1e9 == pytest.approx(10870)


def test_library_kernels_that_do_not_line_up_with_the_calls_fall_back_to_their_library():
    """Three cuBLAS kernels for two cuBLAS calls: no call is guessed; the kernels count as matmul
    under their own name (as do kernels of a module without such calls)."""
    events = [(NVJET, GRAPH, 7), (NVJET, GRAPH, 8), (NVJET, GRAPH, 9), ("loop_transpose_fusion", GRAPH, 1)]
    ops = profile.kernel_ops(events, _by_name(), profile.library_calls(HLO), "jit_step")
    assert ops == [(NVJET, 7), (NVJET, 8), (NVJET, 9), ("loop_transpose_fusion", 1)]
    categories = profile.hlo_categories(HLO)
    assert [profile.op_category(name, categories) for name in (NVJET, CUDNN, MOSAIC, "Memset 0", "mystery_kernel")] == [
        "matmul", "attention", "attention", "copies/casts", "other"]


def test_library_calls_in_a_loop_body_are_not_matched_by_launch_order():
    """Scanned layers: the body's cuBLAS call runs once per trip, so the kernels are not the
    entry's calls round and round (they count as matmul under their own name)."""
    body = """%body (p.1: bf16[8,4]) -> bf16[8,4] {
  %p.1 = bf16[8,4]{1,0} parameter(0)
  ROOT %cublas-lt-matmul.9 = bf16[8,4]{1,0} custom-call(%p.1, %p.1), custom_call_target="__cublas$lt$matmul"
}

"""
    scanned = HLO.replace("ENTRY ", body + "ENTRY ")
    assert profile.library_calls(scanned) == {"cudnn": ["fmha.1"], "mosaic_gpu": ["mpmd_map.1"]}
    ops = profile.kernel_ops(EVENTS, _by_name(), profile.library_calls(scanned), "jit_step")
    assert _totals(ops)[NVJET] == 10500 and _totals(ops)["fmha.1"] == 8000


def test_an_hlo_op_stat_that_names_no_instruction_defers_to_the_kernel_name():
    by_name = {profile._kernel_name("loop_rsqrt_fusion.1"): "norm/modulation"}
    assert profile.event_lookup("loop_rsqrt_fusion_1", GRAPH, by_name, named_after_op=False) == "norm/modulation"
    assert profile.event_lookup(NVJET, GRAPH, by_name, named_after_op=False) is None


def _event(name, stats, start, duration):
    return SimpleNamespace(name=name, stats=list(stats.items()), start_ns=start, duration_ns=duration)


def _fake_profile():
    """The GPU plane of one call: its kernels on two streams (so out of launch order line by line),
    an "XLA Ops" line with the command buffer's span (not counted: the kernels are), and a host
    plane whose op events a device breakdown leaves out."""
    starts, start = [], 0
    for _, _, duration in _call(2000, 3000):
        starts.append(start)
        start += duration + 5
    kernels = [_event(name, stats, begin, duration) for (name, stats, duration), begin in zip(_call(2000, 3000), starts)]
    lines = [SimpleNamespace(name="Stream #14(Compute,Memset)", events=kernels[:2] + kernels[5:]),
             SimpleNamespace(name="Stream #15(Compute)", events=kernels[2:5]),
             SimpleNamespace(name="XLA Ops", events=[_event("command_buffer_1", {}, 0, start)])]
    host = SimpleNamespace(name="/host:CPU", lines=[SimpleNamespace(name="tf_XLA", events=[
        _event("loop_transpose_fusion", {"hlo_op": "loop_transpose_fusion", "hlo_module": "jit_step"}, 0, 99)])])
    return SimpleNamespace(planes=[SimpleNamespace(name="/device:GPU:0", lines=lines), host])


def test_traced_ops_count_the_device_streams_in_launch_order():
    ops = profile.traced_ops(_fake_profile(), HLO, device=True)
    assert {op: round(seconds * 1e9) for op, (seconds, _) in ops.items()} == {
        "loop_rsqrt_fusion.1": 1000, "Memset 0": 20, "cublas-lt-matmul.1": 2000, "cublas-lt-matmul.2": 3000,
        "fmha.1": 4000, "mpmd_map.1": 500, "loop_transpose_fusion": 100}
    host = profile.traced_ops(_fake_profile(), HLO, device=False)
    assert {op: (round(seconds * 1e9), events) for op, (seconds, events) in host.items()} == {
        "loop_transpose_fusion": (99, 1)}


STACK_HLO = """HloModule jit_step

FileNames
1 "/w/sparge_jax/models/rope.py"
2 "/w/sparge_jax/masks/sparge.py"

FunctionNames
1 "apply_rope"
2 "_block_means"

FileLocations
1 {file_name_id=1 function_name_id=1 line=58 end_line=58 column=4 end_column=9}
2 {file_name_id=2 function_name_id=2 line=38 end_line=38 column=4 end_column=9}

StackFrames
1 {file_location_id=1 parent_frame_id=0}
2 {file_location_id=2 parent_frame_id=0}

%fused_rope (param_0: bf16[8,4]) -> bf16[8,4] {
  %param_0 = bf16[8,4]{1,0} parameter(0)
  ROOT %multiply.1 = bf16[8,4]{1,0} multiply(%param_0, %param_0), metadata={op_name="mul" stack_frame_id=1}
}

%fused_means (param_0.1: bf16[8,4]) -> f32[4] {
  %param_0.1 = bf16[8,4]{1,0} parameter(0)
  %bitcast.1 = bf16[8,4]{1,0} bitcast(%param_0.1), metadata={op_name="stack" stack_frame_id=1}
  %convert.1 = f32[8,4]{1,0} convert(%bitcast.1), metadata={op_name="convert" stack_frame_id=2}
  %constant.1 = f32[] constant(0)
  ROOT %reduce.1 = f32[4]{0} reduce(%convert.1, %constant.1), dimensions={0}, to_apply=%add, metadata={stack_frame_id=2}
}

ENTRY %main.1 (x.1: bf16[8,4]) -> f32[4] {
  %x.1 = bf16[8,4]{1,0} parameter(0)
  %loop_multiply_fusion = bf16[8,4]{1,0} fusion(%x.1), kind=kLoop, calls=%fused_rope, metadata={stack_frame_id=1}
  ROOT %input_reduce_fusion = f32[4]{0} fusion(%loop_multiply_fusion), kind=kInput, calls=%fused_means, metadata={stack_frame_id=2}
}
"""


def test_rope_is_where_an_op_computes_not_where_its_input_was_bitcast():
    """The mask's block means of the RoPE'd k read it through a bitcast that carries RoPE's stack;
    they are not RoPE (nor is RoPE in their description)."""
    categories = profile.hlo_categories(STACK_HLO)
    assert categories["loop_multiply_fusion"] == "rope"
    assert categories["input_reduce_fusion"] == "other"
    instructions, computations = profile._parse(STACK_HLO)
    assert profile.describe_op("input_reduce_fusion", instructions, computations, profile._stack_tables(STACK_HLO)) == (
        "Input fusion of convert, reduce -> f32[4] (sparge.py:_block_means:38)")


def test_top_ops_sum_every_layers_copy_and_say_what_it_computes():
    ops = profile.traced_ops(_fake_profile(), HLO, device=True)
    rows = profile.top_ops(ops, HLO, calls=1, count=3)
    assert [(row["category"], row["opcode"], row["ops"], row["launches"]) for row in rows] == [
        ("matmul", "custom-call", ["cublas-lt-matmul.1", "cublas-lt-matmul.2"], 2),
        ("attention", "custom-call", ["fmha.1"], 1),
        ("norm/modulation", "fusion (Loop)", ["loop_rsqrt_fusion.1"], 1)]
    opcodes = {row["ops"][0]: row["opcode"] for row in profile.top_ops(ops, HLO)}
    assert opcodes["loop_transpose_fusion"] == "fusion (Custom __triton)" and opcodes["Memset 0"] == "kernel"
    assert rows[0]["ms"] == pytest.approx(5000e-6) and rows[0]["share"] == pytest.approx(5000 / 10620)
    assert rows[0]["what"] == "__cublas$lt$matmul of bf16[8,4] x bf16[4,4] [blocks.*.q.kernel] -> bf16[8,4]"
    assert rows[2]["what"] == "Loop fusion of convert, rsqrt, via f32[8,4] -> bf16[8,4]"
    assert "| 0.01 | 47.1% | 2 | matmul | custom-call | cublas-lt-matmul.1 (+1) |" in profile.top_ops_table(rows)


def test_trace_cli_prints_the_breakdown_of_a_saved_trace(tmp_path, monkeypatch, capsys):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "host.xplane.pb").write_bytes(b"")
    (tmp_path / "module.hlo.txt").write_text(HLO)
    monkeypatch.setattr(profile, "ProfileData", SimpleNamespace(from_file=lambda path: _fake_profile()))
    out = profile.main(["--trace", str(tmp_path), "--top", "2"])
    assert out["breakdown"]["matmul"] * 1e9 == pytest.approx(5000)
    assert out["breakdown"]["total"] * 1e9 == pytest.approx(10620)
    assert [row["ops"][0] for row in out["top"]] == ["cublas-lt-matmul.1", "fmha.1"]
    printed = capsys.readouterr().out
    assert "| step | matmul | attention | norm/modulation | rope | copies/casts | other | total (ms) |" in printed
    assert f"| {tmp_path.name} | 0.0 (47%) | 0.0 (42%) | 0.0 (9%) | 0.0 (0%) | 0.0 (1%) | 0.0 (0%) | 0.0 |" in printed
    assert "Device streams idle 0.00 ms of the 0.01 ms from the first event to the last" in printed
    assert out["idle"][1] * 1e9 == pytest.approx(35)


def test_idle_stretches_are_the_gaps_no_stream_covers():
    """Events of two streams, out of order, overlapping: idle is only where neither runs."""
    events = [("c", 250, 300), ("a", 0, 100), ("b", 50, 120), ("d", 260, 280), ("e", 400, 410)]
    span, idle, stretches = profile.idle_stretches(events)
    assert (span, idle) == (410, (250 - 120) + (400 - 300))
    assert stretches == [(130, "b", "c"), (100, "c", "e")]
    assert profile.idle_stretches([]) == (0, 0, [])
    # the fake GPU plane: kernels 5 ns apart on two stream lines, the "XLA Ops" line left out
    span, idle, stretches = profile.device_idle(_fake_profile())
    kernels = _call(2000, 3000)
    assert idle * 1e9 == pytest.approx(5 * (len(kernels) - 1))
    assert span * 1e9 == pytest.approx(sum(ns for _, _, ns in kernels) + 5 * (len(kernels) - 1))
    assert [(round(s * 1e9), before) for s, before, _ in stretches[:2]] == [(5, "loop_rsqrt_fusion_1"), (5, "Memset 0")]


def test_host_event_totals_sums_host_events_by_name_without_python_frames():
    """Per name: seconds summed over the host planes' events, costliest first; Python frames
    (`$file:line name`) and the device planes are left out."""
    event = lambda name, ns: SimpleNamespace(name=name, duration_ns=ns)
    plane = lambda name, *lines: SimpleNamespace(name=name, lines=[SimpleNamespace(events=list(e)) for e in lines])
    trace = SimpleNamespace(planes=[
        plane("/host:CPU",
              [event("HLO Transforms:jit_step", 3_000_000_000), event("$loop.py:135 _run", 9_000_000_000)],
              [event("PTX->CUBIN", 1_500_000_000), event("PTX->CUBIN", 2_000_000_000)]),
        plane("/device:GPU:0", [event("PTX->CUBIN", 7_000_000_000)]),
    ])
    assert profile.host_event_totals(trace) == [("PTX->CUBIN", pytest.approx(3.5), 2),
                                                ("HLO Transforms:jit_step", pytest.approx(3.0), 1)]
    assert profile.host_event_totals(trace, top=1)[0][0] == "PTX->CUBIN"


def test_device_time_is_summed_per_program_that_launched_it():
    """EVENTS: two calls of jit_step (a memset each twice: launched by the module, so its), another
    module's kernel, and a host-to-device copy no module launched."""
    seconds = profile.seconds_by_program(EVENTS + [("Memset 0", {}, 7), ("some_kernel", {}, 3)])
    step_ns = sum(ns for _, _, ns in _call(2000, 3000)) + sum(ns for _, _, ns in _call(2200, 3300))
    assert {name: round(s * 1e9) for name, s in seconds.items()} == {
        "jit_step": step_ns, "jit_other": 50, "copies": 807, "other": 3}
    # the fake GPU plane's two stream lines, merged in start order; the host plane and "XLA Ops" left out
    assert profile.device_program_seconds(_fake_profile()) == pytest.approx(
        {"jit_step": sum(ns for _, _, ns in _call(2000, 3000)) * 1e-9})

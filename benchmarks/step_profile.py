"""Where a jitted step's time goes, and how many FLOPs a Wan forward has (wan_step.py, train_step.py).

`op_breakdown` traces calls with `jax.profiler`, sums the duration of every executed HLO op
and sorts the ops into `CATEGORIES` by what the optimized HLO says they compute
(`hlo_categories`). On the CPU an op is an event carrying an `hlo_op` stat (`event_lookup`); on
a GPU it is a kernel on a device stream line (`kernel_ops`): XLA names a fusion's kernel after the
instruction (one kernel for identical fusions: the first one's name), while cuBLAS, cuDNN and
Mosaic GPU kernels have their library's names and are matched to the module's custom calls of
their library in launch order (not those a loop body calls: scanned layers count by library);
the `hlo_op` stat of a kernel launched from a CUDA graph names the command buffer, not the op.
A saved trace is read without running anything:

    python benchmarks/step_profile.py --trace DIR [--calls N] [--top 15]

prints the table per category, the costliest ops (grouped: one row for an op every layer
repeats) with what they compute (`describe_op`) and, for a GPU trace, how long the device
streams sat idle and the longest idle stretches with the events around them (`device_idle`).
Categories:

- attention: a custom call of an attention kernel (cuDNN fMHA, Mosaic GPU / Triton / TPU Pallas);
- matmul: a dot or convolution, a cuBLAS custom call, or a fusion holding one;
- rope: an op whose source stack (the HLO's stack-frame tables; of a fusion's computing ops,
  not the bitcasts of its inputs) passes through `sparge_jax/models/rope.py`;
- norm/modulation: an op from `layer_norm` or flax's normalization module, or with an rsqrt
  (LayerNorm, RMSNorm; the adaLN modulation is fused into them);
- copies/casts: copies, transposes and fusions of layout/dtype ops only;
- other: the rest (elementwise, reductions, the masks' selection, ...).

Control-flow ops (while, conditional, call) are skipped: their bodies' ops are counted. On
the CPU the sparse attention runs as jnp (the "xla" backend), so it lands in matmul/other.
"""

from __future__ import annotations

import argparse
import collections
import glob
import math
import re
import shutil
import tempfile
from pathlib import Path

import jax
from jax.profiler import ProfileData

CATEGORIES = ("matmul", "attention", "norm/modulation", "rope", "copies/casts", "other")

_LAYOUT_OPS = {"parameter", "copy", "transpose", "bitcast", "reshape", "broadcast", "slice", "concatenate",
               "dynamic-slice", "dynamic-update-slice", "convert", "constant", "tuple", "get-tuple-element", "pad"}
_QUIET_OPS = {"parameter", "constant", "bitcast", "broadcast", "get-tuple-element", "tuple"}  # compute nothing
_CONTROL_OPS = {"while", "conditional", "call", "async-start", "async-done", "async-update"}
_ATTENTION_TARGETS = ("cudnn$fmha", "__cudnn$fmha", "mosaic_gpu", "__gpu$xla.gpu.triton", "tpu_custom_call",
                      "triton_kernel_call")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_OPCODE = re.compile(r"\s([a-z][\w\-]*)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_FRAME_ID = re.compile(r"stack_frame_id=(\d+)")
_TABLE_ROW = re.compile(r"^(\d+) (.*)$")
_NORM_SOURCES = ("nnx/nn/normalization.py", ":layer_norm")
# GPU kernels that are not named after their instruction: (library, kernel name pattern, the
# custom call target it runs, None: none); the category of one no instruction accounts for.
_LIBRARY_KERNELS = (
    ("memory", re.compile(r"^(Memset|Memcpy)"), None),
    ("cudnn", re.compile(r"cudnn", re.IGNORECASE), "__cudnn"),
    ("mosaic_gpu", re.compile(r"mosaic_gpu"), "mosaic_gpu"),
    ("cublas", re.compile(r"^(nvjet|cutlass|sm\d+_xmma|ampere_|hopper_)|gemm", re.IGNORECASE), "__cublas"),
)
_LIBRARY_CATEGORY = {"memory": "copies/casts", "cudnn": "attention", "mosaic_gpu": "attention", "cublas": "matmul"}


def _stack_tables(hlo_text: str) -> dict[str, dict[str, str]]:
    """{table: {id: row}} of the FileNames, FunctionNames, FileLocations and StackFrames tables
    of an HLO module's text."""
    tables, current = collections.defaultdict(dict), None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = line
            continue
        row = _TABLE_ROW.match(line) if current else None
        if row is None:
            current = None if not line.strip() else current
            continue
        tables[current][row.group(1)] = row.group(2)
    return tables


def _field(row: str, name: str) -> str:
    return re.search(rf"{name}=(\d+)", row).group(1)


def _frame_source(tables: dict[str, dict[str, str]], frame: str, line: bool = False) -> str:
    """"file:function" (line: ":line" added) of one stack frame, "" when the tables lack it."""
    location = tables["FileLocations"].get(_field(tables["StackFrames"][frame], "file_location_id"), "")
    if not location:
        return ""
    names = lambda table, key: tables[table].get(_field(location, key), "").strip('"')
    return (f"{names('FileNames', 'file_name_id')}:{names('FunctionNames', 'function_name_id')}"
            + (f":{_field(location, 'line')}" if line else ""))


def _stack_sources(hlo_text: str) -> dict[str, set[str]]:
    """{stack_frame_id: {"file:function" of every frame on its stack}} from the stack-frame
    tables of an HLO module's text (`_stack_tables`)."""
    tables, out = _stack_tables(hlo_text), {}
    for frame in tables["StackFrames"]:
        seen, sources, current_frame = set(), set(), frame
        while current_frame in tables["StackFrames"] and current_frame not in seen:
            seen.add(current_frame)
            sources.add(_frame_source(tables, current_frame))
            current_frame = _field(tables["StackFrames"][current_frame], "parent_frame_id")
        out[frame] = sources
    return out


def _parse(hlo_text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(instruction name -> its line, computation name -> its instruction lines)."""
    instructions, computations, current = {}, {}, None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and not line.startswith(" "):
            current = computations.setdefault(header.group(1), [])
            continue
        match = _INSTRUCTION.match(line)
        if match and current is not None:
            instructions[match.group(1)] = match.group(2)
            current.append(match.group(2))
    return instructions, computations


def _entry_instructions(hlo_text: str) -> list[tuple[str, str]]:
    """(name, line) of the entry computation's instructions, in schedule order."""
    out, inside = [], False
    for line in hlo_text.splitlines():
        if line.startswith("ENTRY "):
            inside = True
        elif inside and line.startswith("}"):
            break
        elif inside and (match := _INSTRUCTION.match(line)):
            out.append((match.group(1), match.group(2)))
    return out


def _opcode(line: str) -> str:
    match = _OPCODE.search(" " + line.split(", metadata=")[0])
    return match.group(1) if match else ""


def _classify(line: str, computations: dict[str, list[str]], sources: dict[str, set[str]]) -> str | None:
    """The category of one instruction line (None: a control-flow op, not counted)."""
    opcode = _opcode(line)
    if opcode in _CONTROL_OPS:
        return None
    called = _CALLS.search(line)
    body = computations.get(called.group(1), []) if called else []
    lines = [line, *body]
    text = " ".join(lines)
    if any(target in text for target in _ATTENTION_TARGETS):
        return "attention"
    ops = {_opcode(item) for item in lines}
    if ops & {"dot", "convolution"} or "cublas" in text or "__triton_gemm" in text:
        return "matmul"
    # The stacks of the ops that compute: a fusion's bitcasts and broadcasts of its inputs carry
    # their producer's stack (e.g. the mask's block means of the RoPE'd k would count as RoPE).
    computing = " ".join([line, *(item for item in body if _opcode(item) not in _QUIET_OPS)])
    stack = " ".join(" ".join(sources.get(frame, ())) for frame in _FRAME_ID.findall(computing))
    if "models/rope.py" in stack:
        return "rope"
    if "rsqrt" in ops or any(name in stack for name in _NORM_SOURCES):
        return "norm/modulation"
    if (opcode in _LAYOUT_OPS) or (opcode == "fusion" and body and {_opcode(item) for item in body} <= _LAYOUT_OPS):
        return "copies/casts"
    return "other"


def hlo_categories(hlo_text: str) -> dict[str, str | None]:
    """{instruction name: category (None for control flow)} of an optimized HLO module's text."""
    instructions, computations = _parse(hlo_text)
    sources = _stack_sources(hlo_text)
    return {name: _classify(line, computations, sources) for name, line in instructions.items()}


def trace_file(directory: str | Path) -> str:
    """The one `*.xplane.pb` that `jax.profiler.trace(directory)` wrote (anywhere under it)."""
    (path,) = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)
    return path


def op_breakdown(compiled, args, calls: int = 3, keep: str | Path | None = None) -> dict[str, float]:
    """Seconds per call spent in each of `CATEGORIES` (plus "total"), from a profiler trace of
    `calls` calls of the compiled function `compiled(*args)` (warm: call it once before).
    keep: a directory that receives the trace (`trace.xplane.pb`, readable with
    `jax.profiler.ProfileData.from_file` or TensorBoard's profile plugin) and the optimized HLO
    (`module.hlo.txt`), to read them elsewhere (`python benchmarks/step_profile.py --trace DIR`)."""
    hlo_text = compiled.as_text()
    jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory):
            for _ in range(calls):
                jax.block_until_ready(compiled(*args))
        path = trace_file(directory)
        profile = ProfileData.from_file(path)
        if keep is not None:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, Path(keep) / "trace.xplane.pb")
            (Path(keep) / "module.hlo.txt").write_text(hlo_text)
    # The planes of the platform the function ran on: accelerator devices, or the host threads
    # when it ran on the CPU (also on a machine that has an accelerator).
    platforms = {device.platform for leaf in jax.tree.leaves(args) if isinstance(leaf, jax.Array)
                 for device in leaf.devices()}
    categories = hlo_categories(hlo_text)
    ops = traced_ops(profile, hlo_text, device=platforms != {"cpu"})
    if not ops:
        print("op_breakdown: no traced op matched the compiled module's HLO (profiler format?)", flush=True)
        print(_trace_summary(_planes(profile, platforms != {"cpu"}), categories), flush=True)
    return category_seconds(ops, categories, calls)


def profile_breakdown(profile, hlo_text: str, calls: int = 1) -> tuple[dict[str, float], dict[str, list]]:
    """(seconds per call in each category plus "total", `traced_ops`) of the module `hlo_text` in a
    loaded trace of `calls` calls: its device kernels where the trace has any, else its host ops."""
    ops = traced_ops(profile, hlo_text, device=True) or traced_ops(profile, hlo_text, device=False)
    return category_seconds(ops, hlo_categories(hlo_text), calls), ops


def _planes(profile, device: bool) -> list:
    """The trace's device planes, or (device False) its host CPU plane."""
    prefix = "/device:" if device else "/host:CPU"
    return [plane for plane in profile.planes if plane.name.startswith(prefix)]


def host_event_totals(profile, top: int = 25) -> list[tuple[str, float, int]]:
    """The `top` costliest event names on the host planes of a trace, Python frames (`$file:line
    name`) left out: [(name, seconds summed over all its events, event count)], costliest first.
    Nested events are counted in their own name and in their parents' (XLA's compile passes
    inside `GpuCompiler::...`), so the rows overlap; they show where a compile's host time goes."""
    totals = collections.defaultdict(lambda: [0, 0])
    for plane in profile.planes:
        if plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            for event in line.events:
                if event.name.startswith("$"):
                    continue
                totals[event.name][0] += event.duration_ns
                totals[event.name][1] += 1
    rows = sorted(totals.items(), key=lambda item: -item[1][0])[:top]
    return [(name, ns * 1e-9, count) for name, (ns, count) in rows]


def traced_ops(profile, hlo_text: str, *, device: bool) -> dict[str, list]:
    """{op: [seconds, events]} over a whole trace, op an HLO instruction's name (or, for a kernel
    no instruction accounts for, the kernel's name). device: the accelerator planes' stream lines
    (`kernel_ops`), their "XLA Ops" line where they have no streams (TPU); else the host's
    events that name an op (`event_lookup`)."""
    instructions, _ = _parse(hlo_text)
    by_name = {_kernel_name(name): name for name in instructions}
    calls, module = library_calls(hlo_text), _module_name(hlo_text)
    ops = collections.defaultdict(lambda: [0.0, 0])

    def add(op, duration_ns):
        ops[op][0] += duration_ns * 1e-9
        ops[op][1] += 1

    for plane in _planes(profile, device):
        lines = list(plane.lines)
        events = stream_events(plane) if device else []
        if events:
            for op, duration_ns in kernel_ops(events, by_name, calls, module):
                add(op, duration_ns)
            continue
        # No stream lines: the "XLA Ops" line has one event per op (named after it); else (CPU)
        # every event that carries an hlo_op stat.
        ops_lines = [line for line in lines if line.name == "XLA Ops"]
        for line in ops_lines or lines:
            for event in line.events:
                op = event_lookup(event.name, dict(event.stats), by_name, named_after_op=bool(ops_lines))
                if op is not None:
                    add(op, event.duration_ns)
    return dict(ops)


def _stream_trace_events(plane) -> list:
    """The trace events on a device plane's stream lines (GPU kernels, copies, memsets) in start
    order; [] where the plane has no stream lines (TPU, CPU)."""
    streams = [line for line in plane.lines if line.name.startswith("Stream")]
    return sorted((event for line in streams for event in line.events), key=lambda event: event.start_ns)


def stream_events(plane) -> list[tuple[str, dict, int]]:
    """(name, stats, duration_ns) of `_stream_trace_events(plane)`."""
    return [(e.name, dict(e.stats), e.duration_ns) for e in _stream_trace_events(plane)]


def idle_stretches(events) -> tuple[int, int, list[tuple[int, str, str]]]:
    """Where streams sat idle: events [(name, start_ns, end_ns)] of one device's streams (any
    order; overlapping events of concurrent streams count once) -> (span: first start to last
    end, idle: the part of the span no event covers, in ns; the idle stretches [(ns, the event
    that ended last before it, the event after it)], longest first)."""
    events = sorted(events, key=lambda event: event[1])
    if not events:
        return 0, 0, []
    stretches, (last_name, _, covered) = [], events[0]
    for name, start, end in events[1:]:
        if start > covered:
            stretches.append((start - covered, last_name, name))
        if end >= covered:
            last_name, covered = name, end
    span = covered - events[0][1]
    return span, sum(ns for ns, _, _ in stretches), sorted(stretches, key=lambda stretch: -stretch[0])


def device_idle(profile) -> tuple[float, float, list[tuple[float, str, str]]]:
    """`idle_stretches` of every device plane's stream events in a trace, in seconds (spans and idle
    time summed over devices, stretches merged, longest first); (0, 0, []) without stream lines."""
    span = idle = 0
    stretches = []
    for plane in _planes(profile, True):
        plane_span, plane_idle, plane_stretches = idle_stretches(
            [(e.name, e.start_ns, e.start_ns + e.duration_ns) for e in _stream_trace_events(plane)])
        span, idle, stretches = span + plane_span, idle + plane_idle, stretches + plane_stretches
    stretches.sort(key=lambda stretch: -stretch[0])
    return span * 1e-9, idle * 1e-9, [(ns * 1e-9, before, after) for ns, before, after in stretches]


def seconds_by_program(events) -> dict[str, float]:
    """Seconds of stream events [(name, stats, duration_ns)] summed per program that launched them:
    a kernel's `hlo_module` stat (e.g. "jit_step", "jit_render"), "copies" for memory copies and
    sets without one, "other" for the rest; events of concurrent streams each count."""
    out = collections.Counter()
    for name, stats, ns in events:
        program = stats.get("hlo_module") or ("copies" if re.search(r"mem(cpy|set)", name, re.I) else "other")
        out[str(program)] += ns * 1e-9
    return dict(out)


def device_program_seconds(profile) -> dict[str, float]:
    """`seconds_by_program` of every device plane's stream events in a trace ({} without stream
    lines: a CPU or TPU trace)."""
    return seconds_by_program([event for plane in _planes(profile, True) for event in stream_events(plane)])


def category_seconds(ops: dict[str, list], categories: dict[str, str | None], calls: int) -> dict[str, float]:
    """Seconds per call in each of `CATEGORIES` (plus "total") of `traced_ops`' {op: [seconds,
    events]}; control flow (category None) counts nowhere."""
    seconds = collections.Counter()
    for op, (total, _) in ops.items():
        category = op_category(op, categories)
        if category is not None:
            seconds[category] += total / calls
    out = {category: seconds[category] for category in CATEGORIES}
    out["total"] = sum(out.values())
    return out


def op_category(op: str, categories: dict[str, str | None]) -> str | None:
    """The category of a traced op: its instruction's, else (a kernel no instruction accounts
    for) its library's (`_LIBRARY_CATEGORY`: cuBLAS matmul, cuDNN / Mosaic GPU attention, memsets
    and copies copies/casts), else "other"."""
    if op in categories:
        return categories[op]
    return _LIBRARY_CATEGORY.get(_library(op), "other")


def _module_name(hlo_text: str) -> str | None:
    """The module's name ("jit_step"), as the trace's `hlo_module` stat gives it."""
    match = re.match(r"\s*HloModule\s+([\w.\-]+)", hlo_text)
    return match.group(1) if match else None


def _library(kernel: str) -> str | None:
    """The library of a GPU kernel named `kernel` (`_LIBRARY_KERNELS`), None for XLA's own."""
    return next((library for library, pattern, _ in _LIBRARY_KERNELS if pattern.search(kernel)), None)


def _call_library(line: str) -> str | None:
    """The library (`_LIBRARY_KERNELS`) a custom call instruction line calls, None for another op."""
    target = re.search(r'custom_call_target="([^"]+)"', line) if _opcode(line) == "custom-call" else None
    return target and next((library for library, _, call in _LIBRARY_KERNELS if call and call in target.group(1)),
                           None)


def library_calls(hlo_text: str) -> dict[str, list[str]]:
    """{library: the names of the entry computation's custom calls into it, in schedule order}
    (the libraries of `_LIBRARY_KERNELS`), for the libraries the module calls from its entry
    computation only: a call in a loop's body (scanned layers) runs many times per call of the
    module, so launch order does not tell its kernels apart."""
    out = collections.defaultdict(list)
    for name, line in _entry_instructions(hlo_text):
        if library := _call_library(line):
            out[library].append(name)
    _, computations = _parse(hlo_text)
    everywhere = collections.Counter(filter(None, (_call_library(line) for lines in computations.values()
                                                   for line in lines)))
    return {library: names for library, names in out.items() if everywhere[library] == len(names)}


def kernel_ops(events, by_name: dict[str, str], calls: dict[str, list[str]],
               module: str | None = None) -> list[tuple[str, float]]:
    """(op, duration_ns) of GPU kernel events [(name, stats, duration_ns)] in launch order.

    An event counts when it carries an `hlo_module` stat (`module`'s, where given): its op is
    the instruction its name names (`by_name`: {`_kernel_name` of an instruction: its name}; the
    `hlo_op` stat names an op only where the name does not, and under CUDA graphs it names the
    command buffer); else, a library's kernel (`_library`) is the next of the module's custom
    calls into that library (`calls`, `library_calls`), round and round (one kernel per call,
    e.g. `calls` traced calls of the module); where a library's kernels are not a whole
    multiple of its calls, or a kernel belongs to no library with calls (memsets), the op is the
    kernel's own name (`op_category` sorts it by its library)."""
    counted = [(name, stats, ns) for name, stats, ns in events
               if "hlo_module" in stats and (module is None or stats["hlo_module"] == module)]
    named = [event_lookup(name, stats, by_name, named_after_op=True) for name, stats, _ in counted]
    launches = collections.Counter(_library(name) for (name, _, _), op in zip(counted, named) if op is None)
    aligned = {library for library, count in launches.items()
               if calls.get(library) and count % len(calls[library]) == 0}
    seen, out = collections.Counter(), []
    for (name, _, ns), op in zip(counted, named):
        library = _library(name) if op is None else None
        if library in aligned:
            op = calls[library][seen[library] % len(calls[library])]
            seen[library] += 1
        out.append((op or name, ns))
    return out


def _kernel_name(name: str) -> str:
    """An HLO instruction name as XLA names its GPU kernel: every character other than a letter,
    digit or '_' (e.g. '.' and '-') written as '_'."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def event_lookup(name: str, stats: dict, by_name: dict, *, named_after_op: bool):
    """`by_name`'s entry for a trace event's op ({`_kernel_name` of an instruction: value}): its
    `hlo_op` stat's, else (`named_after_op`, or a GPU kernel: carries `hlo_module`) its name's;
    None when it is not one of the module's ops. An `hlo_op` that names no instruction (a CUDA
    graph's command buffer) defers to the name."""
    keys = [stats.get("hlo_op")] + ([name] if named_after_op or "hlo_module" in stats else [])
    return next((by_name[key] for key in map(_kernel_name, map(str, filter(None, keys))) if key in by_name), None)


def _trace_summary(planes, categories: dict[str, str | None], events: int = 3) -> str:
    """What a trace that matched nothing holds: its lines, a few events with their stats, and a
    few of the HLO names they were matched against (to adapt `op_breakdown` to a new format)."""
    out = [f"  HLO instructions (of {len(categories)}): {', '.join(list(categories)[:5])}"]
    for plane in planes:
        out.append(f"  plane {plane.name}")
        for line in plane.lines:
            shown = list(line.events)[:events]
            out.append(f"    line {line.name!r}: " + "; ".join(
                f"{event.name[:60]!r} {dict(event.stats)}"[:200] for event in shown))
    return "\n".join(out)


def _shape(line: str) -> str:
    """The result shape of an instruction line, without layouts (a tuple: its first element and
    how many more)."""
    text = re.sub(r"\{[\d,]*\}|/\*index=\d+\*/", "", line[:line.find(f" {_opcode(line)}(")]).strip()
    if text.startswith("("):  # a library call's scratch space (s8, u8) left out
        parts = [part for part in re.findall(r"\w+\[[\d,]*\]", text) if not re.match(r"[su]8\[", part)]
        return parts[0] + (f" (+{len(parts) - 1})" if len(parts) > 1 else "") if parts else text
    return text


def _fusion_kind(line: str) -> str:
    """A fusion's kind, with its emitter where the backend config names one ("Custom __triton":
    a Triton block-level fusion; "Loop")."""
    kind = re.search(r"kind=k(\w+)", line)
    emitter = re.search(r'"kind":"(__[\w$.]+)"', line)
    return " ".join(match.group(1) for match in (kind, emitter) if match)


def _size(shape: str) -> int:
    """The number of elements of a shape ("bf16[8,4]": 32; a scalar or token: 1)."""
    dims = re.search(r"\[([\d,]*)\]", shape)
    return math.prod(int(dim) for dim in dims.group(1).split(",") if dim) if dims else 1


def _operands(line: str) -> list[str]:
    """The operand names of an instruction line."""
    opcode = _opcode(line)
    inside = line[line.find(f" {opcode}(") + len(opcode) + 2:]
    return re.findall(r"%([\w.\-]+)", inside[:inside.find(")")])


def _weight(name: str) -> str:
    """A parameter's name as a param path, any layer's index written '*':
    'state__blocks___3___ffn____linear_1____kernel___value.1' -> 'blocks.*.ffn.linear_1.kernel'."""
    name = re.sub(r"^state__|___value(\.\d+)?$", "", name)
    return re.sub(r"___\d+___", ".*.", name).replace("____", ".")


def describe_op(name: str, instructions: dict[str, str], computations: dict[str, list[str]],
                tables: dict[str, dict[str, str]]) -> str:
    """What one traced op computes, in words the same for every layer's copy of it: a fusion's
    kind (`_fusion_kind`), the ops of its body (but `_QUIET_OPS`), its result shape, and its
    widest intermediate where that has another dtype (e.g. an f32 pass over a bf16 tensor);
    another op's opcode or custom call target, operand shapes and weights (`_weight`); then the
    two source lines ("file:function:line", `_stack_tables`) most of its computing ops come from."""
    line = instructions.get(name)
    if line is None:
        return f"{_library(name) or 'unknown'} kernel, no HLO instruction"
    opcode, called = _opcode(line), _CALLS.search(line)
    body = computations.get(called.group(1), []) if called else []
    result = _shape(line)
    if opcode == "fusion":
        ops = sorted({_opcode(item) for item in body} - _QUIET_OPS)
        text = f"{_fusion_kind(line)} fusion of {', '.join(ops[:8])}{', ...' if len(ops) > 8 else ''}"
        widest = max(map(_shape, body), key=lambda shape: (_size(shape), shape.startswith("f32")), default=result)
        if widest.split("[")[0] != result.split("[")[0]:
            text += f", via {widest}"
    else:
        operands = [_shape(instructions[op]) for op in _operands(line) if op in instructions]
        target = re.search(r'custom_call_target="([^"]+)"', line)
        text = f"{target.group(1) if target else opcode} of {' x '.join(operands)}"
        weights = [_weight(op) for op in _operands(line) if op.startswith("state__")]
        text += f" [{', '.join(weights)}]" if weights else ""
    computing = " ".join([line, *(item for item in body if _opcode(item) not in _QUIET_OPS)])
    frames = collections.Counter(_frame_source(tables, frame, line=True).rsplit("/", 1)[-1]
                                 for frame in _FRAME_ID.findall(computing) if frame in tables["StackFrames"])
    frames.pop("", None)
    sources = ", ".join(sorted(sorted(frames, key=lambda source: (-frames[source], source))[:2]))
    return f"{text} -> {result}" + (f" ({sources})" if sources else "")


def top_ops(ops: dict[str, list], hlo_text: str, calls: int = 1, count: int = 15) -> list[dict]:
    """The `count` costliest rows of `traced_ops`' ops, ops that `describe_op` says the same of
    (every layer's copy of an op; leading 1s of shapes aside) summed into one row (control flow
    left out: its body's ops count): {"ms": per call, "share" of the categorised time,
    "launches": per call, "category", "opcode" (a fusion's `_fusion_kind`), "ops": the
    instructions, "what": the description}."""
    instructions, computations = _parse(hlo_text)
    categories, tables = hlo_categories(hlo_text), _stack_tables(hlo_text)
    ops = {op: times for op, times in ops.items() if op_category(op, categories) is not None}  # no control flow
    total = sum(seconds for seconds, _ in ops.values()) or 1.0
    rows = {}
    for op, (seconds, events) in ops.items():
        what = describe_op(op, instructions, computations, tables)
        line = instructions.get(op, "")
        row = rows.setdefault(re.sub(r"\[(1,)+", "[", what), {
            "ms": 0.0, "share": 0.0, "launches": 0.0, "category": op_category(op, categories),
            "opcode": f"fusion ({_fusion_kind(line)})" if _opcode(line) == "fusion" else _opcode(line) or "kernel",
            "ops": [], "what": what})
        row["ms"] += seconds * 1e3 / calls
        row["share"] += seconds / total
        row["launches"] += events / calls
        row["ops"].append(op)
    return sorted(rows.values(), key=lambda row: -row["ms"])[:count]


def top_ops_table(rows: list[dict]) -> str:
    """A markdown table of `top_ops`' rows."""
    lines = ["| ms/step | share | launches/step | category | opcode | op (first of) | what |", "|" + "---|" * 7]
    for row in rows:
        first = row["ops"][0] + (f" (+{len(row['ops']) - 1})" if len(row["ops"]) > 1 else "")
        lines.append(f"| {row['ms']:.2f} | {row['share']:.1%} | {row['launches']:g} | {row['category']} | "
                     f"{row['opcode']} | {first} | {row['what']} |")
    return "\n".join(lines)


def breakdown_table(rows: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per named breakdown, ms per step in each category."""
    head = "| step | " + " | ".join(CATEGORIES) + " | total (ms) |"
    lines = [head, "|" + "---|" * (len(CATEGORIES) + 2)]
    for name, seconds in rows.items():
        cells = " | ".join(f"{seconds[c] * 1e3:.1f} ({seconds[c] / max(seconds['total'], 1e-12):.0%})"
                           for c in CATEGORIES)
        lines.append(f"| {name} | {cells} | {seconds['total'] * 1e3:.1f} |")
    return "\n".join(lines)


def wan_forward_flops(config, grid: tuple[int, int, int], text_len: int, *, attention_keep: float = 1.0,
                      image_tokens: int = 257) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of one `WanModel` forward for one example on the token
    `grid`: {"attention": self-attention QK^T and PV at `attention_keep` of the score blocks,
    "other": every projection, FFN, cross-attention, embedding and head}. Elementwise work
    (norms, RoPE, softmax) is not counted."""
    tokens, d = math.prod(grid), config.dim
    patch = math.prod(config.patch_size)
    image = image_tokens if config.model_type == "i2v" else 0
    per_block = (
        4 * 2 * tokens * d * d  # self-attention q, k, v, o
        + 2 * 2 * tokens * d * d + 2 * 2 * (text_len + image) * d * d  # cross-attention q, o; k, v (+ image)
        + 4 * tokens * (text_len + image) * d  # cross-attention scores and values
        + 2 * 2 * tokens * d * config.ffn_dim  # FFN
    )
    embed = (2 * tokens * config.in_dim * patch * d + 2 * text_len * (config.text_dim * d + d * d)
             + 2 * (config.freq_dim * d + d * d + d * 6 * d) + 2 * tokens * d * config.out_dim * patch)
    if image:
        embed += 2 * image * (config.image_dim * config.image_dim + config.image_dim * d)
    attention = config.num_layers * 4 * tokens * tokens * d * attention_keep
    return {"attention": float(attention), "other": float(config.num_layers * per_block + embed)}


def main(argv=None) -> dict:
    """`--trace DIR`: print where a saved trace's time goes (`profile_breakdown`, `top_ops`) and,
    for a GPU trace, where the device streams sat idle (`device_idle`)."""
    parser = argparse.ArgumentParser(description="Where the time of a saved trace goes, per category and per op "
                                                 "(no accelerator needed).")
    parser.add_argument("--trace", required=True, help="a directory with trace.xplane.pb (anywhere under it) and "
                                                       "module.hlo.txt: op_breakdown's keep, wan_step.py --trace-out")
    parser.add_argument("--calls", type=int, default=1, help="calls of the module the trace holds (wan_step.py "
                                                             "--profile-calls); times are per call")
    parser.add_argument("--top", type=int, default=15, help="rows of the costliest ops")
    args = parser.parse_args(argv)
    hlo_text = next(Path(args.trace).glob("**/module.hlo.txt")).read_text()
    trace = ProfileData.from_file(trace_file(args.trace))
    seconds, ops = profile_breakdown(trace, hlo_text, args.calls)
    rows = top_ops(ops, hlo_text, args.calls, args.top)
    launches = sum(events for _, events in ops.values()) / args.calls
    print(f"Time per category, ms per call ({launches:g} ops or kernels per call):\n")
    print(breakdown_table({Path(args.trace).name: seconds}))
    print(f"\nThe {len(rows)} costliest ops (every layer's copy of an op in one row):\n")
    print(top_ops_table(rows))
    span, idle, stretches = device_idle(trace)
    if span:  # a GPU trace: stream events with start times
        print(f"\nDevice streams idle {idle * 1e3:.2f} ms of the {span * 1e3:.2f} ms from the first event to the last "
              f"(the host's time between traced calls included); the longest idle stretches:")
        for seconds_idle, before, after in stretches[:args.top]:
            print(f"  {seconds_idle * 1e6:9.1f} us  after {before[:60]}  before {after[:60]}")
    return {"breakdown": seconds, "top": rows, "idle": (span, idle, stretches)}


if __name__ == "__main__":
    main()

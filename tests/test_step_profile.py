"""benchmarks/step_profile.py without a GPU, on synthetic HLO modules: what an op's category
says."""

from benchmark_scripts import load_benchmark

profile = load_benchmark("step_profile")


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
    they are not RoPE."""
    categories = profile.hlo_categories(STACK_HLO)
    assert categories["loop_multiply_fusion"] == "rope"
    assert categories["input_reduce_fusion"] == "other"

"""The training step's memory (docs/training.md, "Memory model"): no copy of the optimizer state."""

import re

from benchmark_scripts import load_benchmark

step_memory = load_benchmark("step_memory")


def test_the_step_copies_no_optimizer_state():
    """The non-finite guard branches (`jax.lax.cond`) instead of selecting between the updated
    and the old state: a select read the old optimizer state after its in-place update, and XLA
    copied all of it (twice the trainable params in float32: 31 GiB at 14B with self_attn)."""
    cfg = step_memory.step_config("tiny", (2, 4, 4), ["model.overrides.dim=256", "model.overrides.num_layers=4",
                                                      "optim.trainable=self_attn"])
    text = step_memory.lower_step(cfg).compile().as_text()
    names = re.findall(r"%(\S+) = \S+ parameter\(\d+\).*op_name=\"state\.opt_state", text)
    assert len(names) > 40  # mu and nu of 4 layers' self-attention leaves, and the counts
    assert [name for name in names if f"copy(%{name})" in text] == []

"""Two jax.distributed processes on localhost (gloo, 2 CPU devices each) train together."""

import pytest
from train_launch import SMALL, finish, free_port, start

ARGS = [*SMALL, "steps=3", "data.batch_size=4", "mesh.fsdp=2", "mesh.tensor=2"]


@pytest.mark.slow
def test_two_processes_agree_with_each_other_and_with_one_process(tmp_path):
    port = free_port()
    procs = [
        start(["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), *ARGS,
               f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.every=2"], devices=2)
        for i in range(2)
    ]
    (loss0, sum0), = finish(procs[0])
    (loss1, sum1), = finish(procs[1])
    assert (loss0, sum0) == (loss1, sum1), "both processes see the same replicated loss and parameters"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.is_dir()) == ["2", "3"]

    (loss, checksum), = finish(start(ARGS, devices=4))  # the same mesh in one process
    assert abs(loss - loss0) <= 1e-5 * loss
    assert abs(checksum - sum0) <= 1e-6 * abs(checksum)

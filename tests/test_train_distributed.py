"""Multi-process start-up: cluster detection and argument checks (the real 2-process run is
in test_train_multihost.py)."""

import pytest

from train.distributed import cluster_detected, initialize


@pytest.mark.parametrize(
    "env,want",
    [
        ({}, None),
        ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, None),
        ({"SLURM_NTASKS": "4", "SLURM_PROCID": "2"}, "slurm"),
        ({"TPU_WORKER_HOSTNAMES": "t0"}, None),
        ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, "tpu"),
    ],
)
def test_cluster_detection(env, want):
    assert cluster_detected(env) == want


def test_coordinator_needs_process_count_and_id(monkeypatch):
    for name in ("SPARGE_COORDINATOR_ADDRESS", "SPARGE_NUM_PROCESSES", "SPARGE_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="num_processes and process_id"):
        initialize("127.0.0.1:1", num_processes=2)
    with pytest.raises(ValueError, match=r"process_id must lie in \[0, 2\)"):
        initialize("127.0.0.1:1", num_processes=2, process_id=2)
    monkeypatch.setenv("SPARGE_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("SPARGE_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="num_processes and process_id"):
        initialize()

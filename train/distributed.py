"""Multi-process start-up: `jax.distributed.initialize` from flags, environment or cluster.

Order of precedence: explicit arguments, then the environment variables
SPARGE_COORDINATOR_ADDRESS / SPARGE_NUM_PROCESSES / SPARGE_PROCESS_ID, then JAX's own
cluster auto-detection on SLURM (more than one task) and multi-host TPU pods. With none
of these, training runs as a single process.
"""

from __future__ import annotations

import os

import jax

ENV_PREFIX = "SPARGE_"


def _env_int(name: str) -> int | None:
    value = os.environ.get(ENV_PREFIX + name)
    return None if value in (None, "") else int(value)


def cluster_detected(env=os.environ) -> str | None:
    """"slurm" or "tpu" when running as one task of a multi-process job there, else None."""
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env:
        return "slurm"
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in env:
        return "tpu"
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Initialise jax.distributed when this is a multi-process run; returns whether it did.

    CPU processes exchange collectives over gloo (set before any backend starts).
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_PREFIX + "COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("PROCESS_ID")
    if coordinator_address is not None:
        if num_processes is None or process_id is None:
            raise ValueError("a coordinator address needs num_processes and process_id (flags or SPARGE_* env)")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id must lie in [0, {num_processes}); got {process_id}")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
        return True
    if cluster_detected() is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize()
        return True
    return False

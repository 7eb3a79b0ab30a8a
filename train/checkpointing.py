"""Orbax checkpoints of the train state (params, optimizer state, step, RNG) plus JSON
metadata (data position, config).

Orbax writes each checkpoint into a temporary directory and renames it only once every
file (of every host) is written, so a crash while saving leaves the previous checkpoint
as the latest complete one; the unfinished temporary directory is ignored and cleaned up.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves the train state under `directory` (keeping the newest `keep`); async by default."""

    def __init__(self, directory: str | Path, *, keep: int = 2, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, cleanup_tmp_directories=True
        )
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """Start saving `state` (a pytree of jax Arrays) and `meta` (JSON) as checkpoint `step`;
        with async saving it completes in the background (see `wait`)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, like) -> tuple[object, dict]:
        """(state, meta) of checkpoint `step`; `like` is a pytree of arrays or
        ShapeDtypeStructs whose shardings the restored arrays get."""
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like
        )
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        )
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        """Block until pending async saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

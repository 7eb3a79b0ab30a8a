"""Orbax checkpoints of the train state (params, optimizer state, step, RNG) plus JSON
metadata (data position, config).

Orbax writes each checkpoint into a temporary directory and renames it only once every
file (of every host) is written, so a crash while saving leaves the previous checkpoint
as the latest complete one; the unfinished temporary directory is ignored and cleaned up.
A state holding NaN/inf is never saved; `restore_latest_good` skips damaged checkpoints, and
refuses (renaming nothing) a checkpoint whose arrays are shaped for another train state.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from train.guard import all_finite


class Checkpointer:
    """Saves the train state under `directory` (keeping the newest `keep`); async by default."""

    def __init__(self, directory: str | Path, *, keep: int = 2, async_save: bool = True):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"checkpoint keep must be an int >= 1; got {keep!r}")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, cleanup_tmp_directories=True
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """Start saving `state` (a pytree of jax Arrays) and `meta` (JSON) as checkpoint `step`;
        with async saving it completes in the background (see `wait`). Raises ValueError
        (writing nothing) when a floating leaf of `state` holds NaN/inf."""
        if not all_finite(state):
            raise ValueError(f"refusing to save checkpoint {step}: the state holds NaN/inf")
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

    def read_meta(self, step: int) -> dict | None:
        """The JSON metadata of checkpoint `step` alone (cheap), or None when it cannot be read."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception:  # a damaged checkpoint; restore_latest_good reports it
            return None

    def stored_shapes(self, step: int) -> Counter | None:
        """Counter of the array shapes that checkpoint `step`'s state holds, read from its
        metadata alone, or None when that cannot be read (a damaged checkpoint)."""
        try:
            tree = self.manager.item_metadata(step)["state"]
            return None if tree is None else Counter(tuple(leaf.shape) for leaf in jax.tree.leaves(tree))
        except Exception:  # restore_latest_good reports the damage
            return None

    def restore_latest_good(self, like) -> tuple[int, object, dict] | None:
        """(step, state, meta) of the newest checkpoint that restores and holds finite values,
        or None when there is none. Each damaged newer one is renamed `<step>.damaged` (kept for
        inspection, out of the way of later saves) with a one-line message on stderr. A checkpoint
        whose stored arrays have other shapes than `like`'s (another model, another
        `optim.trainable`) is not damaged: ValueError, and nothing is renamed."""
        damaged = []
        wanted = Counter(tuple(x.shape) for x in jax.tree.leaves(like))
        for step in sorted(self.manager.all_steps(), reverse=True):
            stored = self.stored_shapes(step)
            if stored is not None and stored != wanted:
                raise ValueError(shape_mismatch(step, stored, wanted))
            try:
                state, meta = self.restore(step, like)
                if not all_finite(state):
                    raise ValueError("it holds NaN/inf")
                if meta.get("step") != step:
                    raise ValueError(f"its metadata names step {meta.get('step')!r}")
            except Exception as err:  # Orbax/TensorStore/JSON errors of a truncated or deleted file
                reason = (str(err).strip() or type(err).__name__).splitlines()[0].split(". See full")[0][:200]
                moved = self.directory / f"{step}.damaged"
                if jax.process_index() == 0:
                    (self.directory / str(step)).rename(moved)
                print(f"checkpoint step {step} is damaged ({reason}); moved it to {moved}, trying the previous one",
                      file=sys.stderr, flush=True)
                damaged.append(step)
                continue
            if damaged:
                self.manager.reload()
            return step, state, meta
        if damaged:
            self.manager.reload()
        return None

    def wait(self) -> None:
        """Block until pending async saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def shape_mismatch(step: int, stored: Counter, wanted: Counter) -> str:
    """The error for checkpoint `step` whose state's array shapes (`stored`, a Counter) are not
    the run's (`wanted`)."""
    def listed(counts: Counter) -> str:
        shapes = [f"{n} x {shape}" for shape, n in sorted(counts.items(), key=lambda kv: (len(kv[0]), kv[0]))]
        return ", ".join(shapes[:4]) + (", ..." if len(shapes) > 4 else "") if shapes else "none"

    return (f"--resume: checkpoint step {step} holds a train state of another model or optim.trainable "
            f"({sum(stored.values())} arrays; this run's state has {sum(wanted.values())}): only it has "
            f"{listed(stored - wanted)}; only this run has {listed(wanted - stored)}. Resume with the model "
            "and optim.trainable settings that wrote it, or start a new checkpoint.dir")

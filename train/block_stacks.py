"""How the train state lays out the DiT blocks' params: per layer, or stacked over each run of
scanned blocks, so that the scan reads them and the optimizer updates them as one array per
param of a block instead of one per layer (docs/training.md, "Optimisation")."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

STACKS = "block_stacks"  # key of the stacked runs in a param tree; "blocks" keeps the per-layer ones


@dataclass(frozen=True)
class BlockStacks:
    """runs: `(start, stop)` of each run of consecutive blocks whose params a tree holds stacked:
    `tree["block_stacks"][start]` is the block's param dict with a leading `(stop - start,)` layer
    axis on every leaf; blocks outside every run stay in `tree["blocks"][layer]` (the key is left
    out when no block does). Empty `runs`: the per-layer layout of `nnx.to_pure_dict`."""

    runs: tuple[tuple[int, int], ...] = ()

    @classmethod
    def for_training(cls, parts, like: dict, labels, mode: str) -> BlockStacks:
        """The layout the training of `parts` (`train.model.ModelParts`; `like`: its per-layer
        params, arrays or ShapeDtypeStructs) keeps: none unless `parts.config.scan_layers`, else
        the runs the model scans in `mode` (`WanModel.layer_runs`, the student's attention) cut
        where the blocks' trainable leaves differ (`labels`, `train.optimizer.trainable_labels`),
        so each stacked leaf trains or is frozen as a whole. Runs of one block stay per layer."""
        if not parts.config.scan_layers:
            return cls()
        model = nnx.merge(parts.graphdef, like, parts.rest)
        kinds = [jax.tree.leaves(labels["blocks"][layer]) for layer in range(len(model.blocks))]
        groups = [list(group) for scanned in model.layer_runs(mode)
                  for _, group in itertools.groupby(scanned, key=lambda layer: kinds[layer])]
        return cls(tuple((group[0], group[-1] + 1) for group in groups if len(group) > 1))

    def scan_runs(self, num_layers: int) -> tuple[range, ...]:
        """The runs a model of `num_layers` blocks held in this layout scans (`WanModel.__call__`'s
        `scan_runs`): each stacked run as one, every other block alone."""
        starts = sorted(set(range(num_layers)) - {layer for start, stop in self.runs for layer in range(start + 1, stop)})
        return tuple(range(a, b) for a, b in zip(starts, [*starts[1:], num_layers]))

    def stack(self, tree: dict) -> dict:
        """`tree` (per-layer layout, any leaves) in this layout; None leaves stay None."""
        return self._regroup(tree, lambda blocks: jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks))

    def unstack(self, tree: dict) -> dict:
        """`tree` (this layout) in the per-layer layout; inside a jitted function the per-layer
        leaves are slices that the model's scan stacks back (XLA folds the pair: no copy)."""
        if not self.runs:
            return tree
        out = {key: value for key, value in tree.items() if key != STACKS}
        blocks = dict(tree.get("blocks", {}))
        for start, stop in self.runs:
            leaves, treedef = jax.tree.flatten(tree[STACKS][start])
            layers = [jax.lax.unstack(leaf) for leaf in leaves]
            for j in range(stop - start):
                blocks[start + j] = jax.tree.unflatten(treedef, [layer[j] for layer in layers])
        out["blocks"] = dict(sorted(blocks.items()))
        return out

    def stack_labels(self, labels: dict) -> dict:
        """Per-layer `labels` (strings at the leaves) in this layout: each stacked leaf takes its
        run's label (the same in every layer of it, `for_training`)."""
        return self._regroup(labels, lambda blocks: blocks[0])

    def stack_shardings(self, shardings: dict) -> dict:
        """Per-layer `NamedSharding`s in this layout: a stacked leaf's layer axis is not sharded,
        its other axes as its first layer's."""
        lift = lambda s: NamedSharding(s.mesh, PartitionSpec(None, *s.spec))  # noqa: E731
        return self._regroup(shardings, lambda blocks: jax.tree.map(lift, blocks[0]))

    def _regroup(self, tree: dict, combine) -> dict:
        """`tree` with each run's blocks replaced by `combine(list of their subtrees)` under
        `STACKS`, the other blocks left under "blocks"."""
        if not self.runs:
            return tree
        out = {key: value for key, value in tree.items() if key != "blocks"}
        out[STACKS] = {start: combine([tree["blocks"][layer] for layer in range(start, stop)])
                       for start, stop in self.runs}
        inside = {layer for start, stop in self.runs for layer in range(start, stop)}
        rest = {layer: block for layer, block in tree["blocks"].items() if layer not in inside}
        if rest:
            out["blocks"] = rest
        return out

"""Old spelling of the sampler: it moved to `sparge_jax.tools.sample` (`sparge-sample`).
Running `python -m sparge_jax.sample` or importing this module says so (`sparge_jax.cli.moved_module`)."""

from sparge_jax.cli import moved_module

moved_module(__name__, "sparge_jax.sample", "sparge_jax.tools.sample", "sparge-sample")

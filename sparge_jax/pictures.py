"""Old spelling of the pictures tool: it moved to `sparge_jax.tools.pictures` (`sparge-pictures`).
Running `python -m sparge_jax.pictures` or importing this module says so (`sparge_jax.cli.moved_module`)."""

from sparge_jax.cli import moved_module

moved_module(__name__, "sparge_jax.pictures", "sparge_jax.tools.pictures", "sparge-pictures")

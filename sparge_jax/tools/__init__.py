"""Command-line tools and analysis helpers built on the library (not imported by it).

`sample` (`python -m sparge_jax.tools.sample`): Wan sampling CLI; `pictures`
(`python -m sparge_jax.tools.pictures`): mask and sparsity pictures; `viz`: their rendering;
`compare`: method sweeps against dense attention; `capture`: q/k/v of a Wan forward pass.
"""

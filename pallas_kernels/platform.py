"""The platform a call's computations run on, as the backend choices need it."""

import jax


def target_platform() -> str:
    """"cpu", "gpu" or "tpu": the platform of the device set by an enclosing
    `jax.default_device(...)` (JAX places new computations there), else `jax.default_backend()`.
    So CPU work on a GPU machine (`with jax.default_device(jax.devices("cpu")[0])`) takes the
    CPU paths instead of GPU kernels."""
    device = jax.config.jax_default_device
    if device is None:
        return jax.default_backend()
    platform = device if isinstance(device, str) else device.platform
    return "gpu" if platform in ("cuda", "rocm") else platform

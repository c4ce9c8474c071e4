"""ldm_jax: latent diffusion models in JAX/Flax, from a laptop CPU to TPU pods.

    import ldm_jax
    model = ldm_jax.LatentDiffusion.from_checkpoint("workdirs/shapes_ldm")

Importing the package sets XLA:CPU's convolution library before JAX starts a backend
(`ldm_jax/xla_cpu.py`; `LDM_JAX_XLA_CPU_DEFAULTS=0` turns it off).
"""

from ldm_jax import xla_cpu as _xla_cpu

_xla_cpu.apply_defaults()

__all__ = ["LatentDiffusion"]


def __getattr__(name):
  # Lazy, so `import ldm_jax.data` (e.g. in Grain workers) does not pull in the networks.
  if name == "LatentDiffusion":
    from ldm_jax.ldm import LatentDiffusion
    return LatentDiffusion
  raise AttributeError(f"module 'ldm_jax' has no attribute {name!r}")

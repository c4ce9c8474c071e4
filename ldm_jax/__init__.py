"""ldm_jax: latent diffusion models in JAX/Flax, from a laptop CPU to TPU pods.

    import ldm_jax
    model = ldm_jax.LatentDiffusion.from_checkpoint("workdirs/shapes_ldm")
"""

__all__ = ["LatentDiffusion"]


def __getattr__(name):
  # Lazy, so `import ldm_jax.data` (e.g. in Grain workers) does not pull in the networks.
  if name == "LatentDiffusion":
    from ldm_jax.ldm import LatentDiffusion
    return LatentDiffusion
  raise AttributeError(f"module 'ldm_jax' has no attribute {name!r}")

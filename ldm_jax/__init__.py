"""ldm_jax: latent diffusion models in JAX/Flax, from a laptop CPU to TPU pods."""

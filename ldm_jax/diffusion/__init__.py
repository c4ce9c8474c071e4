"""ldm_jax.diffusion."""

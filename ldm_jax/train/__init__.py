"""ldm_jax.train."""

"""ldm_jax.convert."""

"""ldm_jax.data."""

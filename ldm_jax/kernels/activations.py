"""GELU in torch's exact form and GEGLU with a VJP that keeps only its inputs."""

import math

import jax
import jax.numpy as jnp

from ldm_jax.kernels import vjp


def gelu_erf(x):
  """Exact GELU in torch's form, x * (1 + erf(x / sqrt 2)) / 2 (jax.nn.gelu uses erfc, slower)."""
  return x * 0.5 * (1 + jax.lax.erf(x * (2 ** -0.5)))


@jax.custom_vjp
def geglu(value: jax.Array, gate: jax.Array) -> jax.Array:
  """value * gelu_erf(gate), differentiated from (value, gate) alone.

  JAX's own derivative of the expression keeps four [.., inner] intermediates of the GELU besides
  its inputs; this backward recomputes the GELU and its derivative, Phi(g) + g phi(g), from the
  gate, as torch's GELU backward does. Reverse mode only, as any custom VJP (jax.jvp through it
  raises).
  """
  return value * gelu_erf(gate)


def _geglu_fwd(value, gate):
  return geglu(value, gate), (value, gate)


def _geglu_bwd(residuals, ct):
  # Tied to the cotangent, or XLA merges the recomputed erf with the forward's and keeps it.
  value, gate = vjp.after_cotangent(ct, residuals)
  cdf = 0.5 * (1 + jax.lax.erf(gate * (2 ** -0.5)))  # Phi(gate)
  pdf = jnp.exp(-0.5 * gate * gate) * (2 * math.pi) ** -0.5  # phi(gate)
  return ct * (gate * cdf), ct * value * (cdf + gate * pdf)


geglu.defvjp(_geglu_fwd, _geglu_bwd)

"""Kernels: the operations whose implementation depends on the platform or needs a custom VJP.

Models call these functions and never choose an implementation themselves; each function picks
its form for the platform the computation is lowered for, in `platform.by_platform` (never by
`jax.default_backend()`). A new kernel goes in its own module here with one public entry point;
a platform-specific variant is one more branch of that entry point's `by_platform` call.
"""

from ldm_jax.kernels.activations import geglu, gelu_erf
from ldm_jax.kernels.flash_attention import attention
from ldm_jax.kernels.norm import layer_norm
from ldm_jax.kernels.upsample import nearest_x2, upsample_conv, upsample_conv3x3
from ldm_jax.kernels.vjp import after_cotangent

__all__ = ["after_cotangent", "attention", "geglu", "gelu_erf", "layer_norm", "nearest_x2",
           "upsample_conv", "upsample_conv3x3"]

"""Pre-LayerNorm text transformers: the CLIP / OpenCLIP text towers and the paper's LDM-BERT.

Both families are the same stack of pre-LN blocks (x += attn(LN x); x += mlp(LN x)) over token plus
learned absolute position embeddings; they differ in masking, biases and which output is returned:

* `CLIPTextEncoder`: causal self-attention, biased q/k/v, quick_gelu (OpenAI CLIP, SD 1.x) or
  exact gelu (OpenCLIP, SD 2.x). `output_layer='last'` returns ln_final(last block) = HF
  `CLIPTextModel.last_hidden_state`; `'penultimate'` returns ln_final(second-to-last block) as
  SD 2.x's `FrozenOpenCLIPEmbedder(layer="penultimate")`. The final block is then never run, so it
  is not built either: `layers` is still the checkpoint's depth, and the importer checks that the
  skipped block is in the checkpoint (SD 2.x files hold it).
* `LDMTextTransformer`: the jointly trained text encoder of the LDM paper (CompVis `BERTEmbedder`,
  an x-transformers `Encoder`), bidirectional, q/k/v without bias, head width independent of the
  model width (8 heads x 64 = 512 inside a 1280-wide model), exact-gelu MLP of 4x width, final
  LayerNorm. Same computation as diffusers' `LDMBertModel`.

Inputs are int token ids [B, L] with L <= max_length; positions are 0..L-1. Outputs: [B, L, width].
Ids outside the vocabulary give NaN rows (jnp.take's fill mode) rather than a silent clamp.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax import kernels
from ldm_jax.models import layers

Dtype = Any

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh", "relu")


def activation(name: str, x: jax.Array) -> jax.Array:
  """The MLP non-linearity by name (the names used across CLIP/BERT configs, normalised)."""
  if name == "quick_gelu":  # OpenAI CLIP: x * sigmoid(1.702 x)
    return x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":  # torch nn.GELU() / HF "gelu": the exact erf form
    return jax.nn.gelu(x, approximate=False)
  if name == "gelu_tanh":  # HF "gelu_new" / "gelu_pytorch_tanh"
    return jax.nn.gelu(x, approximate=True)
  if name == "relu":
    return jax.nn.relu(x)
  raise ValueError(f"activation={name!r}; expected one of {ACTIVATIONS}.")


def check_tokens(tokens: jax.Array, max_length: int, what: str) -> None:
  """Shape check at the model boundary: tokens must be [B, L] with L <= max_length."""
  if tokens.ndim != 2:
    raise ValueError(f"{what}: tokens.shape={tuple(tokens.shape)}; expected [batch, length].")
  if tokens.shape[1] > max_length:
    raise ValueError(f"{what}: token length {tokens.shape[1]} exceeds max_length={max_length} "
                     "(the number of learned positions).")


class SelfAttention(nn.Module):
  """Multi-head self-attention with separate q/k/v projections and a biased output projection."""
  heads: int
  head_dim: int
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    b, l, width = x.shape
    inner = self.heads * self.head_dim

    def proj(name):
      y = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                   name=name)(x)  # [B, L, heads * d]
      return y.reshape(b, l, self.heads, self.head_dim)  # [B, L, heads, d]

    # Scale d^-0.5 on the logits, as every reference here (HF scales q first: same product).
    y = kernels.attention(proj("q"), proj("k"), proj("v"), mask=mask)  # [B, L, heads, d]
    return nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="out")(y.reshape(b, l, inner))  # [B, L, width]


class PreLNBlock(nn.Module):
  """x += attn(LN x); x += fc2(act(fc1(LN x)))."""
  heads: int
  head_dim: int
  mlp_dim: int
  activation: str
  qkv_bias: bool = True
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.LayerNorm(self.epsilon, name="ln_attn", **kw)(x)
    x = x + SelfAttention(self.heads, self.head_dim, self.qkv_bias, name="attn", **kw)(h, mask)
    h = layers.LayerNorm(self.epsilon, name="ln_mlp", **kw)(x)
    h = nn.Dense(self.mlp_dim, name="fc1", **kw)(h)  # [B, L, mlp_dim]
    h = activation(self.activation, h)
    h = nn.Dense(x.shape[-1], name="fc2", **kw)(h)  # [B, L, width]
    return x + h


class TextEmbedding(nn.Module):
  """Token embedding plus learned absolute positions 0..L-1."""
  vocab_size: int
  width: int
  max_length: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    tok = self.param("token_embedding", nn.initializers.normal(0.02),
                     (self.vocab_size, self.width), self.param_dtype)
    pos = self.param("position_embedding", nn.initializers.normal(0.01),
                     (self.max_length, self.width), self.param_dtype)
    x = jnp.take(tok, tokens, axis=0) + pos[None, :tokens.shape[1]]  # [B, L, W]
    return x.astype(self.dtype)


class CLIPTextEncoder(nn.Module):
  """CLIP / OpenCLIP text transformer returning per-token features (SD cross-attention context).

  Attributes:
    vocab_size: 49408 for every CLIP BPE vocabulary.
    width, layers, heads: transformer size (ViT-L/14: 768, 12, 12; OpenCLIP ViT-H/14: 1024, 24, 16).
    max_length: number of learned positions (77).
    activation: 'quick_gelu' (OpenAI CLIP, SD 1.x) or 'gelu' (OpenCLIP ViT-H, SD 2.x).
    output_layer: 'last' or 'penultimate'; ln_final is applied to the chosen layer either way.
    mlp_dim: MLP hidden width (None: 4 * width).
    epsilon: LayerNorm epsilon (1e-5 in both CLIP and OpenCLIP).
  """
  vocab_size: int = 49408
  width: int = 768
  layers: int = 12
  heads: int = 12
  max_length: int = 77
  activation: str = "quick_gelu"
  output_layer: str = "last"
  mlp_dim: int | None = None
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def num_blocks(self) -> int:
    """Blocks that are built and run: `layers`, or `layers - 1` for the penultimate output."""
    return self.layers - (1 if self.output_layer == "penultimate" else 0)

  @nn.compact
  def __call__(self, tokens):
    """tokens [B, L] int -> [B, L, width]."""
    check_tokens(tokens, self.max_length, "CLIPTextEncoder")
    if self.output_layer not in ("last", "penultimate"):
      raise ValueError(f"CLIPTextEncoder.output_layer={self.output_layer!r}; "
                       "expected 'last' or 'penultimate'.")
    if self.width % self.heads:
      raise ValueError(f"CLIPTextEncoder: width={self.width} is not divisible by "
                       f"heads={self.heads}.")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"CLIPTextEncoder.activation={self.activation!r}; expected one of "
                       f"{ACTIVATIONS}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = TextEmbedding(self.vocab_size, self.width, self.max_length, name="embed",
                      **kw)(tokens)  # [B, L, W]
    l = tokens.shape[1]
    causal = jnp.tril(jnp.ones((l, l), dtype=bool))[None, None]  # [1, 1, L, L]; True = attend
    for i in range(self.num_blocks):
      x = PreLNBlock(self.heads, self.width // self.heads, self.mlp_dim or 4 * self.width,
                     self.activation, qkv_bias=True, epsilon=self.epsilon, name=f"blocks_{i}",
                     **kw)(x, causal)
    return layers.LayerNorm(self.epsilon, name="ln_final", **kw)(x)  # [B, L, W]


class LDMTextTransformer(nn.Module):
  """The LDM paper's text encoder (CompVis BERTEmbedder / diffusers LDMBertModel).

  Tokens come from the BERT uncased tokenizer padded with 0 to 77; the original passes no padding
  mask, so `mask` defaults to None (full bidirectional attention over the padding too).

  Attributes:
    vocab_size, max_length: 30522 and 77 in the released LAION model.
    width, depth: 1280 and 32 in the released model ("n_embed", "n_layer").
    heads, head_dim: x-transformers defaults 8 and 64, independent of `width`.
    mlp_ratio: MLP hidden width = mlp_ratio * width (4).
  """
  vocab_size: int = 30522
  max_length: int = 77
  width: int = 1280
  depth: int = 32
  heads: int = 8
  head_dim: int = 64
  mlp_ratio: int = 4
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, mask=None):
    """tokens [B, L] int, optional mask [B, L] (True/1 = real token) -> [B, L, width]."""
    check_tokens(tokens, self.max_length, "LDMTextTransformer")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = TextEmbedding(self.vocab_size, self.width, self.max_length, name="embed",
                      **kw)(tokens)  # [B, L, W]
    attn_mask = None if mask is None else mask.astype(bool)[:, None, None, :]  # [B, 1, 1, L]
    for i in range(self.depth):
      x = PreLNBlock(self.heads, self.head_dim, self.mlp_ratio * self.width, "gelu",
                     qkv_bias=False, epsilon=self.epsilon, name=f"blocks_{i}", **kw)(x, attn_mask)
    return layers.LayerNorm(self.epsilon, name="ln_final", **kw)(x)  # [B, L, W]

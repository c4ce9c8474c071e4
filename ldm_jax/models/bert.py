"""BERT encoder compatible with Hugging Face `BertModel` (its `last_hidden_state`).

Post-LayerNorm blocks (x = LN(x + attn(x)); x = LN(x + mlp(x))), LayerNorm eps 1e-12, exact
gelu, word + absolute position + token-type embeddings followed by a LayerNorm. The padding mask
hides keys only, as in HF: padded query rows are still computed (and are meaningless, as there).
The pooler is not part of this module: latent diffusion conditions on per-token features.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.models import layers
from ldm_jax.models.text import ACTIVATIONS, SelfAttention, activation, check_tokens

Dtype = Any


class BertEmbeddings(nn.Module):
  """word + position + token_type embeddings, then LayerNorm."""
  vocab_size: int
  width: int
  max_position: int
  type_vocab_size: int
  epsilon: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_type_ids):
    init = nn.initializers.normal(0.02)
    word = self.param("word_embeddings", init, (self.vocab_size, self.width), self.param_dtype)
    pos = self.param("position_embeddings", init, (self.max_position, self.width),
                     self.param_dtype)
    types = self.param("token_type_embeddings", init, (self.type_vocab_size, self.width),
                       self.param_dtype)
    x = (jnp.take(word, input_ids, axis=0) + pos[None, :input_ids.shape[1]]
         + jnp.take(types, token_type_ids, axis=0))  # [B, L, W]
    return layers.LayerNorm(self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                            name="ln")(x.astype(self.dtype))


class PostLNBlock(nn.Module):
  """x = LN(x + attn(x)); x = LN(x + fc2(act(fc1(x))))."""
  heads: int
  mlp_dim: int
  activation: str
  epsilon: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    h = SelfAttention(self.heads, width // self.heads, qkv_bias=True, name="attn", **kw)(x, mask)
    x = layers.LayerNorm(self.epsilon, name="ln_attn", **kw)(x + h)
    h = nn.Dense(self.mlp_dim, name="fc1", **kw)(x)  # [B, L, mlp_dim]
    h = nn.Dense(width, name="fc2", **kw)(activation(self.activation, h))  # [B, L, W]
    return layers.LayerNorm(self.epsilon, name="ln_mlp", **kw)(x + h)


class BertEncoder(nn.Module):
  """HF-compatible BERT: (input_ids, attention_mask, token_type_ids) -> last_hidden_state.

  Attributes (HF config names in brackets):
    vocab_size [vocab_size], max_position [max_position_embeddings],
    type_vocab_size [type_vocab_size], width [hidden_size], layers [num_hidden_layers],
    heads [num_attention_heads], mlp_dim [intermediate_size], activation [hidden_act, normalised],
    epsilon [layer_norm_eps]. Defaults are bert-base-uncased.
  """
  vocab_size: int = 30522
  max_position: int = 512
  type_vocab_size: int = 2
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  activation: str = "gelu"
  epsilon: float = 1e-12
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
    """input_ids [B, L] int; attention_mask [B, L] (1 = real token); token_type_ids [B, L].

    Returns [B, L, width].
    """
    check_tokens(input_ids, self.max_position, "BertEncoder")
    if self.width % self.heads:
      raise ValueError(f"BertEncoder: width={self.width} is not divisible by heads={self.heads}.")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"BertEncoder.activation={self.activation!r}; expected one of "
                       f"{ACTIVATIONS}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = BertEmbeddings(self.vocab_size, self.width, self.max_position, self.type_vocab_size,
                       self.epsilon, name="embed", **kw)(input_ids, token_type_ids)  # [B, L, W]
    mask = None
    if attention_mask is not None:
      mask = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]  # [B, 1, 1, L] keys only
    for i in range(self.layers):
      x = PostLNBlock(self.heads, self.mlp_dim, self.activation, self.epsilon, name=f"blocks_{i}",
                      **kw)(x, mask)
    return x  # [B, L, W]


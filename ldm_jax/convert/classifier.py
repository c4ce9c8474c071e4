"""Weight import for `ldm_jax.models.classifier.EncoderUNet` from torch checkpoints.

  * `classifier_from_state_dict(state_dict, model)`: an `EncoderUNetModel` state dict with its own
    key names (guided-diffusion's classifier checkpoints, or CompVis's with `model.` stripped).
  * `classifier_state_dict(sd)`: the classifier's part of a checkpoint: CompVis's Lightning
    `NoisyLatentImageClassifier` keeps the classifier under `model.` and the frozen diffusion model
    it was trained with under `diffusion_model.`; a bare state dict is returned as it is.
  * `load_classifier(path, model)`: a checkpoint file of either kind -> our parameter tree.
  * `head_of_state_dict(sd)`: the head (pool) and the class count a state dict was saved with.
  * `load_for_unet(path, unet_kwargs, image_size)`: a checkpoint file -> (EncoderUNet kwargs,
    params), the network built as CompVis builds it from the diffusion model's UNet config.

Like the UNet importer, this walks the `jax.eval_shape` parameter template and names the torch
key of every leaf (`convert.common.strict_load`): a missing, unexpected or mis-shaped tensor is an
error listing them all. The trunk's keys are the UNet's (`convert.unet`), found through the
encoder's `unet.Layer` layout.
"""

from pathlib import Path as FilePath
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.convert import common
from ldm_jax.convert import torch_io
from ldm_jax.convert import unet as convert_unet
from ldm_jax.models import classifier as classifier_lib

Path = tuple[str, ...]
# Lightning prefixes of CompVis's NoisyLatentImageClassifier.
CLASSIFIER_PREFIX = "model."
DIFFUSION_PREFIX = "diffusion_model."


def _template(model: classifier_lib.EncoderUNet) -> dict:
  """Abstract parameters of `model` (nothing is allocated)."""
  size = model.image_size if model.pool == "attention" else 2 ** (len(model.channel_mult) - 1)
  x = jnp.zeros((1, size, size, model.in_channels), model.dtype)
  t = jnp.zeros((1,), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)["params"]


# torch rank of the head's weight matrices: the adaptive head's 1x1 Conv2d, the attention head's
# Conv1d qkv_proj / c_proj, the spatial heads' Linear layers.
_HEAD_KERNEL_RANK = {"adaptive": 4, "attention": 3, "spatial": 2, "spatial_v2": 2}


def _head_key(path: Path, pool: str) -> tuple[str, Any]:
  """(torch key, transform) for a leaf of the head, `out_{i}/...` -> `out.{i}....`."""
  index = path[0][len("out_"):]
  sub, leaf = [m for m in path[1:-1] if m != "norm"], path[-1]
  name = ".".join([f"out.{index}"] + sub)
  if leaf == "positional_embedding":
    # torch [C, 1 + HW] -> ours [1 + HW, C]; a tensor of another rank stays as it is, so the
    # shape check reports it.
    return f"{name}.positional_embedding", lambda w: w.T if w.ndim == 2 else w
  if leaf == "kernel":
    return f"{name}.weight", convert_unet._dense(_HEAD_KERNEL_RANK[pool])
  return f"{name}.{convert_unet._LEAF[leaf]}", common.identity


def key_map(model: classifier_lib.EncoderUNet) -> dict[Path, tuple[str, Any]]:
  """Every parameter path of `model` -> (torch key, transform to our layout)."""
  inputs, middle = model.trunk_layout()
  positions = {}
  for layer in [l for block in inputs for l in block] + middle:
    positions[layer.name] = (layer, f"middle_block.{layer.pos}" if layer.stage == "middle"
                             else f"input_blocks.{layer.block}.{layer.pos}")

  def key_fn(path: Path):
    head = path[0]
    if head in ("time_embed_0", "time_embed_2"):
      name = convert_unet._TOP[head][0]
      if path[-1] == "kernel":
        return f"{name}.weight", convert_unet._dense(2)
      return f"{name}.{convert_unet._LEAF[path[-1]]}", common.identity
    if head.startswith("out_"):
      return _head_key(path, model.pool)
    layer, prefix = positions[head]
    suffix, transform = convert_unet._local(layer, path[1:], False, False)
    return f"{prefix}.{suffix}", transform

  return {path: key_fn(path) for path in common.flatten(_template(model))}


def classifier_from_state_dict(state_dict: Mapping[str, np.ndarray],
                               model: classifier_lib.EncoderUNet) -> dict:
  """EncoderUNetModel state dict (its own key names) -> our params tree.

  Raises common.WeightLoadError naming every missing, unexpected or mis-shaped key.
  """
  keys = key_map(model)
  return common.strict_load(_template(model), state_dict, keys.__getitem__,
                            what=f"EncoderUNet (pool={model.pool!r})")


def classifier_state_dict(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The classifier's tensors of a checkpoint, with their EncoderUNetModel key names.

  A CompVis Lightning state dict (any `model.` key) gives its `model.` tensors, prefix stripped;
  its `diffusion_model.` tensors (the frozen LDM saved beside the classifier) are dropped, and
  anything else is kept as it is, so that the strict load reports it as unexpected. Any other
  dict is taken as a bare EncoderUNetModel state dict.
  """
  if not any(k.startswith(CLASSIFIER_PREFIX) for k in sd):
    return dict(sd)
  out = {}
  for key, value in sd.items():
    if key.startswith(CLASSIFIER_PREFIX):
      out[key[len(CLASSIFIER_PREFIX):]] = value
    elif not key.startswith(DIFFUSION_PREFIX):
      out[key] = value
  return out


def load_classifier(path, model: classifier_lib.EncoderUNet) -> dict:
  """A classifier checkpoint file (.ckpt / .pt / .safetensors, CompVis or guided-diffusion keys)
  -> our params tree, read without torch through the hardened reader (`convert.torch_io`).

  Raises torch_io.CheckpointError for an unreadable file and common.WeightLoadError (naming the
  file) for one that does not fit `model`.
  """
  sd = classifier_state_dict(torch_io.load_state_dict(path))
  try:
    return classifier_from_state_dict(sd, model)
  except common.WeightLoadError as e:
    raise common.WeightLoadError(f"{FilePath(path)}: {e}") from None


def head_of_state_dict(sd: Mapping[str, np.ndarray]) -> tuple[str, int]:
  """(pool, num_classes) of an EncoderUNetModel state dict (its own key names), read from the
  head's last layer: `out.2.c_proj` (attention), `out.3` conv (adaptive), `out.2` linear
  (spatial) or `out.3` linear (spatial_v2). Raises common.WeightLoadError for none of these."""
  shape = lambda key: tuple(np.shape(sd[key]))
  if "out.2.c_proj.bias" in sd:
    return "attention", shape("out.2.c_proj.bias")[0]
  if "out.3.weight" in sd:
    return ("adaptive" if len(shape("out.3.weight")) == 4 else "spatial_v2",
            shape("out.3.weight")[0])
  if "out.2.weight" in sd:
    return "spatial", shape("out.2.weight")[0]
  heads = sorted(k for k in sd if k.startswith("out."))[:6]
  raise common.WeightLoadError(
      f"no classifier head found: expected out.2.c_proj.* (attention pool), out.3.* (adaptive "
      f"or spatial_v2) or out.2.* (spatial); the checkpoint's out.* keys: {heads or 'none'}.")


def load_for_unet(path, unet_kwargs: dict, image_size: int) -> tuple[dict, dict]:
  """A classifier checkpoint file -> (EncoderUNet kwargs, params) for a diffusion model.

  The trunk's fields come from the diffusion UNet's kwargs (`encoder_kwargs_from_unet`, as
  CompVis's NoisyLatentImageClassifier builds its network), the head and the class count from the
  file; image_size is the latent size. Raises torch_io.CheckpointError for an unreadable file,
  common.WeightLoadError (naming the file) for one that does not fit.
  """
  sd = classifier_state_dict(torch_io.load_state_dict(path))
  try:
    pool, num_classes = head_of_state_dict(sd)
    kwargs = classifier_lib.encoder_kwargs_from_unet(unet_kwargs, num_classes=num_classes,
                                                     image_size=image_size, pool=pool)
    model = classifier_lib.EncoderUNet(**kwargs)
    model.trunk_layout()  # A UNet config the classifier cannot take fails here, by field name.
    return kwargs, classifier_from_state_dict(sd, model)
  except (common.WeightLoadError, ValueError) as e:
    raise common.WeightLoadError(f"{FilePath(path)}: {e}") from None

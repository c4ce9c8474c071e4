"""Helpers of the config tests (tests/test_configs.py, tests/test_configs_full.py).

`abstract_model` builds a config's networks through `ldm_jax.models.build` under `jax.eval_shape`
(nothing allocated), caching traces of networks that several configs share; `check_config_builds`
validates a config and checks that its sections fit together (latent size and channels, concat and
context widths). Tracing a full-size network costs seconds on CPU, hence the caches and the split
of the tests into the tiny variants (test_configs.py) and the full-size ones (test_configs_full.py).
"""

import dataclasses
import functools
import importlib
import pathlib

import jax
import jax.numpy as jnp

from ldm_jax import validate
from ldm_jax.parallel import count_params
from ldm_jax.models import build
from ldm_jax.models import classifier as classifier_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "convert" / "fixtures"
EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs").glob("*.py")
                     if p.stem not in ("common", "__init__"))
VARIANTS = ("", "tiny")
TEXT_TOKENIZERS = ("shapes", "bert", "clip", "openclip", None)

def get_config(name: str, variant: str = ""):
  return importlib.import_module(f"configs.{name}").get_config(variant)


def module_fields(module) -> dict:
  """A Flax module's constructor fields (what defines the network), lists as tuples."""
  out = {}
  for f in dataclasses.fields(module):
    if f.name in ("parent", "name"):
      continue
    v = getattr(module, f.name)
    out[f.name] = tuple(v) if isinstance(v, list) else v
  return out


def field_diff(ours: dict, ref: dict) -> dict:
  return {k: (ours.get(k, "<absent>"), ref.get(k, "<absent>")) for k in set(ours) | set(ref)
          if ours.get(k, "<absent>") != ref.get(k, "<absent>")}


def _key(section) -> str:
  return repr(sorted(section.to_dict().items()) if hasattr(section, "to_dict") else section)


_FIRST_STAGE_CACHE: dict = {}
_UNET_CACHE: dict = {}


def _abstract_first_stage(cfg, size: int, with_outputs: bool):
  """Variables (and the encoder's output shape) of a first stage; cached by its config, since many
  LDMs share one autoencoder. Tracing is the slow part: outputs only where asked."""
  key = (_key(cfg), size, with_outputs)
  if key in _FIRST_STAGE_CACHE:
    return _FIRST_STAGE_CACHE[key]
  fs = build.build_first_stage(cfg)
  image = jax.ShapeDtypeStruct((1, size, size, cfg.kwargs.in_channels), jnp.float32)
  rng = jax.random.PRNGKey(0)
  variables = jax.eval_shape(lambda x: fs.init({"params": rng, "sample": rng}, x), image)
  latent = None
  if with_outputs:
    latent = jax.eval_shape(lambda v, x: fs.apply(v, x, method=fs.encode), variables, image)
    latent = getattr(latent, "mean", latent).shape  # KL: the posterior's mean
  _FIRST_STAGE_CACHE[key] = variables, latent
  return variables, latent


def _cond_input(cs_cfg, size: int):
  kind = cs_cfg["kind"]
  if kind in build.TEXT_ENCODERS:
    return jax.ShapeDtypeStruct((1, cs_cfg["kwargs"]["max_length"]), jnp.int32)
  if kind == "class":
    return jax.ShapeDtypeStruct((1,), jnp.int32)
  if kind == "spatial_rescaler":
    return jax.ShapeDtypeStruct((1, size, size, cs_cfg["kwargs"]["in_channels"]), jnp.float32)
  return None


@functools.lru_cache(maxsize=None)
def abstract_model(name: str, variant: str) -> dict:
  """Parameter shapes of each network (jax.eval_shape: nothing is allocated); for the tiny
  variants also the output shapes (tracing the full-size applies would double the test time)."""
  c = get_config(name, variant)
  rng = jax.random.PRNGKey(0)
  with_outputs = variant == "tiny"
  size = c.data.image_size
  f = 2 ** (len(c.model.first_stage.kwargs.ch_mult) - 1)
  fs_vars, latent = _abstract_first_stage(c.model.first_stage, size, with_outputs)
  out = dict(f=f, first_stage=fs_vars, latent=latent, cond_out=None, unet_out=None)
  if c.stage == "classifier":  # The noisy-latent classifier reads the first stage's latents.
    net = classifier_lib.EncoderUNet(**c.model.classifier.to_dict())
    h = size // f
    x = jax.ShapeDtypeStruct((1, h, h, net.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    out["classifier"] = jax.eval_shape(net.init, rng, x, t)
    if with_outputs:
      out["logits"] = jax.eval_shape(net.apply, out["classifier"], x, t).shape
  if c.stage != "ldm":
    return out

  cs_cfg = c.model.get("cond_stage", None) or {"kind": "none"}
  cs = build.build_cond_stage(cs_cfg)
  if cs is not None:
    cond_in = _cond_input(cs_cfg, size)
    out["cond_stage"] = jax.eval_shape(cs.init, rng, cond_in)
    if with_outputs:
      out["cond_out"] = jax.eval_shape(cs.apply, out["cond_stage"], cond_in).shape

  unet_cfg = c.model.unet
  h = size // f
  x = jax.ShapeDtypeStruct((1, h, h, unet_cfg.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  context = (jax.ShapeDtypeStruct((1, 1, unet_cfg.context_dim), jnp.float32)
             if unet_cfg.context_dim else None)
  y = jax.ShapeDtypeStruct((1,), jnp.int32) if unet_cfg.num_classes else None
  key = (_key(unet_cfg), h, with_outputs)
  if key not in _UNET_CACHE:  # CelebA-HQ, FFHQ and LSUN-Bedrooms share one network.
    unet = build.build_unet(unet_cfg)
    variables = jax.eval_shape(unet.init, rng, x, t, context, y)
    shape = (jax.eval_shape(unet.apply, variables, x, t, context, y).shape if with_outputs
             else None)
    _UNET_CACHE[key] = variables, shape
  out["unet"], out["unet_out"] = _UNET_CACHE[key]
  return out


def check_config_builds(name: str, variant: str) -> dict:
  """Validates a config, builds its networks abstractly and checks that its sections fit."""
  c = get_config(name, variant)
  validate.check_config(c)
  m = abstract_model(name, variant)
  fs_kw = c.model.first_stage.kwargs
  latent = c.data.image_size // m["f"]
  assert count_params(m["first_stage"]) > 0
  if variant == "tiny":
    assert c.data.source == "shapes"
    assert c.data.image_size in (32, 64)
    assert c.train.num_steps <= 10 and c.data.batch_size <= 4
    assert not c.init_from, "tiny variants start from scratch"
    assert m["latent"] == (1, latent, latent, fs_kw.embed_dim)
  if c.stage == "classifier":
    assert count_params(m["classifier"]) > 0
    assert c.model.classifier.in_channels == fs_kw.embed_dim == c.model.diffusion.channels
    assert c.model.diffusion.image_size == latent, "diffusion.image_size is the latent size"
    if variant == "tiny":
      assert m["logits"] == (1, c.model.classifier.num_classes)
    return m
  if c.stage != "ldm":
    assert c.loss.kind == c.model.first_stage.kind
    return m

  d = c.model.diffusion
  unet = c.model.unet
  cs = c.model.get("cond_stage", None) or {"kind": "none"}
  kind = cs["kind"]
  assert kind in build.COND_KINDS
  assert count_params(m["unet"]) > 0
  assert d.image_size == latent, "diffusion.image_size is the latent size"
  assert d.channels == fs_kw.embed_dim == unet.out_channels
  concat = unet.in_channels - fs_kw.embed_dim
  # The Stable Diffusion family's concat widths: [hole mask, masked-image latents], the depth
  # map, the low-resolution RGB image.
  family_concat = {"LatentInpaintDiffusion": 1 + fs_kw.embed_dim, "LatentDepth2ImageDiffusion": 1,
                   "LatentUpscaleDiffusion": 3}
  if d.get("model_target", None) in family_concat:
    assert concat == family_concat[d.model_target]
  else:
    assert concat > 0 if d.conditioning_key == "concat" else concat == 0
  if d.conditioning_key == "hybrid-adm":  # The upscaler's noise level is the class label.
    assert unet.num_classes > d.low_scale.max_noise_level
  # The width the cond stage produces (read from its fields; traced below for tiny variants).
  width = {"class": "embed_dim", "spatial_rescaler": "out_channels"}.get(kind, "width")
  if d.conditioning_key in ("crossattn", "hybrid", "hybrid-adm") and kind != "first_stage":
    assert unet.use_spatial_transformer
    assert cs["kwargs"][width] == unet.context_dim, "the context width feeds cross-attention"
    # Classifier-free guidance needs condition dropout (layout2img's box tokens have no null).
    if kind == "class" or cs.get("tokenizer", {}).get("kind"):
      assert c.train.cond_drop_prob > 0
  if kind == "spatial_rescaler":  # The rescaled map is the concat input, at latent size.
    assert cs["kwargs"]["out_channels"] == concat
    assert c.data.image_size * cs["kwargs"]["multiplier"] ** cs["kwargs"]["n_stages"] == latent
  if variant == "tiny":
    assert m["unet_out"] == (1, latent, latent, unet.out_channels)
    if d.conditioning_key in ("crossattn", "hybrid", "hybrid-adm") and kind != "first_stage":
      assert m["cond_out"][-1] == unet.context_dim
    if kind == "spatial_rescaler":
      assert m["cond_out"] == (1, latent, latent, concat)
  if kind in build.TEXT_ENCODERS:
    assert cs["tokenizer"]["kind"] in TEXT_TOKENIZERS
    if variant == "tiny":  # CPU smoke runs need no tokenizer files.
      assert cs["tokenizer"]["kind"] in ("shapes", None)
  if kind == "class":
    n = cs["kwargs"]["n_classes"]
    assert n == (19 if variant == "tiny" or name.startswith("shapes") else 1001)
  return m

"""EncoderUNet against OpenAI guided-diffusion's `EncoderUNetModel`, and its checkpoint import.

The reference is the `guided_diffusion` package of `guided-diffusion-sdk` (installed with
--no-deps, see scripts/test.sh). Every torch weight is re-randomised (the zero-initialised output
conv and attention projections too, or a wrong head could pass), the state dict goes through
`convert.classifier`, and the logits must agree to 1e-4 of their scale in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ldm_jax.convert import classifier as convert_classifier
from ldm_jax.convert import common
from ldm_jax.models import classifier as classifier_lib

IMAGE = 8
BASE = dict(in_channels=3, model_channels=32, num_res_blocks=1, channel_mult=(1, 2))
CONFIGS = {
    # Heads by count, plain norm, conv downsampling, attention only at the lower level.
    "adaptive": dict(BASE, attention_resolutions=(2,), num_heads=2, pool="adaptive"),
    # Per-head channels, scale-shift norm, ResBlock downsampling, attention at both levels.
    "attention": dict(BASE, attention_resolutions=(1, 2), num_head_channels=16,
                      use_scale_shift_norm=True, resblock_updown=True, pool="attention"),
    "spatial": dict(BASE, attention_resolutions=(2,), num_head_channels=16,
                    use_scale_shift_norm=True, pool="spatial"),
    "spatial_v2": dict(BASE, attention_resolutions=(1,), num_heads=1, resblock_updown=True,
                       pool="spatial_v2"),
    # Adaptive head with the other two switches on and two res blocks per level.
    "adaptive_updown": dict(BASE, num_res_blocks=2, attention_resolutions=(2,),
                            num_head_channels=32, use_scale_shift_norm=True,
                            resblock_updown=True, pool="adaptive"),
}
CLASSES = 5


def _reference(cfg):
  gd_unet = pytest.importorskip("guided_diffusion.unet")
  torch.manual_seed(0)
  m = gd_unet.EncoderUNetModel(image_size=IMAGE, out_channels=CLASSES, **cfg).eval()
  with torch.no_grad():
    for p in m.parameters():
      p.normal_(0, 0.2)
  return m


def _ours(cfg):
  return classifier_lib.EncoderUNet(num_classes=CLASSES, image_size=IMAGE, **cfg)


def _inputs():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, IMAGE, IMAGE, 3)).astype(np.float32)  # NHWC
  t = np.array([3.0, 517.0], np.float32)
  return x, t


def _apply(model, params, x, t):
  return jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))(params, x, t)


def _reference_logits(ref, x, t):
  with torch.no_grad():
    return ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t)).numpy()


def _assert_close(ours, ref):
  assert ours.shape == ref.shape == (2, CLASSES)
  scale = np.abs(ref).max()
  assert scale > 1e-3  # random weights give logits far from zero
  np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_guided_diffusion(name):
  cfg = CONFIGS[name]
  ref = _reference(cfg)
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  model = _ours(cfg)
  params = convert_classifier.classifier_from_state_dict(sd, model)
  x, t = _inputs()
  apply = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))
  logits = apply(params, x, t)
  assert logits.dtype == jnp.float32
  _assert_close(logits, _reference_logits(ref, x, t))
  # The timestep reaches the network: another t gives other logits, in both implementations.
  t2 = t[::-1].copy()
  other = apply(params, x, t2)
  _assert_close(other, _reference_logits(ref, x, t2))
  assert np.abs(np.asarray(other) - np.asarray(logits)).max() > 1e-3


def test_fresh_adaptive_head_is_zero_initialised():
  model = _ours(CONFIGS["adaptive"])
  x, t = _inputs()
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x, t)["params"]
  np.testing.assert_array_equal(np.asarray(_apply(model, params, x, t)), 0.0)


def test_feature_size_matches_reference():
  ref = _reference(CONFIGS["spatial"])
  assert _ours(CONFIGS["spatial"]).feature_size() == ref._feature_size


def test_lightning_checkpoint_imports(tmp_path):
  """CompVis's NoisyLatentImageClassifier checkpoint: classifier under `model.`, the frozen
  diffusion model beside it under `diffusion_model.` (not read)."""
  cfg = CONFIGS["attention"]
  ref = _reference(cfg)
  state = {"model." + k: v for k, v in ref.state_dict().items()}
  state["diffusion_model.model.diffusion_model.out.2.weight"] = torch.zeros(3, 3, 3, 3)
  path = tmp_path / "classifier.ckpt"
  torch.save({"state_dict": state, "global_step": 7}, path)
  model = _ours(cfg)
  params = convert_classifier.load_classifier(path, model)
  x, t = _inputs()
  _assert_close(_apply(model, params, x, t), _reference_logits(ref, x, t))


def test_missing_and_extra_keys_are_named(tmp_path):
  cfg = CONFIGS["adaptive"]
  state = {"model." + k: v for k, v in _reference(cfg).state_dict().items()}
  del state["model.input_blocks.3.0.skip_connection.weight"]
  state["model.out.9.weight"] = torch.zeros(2)
  state["global_bias"] = torch.zeros(2)  # neither model. nor diffusion_model.: not dropped
  path = tmp_path / "classifier.ckpt"
  torch.save({"state_dict": state}, path)
  with pytest.raises(common.WeightLoadError) as err:
    convert_classifier.load_classifier(path, _ours(cfg))
  msg = str(err.value)
  assert str(path) in msg
  assert "input_blocks.3.0.skip_connection.weight" in msg and "missing keys (1)" in msg
  assert "out.9.weight" in msg and "global_bias" in msg and "unexpected keys (2)" in msg


def test_wrong_head_shape_is_refused():
  """An adaptive checkpoint does not load into an attention-pool model of the same trunk."""
  cfg = dict(CONFIGS["adaptive"], num_heads=1, num_head_channels=32)
  sd = {k: v.numpy() for k, v in _reference(cfg).state_dict().items()}
  with pytest.raises(common.WeightLoadError, match=r"out\.2\.positional_embedding"):
    convert_classifier.classifier_from_state_dict(sd, _ours(dict(cfg, pool="attention")))


@pytest.mark.parametrize("change, message", [
    (dict(pool="max"), r"pool='max'; expected one of"),
    (dict(pool="attention", num_head_channels=-1, num_heads=2), r"needs num_head_channels"),
    (dict(num_res_blocks=(1, 2)), r"num_res_blocks=\(1, 2\); expected a positive int"),
    (dict(num_heads=3), r"num_heads=3 does not divide"),
])
def test_bad_fields_are_named(change, message):
  model = _ours(dict(CONFIGS["adaptive"], **change))
  x, t = _inputs()
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)


def test_attention_head_refuses_another_input_size():
  model = _ours(CONFIGS["attention"])
  x, t = _inputs()
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)["params"]
  big = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  with pytest.raises(ValueError, match=r"features are 8x8; expected 4x4"):
    jax.eval_shape(lambda p, x: model.apply({"params": p}, x, t), params, big)


def test_encoder_kwargs_from_unet():
  unet = dict(in_channels=3, out_channels=3, model_channels=192, num_res_blocks=2,
              attention_resolutions=(8, 4, 2), channel_mult=(1, 2, 3, 5), num_head_channels=32,
              use_spatial_transformer=True, transformer_depth=1, context_dim=512)
  kw = classifier_lib.encoder_kwargs_from_unet(unet, num_classes=1000, image_size=64)
  assert kw == dict(in_channels=3, model_channels=192, num_res_blocks=2,
                    attention_resolutions=(8, 4, 2), channel_mult=(1, 2, 3, 5),
                    num_head_channels=32, num_classes=1000, image_size=64, pool="attention")
  classifier_lib.EncoderUNet(**kw).trunk_layout()  # a valid network


def test_bfloat16_trunk_keeps_float32_logits():
  """dtype=bfloat16 computes the trunk in bf16 and the head in float32, near the fp32 logits."""
  cfg = CONFIGS["attention"]
  ref = _reference(cfg)
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  x, t = _inputs()
  full = _reference_logits(ref, x, t)
  model = classifier_lib.EncoderUNet(num_classes=CLASSES, image_size=IMAGE, dtype=jnp.bfloat16,
                                     **cfg)
  logits = _apply(model, convert_classifier.classifier_from_state_dict(sd, model), x, t)
  assert logits.dtype == jnp.float32
  scale = np.abs(full).max()
  err = np.abs(np.asarray(logits) - full).max()
  assert 1e-6 * scale < err < 0.05 * scale  # bf16 rounding shows, but only as rounding


@pytest.mark.parametrize("name", list(CONFIGS))
def test_head_and_classes_are_read_from_the_state_dict(name):
  sd = {k: v.numpy() for k, v in _reference(CONFIGS[name]).state_dict().items()}
  assert convert_classifier.head_of_state_dict(sd) == (CONFIGS[name]["pool"], CLASSES)


def test_unknown_head_is_refused():
  with pytest.raises(common.WeightLoadError, match=r"no classifier head found.*out.7.weight"):
    convert_classifier.head_of_state_dict({"out.7.weight": np.zeros(3)})


def test_load_for_unet_builds_the_trunk_from_the_diffusion_unet(tmp_path):
  """A CompVis classifier file beside the LDM's UNet config: the trunk from the config, head and
  classes from the file, logits as the reference's."""
  cfg = CONFIGS["attention"]
  ref = _reference(cfg)
  path = tmp_path / "classifier.ckpt"
  torch.save({"state_dict": {"model." + k: v for k, v in ref.state_dict().items()}}, path)
  unet = {k: v for k, v in cfg.items() if k not in ("pool", "in_channels")}
  unet.update(in_channels=5, out_channels=3, use_spatial_transformer=True, context_dim=64)
  kwargs, params = convert_classifier.load_for_unet(path, unet, IMAGE)
  assert (kwargs["pool"], kwargs["num_classes"], kwargs["in_channels"]) == ("attention", CLASSES, 3)
  model = classifier_lib.EncoderUNet(**kwargs)
  x, t = _inputs()
  _assert_close(_apply(model, params, x, t), _reference_logits(ref, x, t))

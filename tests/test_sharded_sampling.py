"""Sampling split over several devices (the 8 fake CPU devices): the library, sample.py,
evaluate.py samples and training's sample grid make the single-device samples, on every device.

Batches the mesh does not divide are filled up and cut by `sampling.sample`; these tests use 3
samples on 2 and 4 devices for that, and 4 on 4 for a batch that divides. Samples are compared
within float tolerance (1e-4 on latents), not bitwise: XLA may pick other kernels for another
per-device batch size.
"""

import contextlib
import json
import os

import jax
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from PIL import Image

import cli_util
from ldm_jax import ldm
from ldm_jax import parallel
from ldm_jax import kernels
from ldm_jax import sampling
from ldm_jax.eval import sample_eval
from ldm_jax.kernels import platform
from ldm_jax.train import samples as train_samples

PROMPTS = ["a red circle at the center", "a blue square at the top left", "a green circle"]


@pytest.fixture(scope="module")
def model(tiny_workdirs):
  return ldm.LatentDiffusion.from_checkpoint(tiny_workdirs["ldm"])


def data_mesh(n: int):
  return parallel.make_mesh({"data": n}, devices=parallel.jax.devices()[:n])


def devices_holding_rows(x) -> int:
  """How many devices hold a non-empty slice of the batch of the device array x."""
  return sum(1 for s in x.addressable_shards if s.data.shape[0] > 0)


@pytest.mark.parametrize("num_devices, prompts", [(4, PROMPTS + PROMPTS[:1]), (2, PROMPTS),
                                                  (4, PROMPTS)])
def test_sharded_latents_equal_single_device(model, num_devices, prompts):
  """Guided DDIM with eta > 0 (so the per-step noise counts too) on a mesh equals one device."""
  kwargs = dict(prompts=prompts, steps=2, seed=5, guidance=2.0, eta=0.5, decode=False)
  z = sampling.sample(model, mesh=data_mesh(num_devices), as_numpy=False, **kwargs)
  assert z.shape[0] == len(prompts)
  assert len(z.sharding.device_set) == num_devices
  # The work was split: every device of the mesh holds (and so computed) its own rows.
  assert devices_holding_rows(z) == num_devices if len(prompts) % num_devices == 0 else (
      devices_holding_rows(z) > 1)
  single = sampling.sample(model, **kwargs)
  np.testing.assert_allclose(np.asarray(z), single, atol=1e-4)


def test_padded_batch_images_and_seeds(model):
  """Decoded images of 3 samples on 2 devices: the single-device images, per-sample seeds kept."""
  kwargs = dict(prompts=PROMPTS, steps=2, seeds=[11, 3, 7], guidance=1.0)
  sharded = sampling.sample(model, mesh=data_mesh(2), **kwargs)
  single = sampling.sample(model, **kwargs)
  assert sharded.shape == single.shape and sharded.shape[0] == 3
  np.testing.assert_allclose(sharded, single, atol=1e-4)
  # Sample 2 alone (its own seed) is still sample 2 of the padded batch.
  alone = sampling.sample(model, prompts=PROMPTS[2:], steps=2, seeds=[7], guidance=1.0)
  np.testing.assert_allclose(sharded[2:], alone, atol=1e-4)


def test_repeat_last_pads_only_per_sample_inputs():
  assert sampling.repeat_last(["a", "b"], 2, 2) == ["a", "b", "b", "b"]
  assert sampling.repeat_last("neg", 2, 1) == "neg"
  assert sampling.repeat_last(None, 2, 1) is None
  grown = sampling.repeat_last(np.arange(6).reshape(3, 2), 3, 1)
  np.testing.assert_array_equal(grown, [[0, 1], [2, 3], [4, 5], [4, 5]])
  broadcast = np.ones((1, 4, 4, 1))
  assert sampling.repeat_last(broadcast, 3, 1) is broadcast
  with pytest.raises(sampling.SamplingInputError,
                     match="negative_prompt: 2 entries for a batch of 3"):
    sampling.repeat_last(["x", "y"], 3, 1, "negative_prompt")
  with pytest.raises(sampling.SamplingInputError, match=r"x_T of shape \(2, 4\): expected 3 rows"):
    sampling.repeat_last(np.zeros((2, 4)), 3, 1, "x_T")


def test_local_mesh(monkeypatch):
  assert sampling.local_mesh(1) is None
  assert sampling.local_mesh(0).devices.size == len(parallel.jax.local_devices())
  mesh = sampling.local_mesh(3)
  assert mesh.devices.size == 3 and sampling.batch_shards(mesh) == 3
  with pytest.raises(sampling.SamplingInputError, match=r"--num_devices=9: expected 0 \(all\)"):
    sampling.local_mesh(9)
  with pytest.raises(sampling.SamplingInputError, match="--num_devices=-1"):
    sampling.local_mesh(-1)
  monkeypatch.setenv(sampling.NUM_DEVICES_ENV, "2")
  assert sampling.local_mesh(None).devices.size == 2
  monkeypatch.setenv(sampling.NUM_DEVICES_ENV, "two")
  with pytest.raises(sampling.SamplingInputError, match=r"\$LDM_JAX_NUM_DEVICES='two'"):
    sampling.local_mesh(None)


class Spy:
  """Wraps sampling.sample, recording the mesh of every call."""

  def __init__(self, monkeypatch, module):
    self.meshes, real = [], sampling.sample

    def spy(*args, **kwargs):
      self.meshes.append(kwargs.get("mesh"))
      return real(*args, **kwargs)
    monkeypatch.setattr(module.sampling, "sample", spy)


def _pngs(outdir) -> np.ndarray:
  meta = json.load(open(os.path.join(outdir, "samples.json")))
  return np.stack([np.asarray(Image.open(os.path.join(outdir, s["file"])))
                   for s in meta["samples"]]).astype(np.int16)


def test_sample_cli_num_devices(tiny_workdirs, tmp_path, capsys, monkeypatch):
  """sample.py --num_devices 2 splits 3 prompts over 2 devices and writes the one-device PNGs."""
  from ldm_jax.cli import sample as sample_mod
  args = ["--checkpoint", tiny_workdirs["ldm"], "--steps", "2", "--guidance", "1", "--seed", "4",
          "--no_progress"] + sum((["--prompt", p] for p in PROMPTS), [])
  spy = Spy(monkeypatch, sample_mod)
  code, _, err = cli_util.run_sample(args + ["--outdir", str(tmp_path / "two"),
                                             "--num_devices", "2"], capsys)
  assert code == 0, err
  assert sampling.batch_shards(spy.meshes[0]) == 2
  spy.meshes.clear()
  code, _, err = cli_util.run_sample(args + ["--outdir", str(tmp_path / "one")], capsys)
  assert code == 0, err
  assert spy.meshes == [None]  # The suite's default ($LDM_JAX_NUM_DEVICES=1): one device.
  two, one = _pngs(tmp_path / "two"), _pngs(tmp_path / "one")
  assert two.shape == one.shape == (3,) + one.shape[1:]
  assert np.abs(two - one).max() <= 1  # uint8 rounding of float-tolerance images.
  code, _, err = cli_util.run_sample(args + ["--outdir", str(tmp_path / "bad"),
                                             "--num_devices", "99"], capsys)
  assert code == 2 and "--num_devices=99: expected 0 (all) or 1..8" in err
  assert not os.path.exists(tmp_path / "bad")


def test_sample_eval_generate_on_mesh(model):
  """evaluate.py samples' generator: 3 samples in batches of 2 on 2 devices = one device."""
  s = sample_eval.SampleSettings(num_samples=3, steps=2, batch_size=2, prompts=("a circle",))
  sharded = np.stack(list(sample_eval.generate(model, s, show_progress=False,
                                               mesh=data_mesh(2))))
  single = np.stack(list(sample_eval.generate(model, s, show_progress=False)))
  assert sharded.shape[0] == 3
  assert np.abs(sharded.astype(np.int16) - single).max() <= 1


def test_evaluate_cli_passes_its_mesh(monkeypatch):
  """evaluate.py samples builds the sampling mesh from --num_devices and hands it down."""
  from ldm_jax.cli import evaluate
  seen = {}

  def fake_evaluate_model(model, settings, extractor, reference, **kwargs):
    seen["mesh"] = kwargs.get("mesh")
    return {}
  monkeypatch.setattr(evaluate.sample_eval, "evaluate_model", fake_evaluate_model)
  monkeypatch.setattr(evaluate.sample_eval, "check_settings", lambda *a, **k: None)
  monkeypatch.setattr(evaluate.cli, "load_model", lambda args: None)
  monkeypatch.setattr(evaluate, "_extractor", lambda args: None)
  args = evaluate.parse_args(["samples", "--checkpoint", "x", "--out", "r.json", "--prompt", "p",
                              "--num_devices", "4"])
  evaluate.run_samples(args)
  assert sampling.batch_shards(seen["mesh"]) == 4
  args.num_devices = 1
  evaluate.run_samples(args)
  assert seen["mesh"] is None


def test_training_grid_on_mesh(model, tmp_path):
  """Training's sample grid on a 2-device mesh (3 grid samples) equals the one-device grid."""
  from configs import shapes_ldm_text
  config = shapes_ldm_text.get_config("tiny")
  config.log.num_samples, config.log.sample_steps = 3, 2
  sharded = train_samples.log_sample_grid(model, config, str(tmp_path / "a"), 1, data_mesh(2))
  single = train_samples.log_sample_grid(model, config, str(tmp_path / "b"), 1)
  assert sharded.shape == single.shape
  assert np.abs(sharded.astype(np.int16) - single).max() <= 1


def test_trainer_samples_its_grid_on_the_training_mesh(tiny_workdirs, tmp_path, monkeypatch):
  """One fine-tuning step on a 2-device mesh: the step's sample grid is split over that mesh."""
  from configs import shapes_ldm_text
  from ldm_jax.cli import train as entry
  spy = Spy(monkeypatch, train_samples)
  cfg = shapes_ldm_text.get_config("tiny")
  cfg.mesh.num_devices = 2
  cfg.init_from = tiny_workdirs["ldm"]
  cfg.train.num_steps = 1
  cfg.log.sample_every = 1
  cfg.log.sample_steps = 1
  cfg.log.sample_prompts = ("a red circle at the center",)
  workdir = tmp_path / "run"
  entry.train(cfg, str(workdir))
  assert spy.meshes and sampling.batch_shards(spy.meshes[0]) == 2
  assert {d.id for d in spy.meshes[0].devices.flat} == {d.id for d in parallel.jax.devices()[:2]}
  assert (workdir / "samples" / "step_0000001.png").is_file()


@contextlib.contextmanager
def tpu_attention_in_mesh_contexts():
  """On a TPU, attention runs the Pallas flash kernel only in a program traced under the mesh of
  its devices (`platform.mesh_context`); otherwise it keeps the one-block einsum. To show that on
  CPU, the CPU mesh gets the context a TPU mesh gets, and every attention traced in one runs the
  TPU form (in Pallas interpret mode). Yields (inside, outside): the mesh shape of each attention
  traced inside a context, and the query length of each traced outside one."""
  attention = kernels.attention
  inside, outside = [], []

  def tpu_form_in_a_mesh_context(q, k, v, **kw):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      outside.append(q.shape[1])  # Lq
      return attention(q, k, v, **kw)
    inside.append(dict(mesh.shape))
    return attention(q, k, v, implementation="tpu", **kw)

  with pytest.MonkeyPatch.context() as patch, pltpu.force_tpu_interpret_mode():
    patch.setattr(kernels, "attention", tpu_form_in_a_mesh_context)
    patch.setattr(platform, "mesh_context",
                  lambda mesh: jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
    yield inside, outside


def test_sampling_traces_for_its_devices_so_tpu_attention_can_run(model):
  """Sampling on one device and on a mesh runs the TPU attention in every UNet and decoder
  attention (only the text encoder, fed host inputs, is traced outside), and makes the einsum
  form's images (see `tpu_attention_in_mesh_contexts`)."""
  kwargs = dict(prompts=PROMPTS[:2], steps=2, seed=3, guidance=2.0)
  einsum = sampling.sample(model, **kwargs)
  context_tokens = model.tokenize(PROMPTS[:1]).shape[1]
  with tpu_attention_in_mesh_contexts() as (inside, outside):
    for mesh, devices in ((None, 1), (data_mesh(2), 2)):
      inside.clear()
      outside.clear()
      images = sampling.sample(model, mesh=mesh, **kwargs)
      assert inside and all(shape == {"data": devices} for shape in inside), inside
      assert set(outside) <= {context_tokens}, outside  # the text encoder's self-attention only
      np.testing.assert_allclose(images, einsum, atol=2e-4)


def test_autoencoder_is_traced_for_the_devices_of_its_inputs(model):
  """encode and decode (attention at up to 64x64 tokens in the autoencoder's middle block) trace
  for the devices their inputs are on: one device, or the mesh of sharded latents, as the
  trainer's batches and sampling's latents are; so on TPU they run the kernel too."""
  z = sampling.sample(model, prompts=PROMPTS[:2], steps=2, seed=3, guidance=2.0, decode=False)
  einsum = np.asarray(model.decode(z))
  einsum_latents = np.asarray(model.encode(einsum))
  with tpu_attention_in_mesh_contexts() as (inside, outside):
    for mesh, devices in ((None, 1), (data_mesh(2), 2)):
      inside.clear()
      placed = z if mesh is None else jax.device_put(z, parallel.batch_sharding(mesh))
      images = np.asarray(model.decode(placed))
      latents = np.asarray(model.encode(jax.device_put(einsum, placed.sharding)
                                        if mesh is not None else einsum))
      assert inside and all(shape == {"data": devices} for shape in inside), inside
      assert not outside, outside
      np.testing.assert_allclose(images, einsum, atol=2e-4)
      np.testing.assert_allclose(latents, einsum_latents, atol=2e-4)

"""Negative prompts and Stable Diffusion inpainting models against diffusers' torch pipelines.

References: `StableDiffusionPipeline(..., negative_prompt=...)` and `StableDiffusionInpaintPipeline`
(9-channel UNet) built from tiny random non-zero weights (tests/convert/tiny_sd.py), imported with
`LatentDiffusion.from_diffusers`. Sampling is 5 DDIM steps with guidance 3 from the same x_T; the
final latents and images must agree to 1e-4 of their scale in fp32.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import cli_util
import tiny_sd
from assets_util import assert_close
from ldm_jax import family
from ldm_jax import ldm as ldm_lib
from ldm_jax import sampling
from ldm_jax.diffusion import samplers as samplers_lib
from ldm_jax.models.tokenizers import write_clip_tokenizer_dir

NEGATIVE = ["blurry, low quality", "a dog"]
TOL = 1e-4


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("sd_family"))


@pytest.fixture(scope="module")
def tokenizer_dir(root):
  return write_clip_tokenizer_dir(os.path.join(root, "clip_tokenizer"))


@pytest.fixture(scope="module")
def txt2img(root, tokenizer_dir):
  folder, pipe = tiny_sd.diffusers_folder(root, tokenizer_dir)
  return folder, pipe, ldm_lib.LatentDiffusion.from_diffusers(folder)


@pytest.fixture(scope="module")
def inpaint(root, tokenizer_dir):
  folder, pipe = tiny_sd.diffusers_folder(root, tokenizer_dir, inpainting=True)
  return folder, pipe, ldm_lib.LatentDiffusion.from_diffusers(folder)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _x_T(seed=2):
  return np.random.RandomState(seed).randn(2, 8, 8, 4).astype(np.float32)  # [B, h, w, C]


# ------------------------------------------------------------------------------------------------
# Negative prompts.
# ------------------------------------------------------------------------------------------------
def test_negative_prompt_matches_diffusers(txt2img):
  folder, pipe, model = txt2img
  x_T = _x_T()
  with torch.no_grad():
    want = pipe(tiny_sd.PROMPTS, negative_prompt=NEGATIVE, height=16, width=16,
                num_inference_steps=5, guidance_scale=3.0, eta=0.0, latents=_nchw(x_T),
                output_type="latent").images
    want_img = _nhwc(pipe.vae.decode(want / tiny_sd.SCALE_FACTOR).sample)
  want = _nhwc(want)
  got = sampling.sample(model, prompts=tiny_sd.PROMPTS, negative_prompt=NEGATIVE, steps=5,
                        guidance=3.0, x_T=jnp.asarray(x_T), decode=False)
  assert_close(got, want, rel=TOL, what="latents with negative prompts")
  images = model.sample(prompts=tiny_sd.PROMPTS, negative_prompt=NEGATIVE, steps=5, guidance=3.0,
                        x_T=jnp.asarray(x_T))
  assert_close(images, want_img, rel=TOL, what="images with negative prompts")
  # The negative prompt changed the result: the empty-prompt unconditional branch differs.
  plain = sampling.sample(model, prompts=tiny_sd.PROMPTS, steps=5, guidance=3.0,
                          x_T=jnp.asarray(x_T), decode=False)
  assert np.abs(np.asarray(plain) - want).max() > 1e-2


def test_negative_prompt_is_its_embedding_as_the_unconditional_branch(txt2img):
  """The sampler fed by hand with cond = prompts, uncond = the negative prompt's embedding."""
  _, _, model = txt2img
  x_T = jnp.asarray(_x_T(3))
  cond = model.condition(prompts=tiny_sd.PROMPTS)
  uncond = model.condition(prompts=[NEGATIVE[0]] * 2)
  payload = {"params": model.params["unet"], "cond": cond, "uncond": uncond,
             "scale": jnp.float32(4.0), "rescale": jnp.float32(0.0)}
  denoise = sampling.UNetDenoiser(model.unet, "crossattn", True)
  want = samplers_lib.sample(denoise, model.schedule, x_T, payload, None, sampler="ddim", steps=4)
  # One string applies to every sample.
  got = sampling.sample(model, prompts=tiny_sd.PROMPTS, negative_prompt=NEGATIVE[0], steps=4,
                        guidance=4.0, x_T=x_T, decode=False)
  np.testing.assert_allclose(got, np.asarray(want), rtol=1e-6, atol=1e-6)


def test_negative_prompt_errors(txt2img):
  _, _, model = txt2img
  with pytest.raises(sampling.SamplingInputError, match="guidance != 1"):
    sampling.sample(model, prompts=tiny_sd.PROMPTS, negative_prompt="x", steps=1, guidance=1.0)
  with pytest.raises(sampling.SamplingInputError, match="3 entries for a batch of 2"):
    sampling.sample(model, prompts=tiny_sd.PROMPTS, negative_prompt=["a", "b", "c"], steps=1,
                    guidance=2.0)


# ------------------------------------------------------------------------------------------------
# Stable Diffusion inpainting (9-channel UNet, conditioning 'hybrid').
# ------------------------------------------------------------------------------------------------
def _inpaint_inputs():
  """An image in [-1, 1] and a keep mask (1 = keep) with a hole on the right, both NHWC."""
  rs = np.random.RandomState(4)
  u8 = rs.randint(0, 256, (2, 16, 16, 3)).astype(np.uint8)
  keep = np.ones((2, 16, 16, 1), np.float32)
  keep[0, :, 9:] = 0.0
  keep[1, 4:12, 2:10] = 0.0
  return u8, u8.astype(np.float32) / 127.5 - 1.0, keep


@pytest.fixture
def deterministic_vae(monkeypatch):
  """diffusers draws a posterior sample of the masked image's latents; we take the mode."""
  from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as mod
  original = mod.retrieve_latents
  monkeypatch.setattr(mod, "retrieve_latents",
                      lambda out, generator=None, sample_mode="sample": original(
                          out, generator, sample_mode="argmax"))


def test_inpaint_folder_config(inpaint):
  _, _, model = inpaint
  d = model.config.diffusion
  assert d.conditioning_key == "hybrid" and d.model_target == family.INPAINT_TARGET
  assert tuple(d.concat_keys) == ("mask", "masked_image") and d.channels == 4
  assert model.is_inpainting and model.latent_channels == 4


def test_inpaint_condition_matches_pipeline(inpaint, deterministic_vae):
  _, pipe, model = inpaint
  _, image, keep = _inpaint_inputs()
  hole = torch.from_numpy(1.0 - keep.transpose(0, 3, 1, 2))
  with torch.no_grad():
    mask, masked = pipe.prepare_mask_latents(
        hole, _nchw(image) * (hole < 0.5), 2, 16, 16, torch.float32, "cpu", None, False)
  want = np.concatenate([_nhwc(mask), _nhwc(masked)], -1)  # [B, 8, 8, 1 + 4], mask first
  got = model.condition(prompts=tiny_sd.PROMPTS, images=image * keep, mask=keep)
  assert got.concat.shape == (2, 8, 8, 5)
  assert_close(got.concat, want, rel=TOL, what="inpainting concat condition")
  assert 0 < np.asarray(got.concat[..., 0]).mean() < 1  # the hole mask is neither empty nor full


def test_inpaint_sampling_matches_pipeline(inpaint, deterministic_vae):
  _, pipe, model = inpaint
  u8, image, keep = _inpaint_inputs()
  x_T = _x_T(5)
  from PIL import Image
  with torch.no_grad():
    want = pipe(tiny_sd.PROMPTS, image=[Image.fromarray(a) for a in u8],
                mask_image=[Image.fromarray(((1 - k[..., 0]) * 255).astype(np.uint8))
                            for k in keep],
                negative_prompt=NEGATIVE, height=16, width=16, num_inference_steps=5,
                guidance_scale=3.0, eta=0.0, latents=_nchw(x_T), output_type="latent").images
    want_img = _nhwc(pipe.vae.decode(want / tiny_sd.SCALE_FACTOR).sample)
  want = _nhwc(want)
  kwargs = dict(prompts=tiny_sd.PROMPTS, negative_prompt=NEGATIVE, init_image=image, mask=keep,
                steps=5, guidance=3.0, x_T=jnp.asarray(x_T))
  got = sampling.sample(model, decode=False, **kwargs)
  assert_close(got, want, rel=TOL, what="inpainting latents")
  assert np.abs(want - x_T).max() > 0.1
  raw = sampling.sample(model, paste_known=False, **kwargs)
  assert_close(raw, want_img, rel=TOL, what="inpainting images")
  pasted = sampling.sample(model, **kwargs)
  np.testing.assert_array_equal(pasted[keep[..., 0] == 1], image[keep[..., 0] == 1])
  # The image matters: another image under the same mask changes the result.
  other = sampling.sample(model, decode=False, **dict(kwargs, init_image=image[::-1].copy()))
  assert np.abs(np.asarray(other) - want).max() > 1e-2


def test_inpaint_needs_image_and_mask(inpaint):
  _, _, model = inpaint
  with pytest.raises(sampling.SamplingInputError, match="init image and a mask"):
    sampling.sample(model, prompts=tiny_sd.PROMPTS, steps=1)


# ------------------------------------------------------------------------------------------------
# sample.py: --negative_prompt and inpainting models driven by --init_image + --mask.
# ------------------------------------------------------------------------------------------------
def run_cli(args, capsys):
  """sample.py's main in-process; returns (exit code, stderr lines)."""
  code, _, err = cli_util.run_sample(args, capsys)
  return code, err.strip().splitlines()


@pytest.fixture(scope="module")
def cli_images(root):
  """An init image and a keep mask (white = keep, the left 10 columns) as PNG files."""
  from PIL import Image
  u8, _, _ = _inpaint_inputs()
  init, mask = os.path.join(root, "init.png"), os.path.join(root, "mask.png")
  Image.fromarray(u8[0]).save(init)
  keep = np.zeros((16, 16), np.uint8)
  keep[:, :10] = 255
  Image.fromarray(keep).save(mask)
  return init, mask, u8[0], keep


def _read(outdir, n):
  from PIL import Image
  return [np.asarray(Image.open(os.path.join(outdir, f"{i:06d}.png"))) for i in range(n)]


def test_cli_inpainting_model_with_negative_prompts(inpaint, cli_images, tmp_path, capsys):
  folder, _, model = inpaint
  init, mask, init_u8, keep = cli_images
  common = ["--diffusers", folder, "--init_image", init, "--mask", mask, "--steps", "3",
            "--guidance", "3", "--seed", "11", "--no_progress"]
  prompts = ["--prompt", tiny_sd.PROMPTS[0], "--prompt", tiny_sd.PROMPTS[1]]
  out = str(tmp_path / "a")
  code, err = run_cli(common + prompts + ["--negative_prompt", NEGATIVE[0], "--negative_prompt",
                                          NEGATIVE[1], "--outdir", out], capsys)
  assert code == 0, err
  images = _read(out, 2)
  import json
  meta = json.load(open(os.path.join(out, "samples.json")))
  assert [s["negative_prompt"] for s in meta["samples"]] == NEGATIVE
  for img in images:
    assert img.shape == (16, 16, 3)
    np.testing.assert_array_equal(img[keep == 255], init_u8[keep == 255])  # known region kept
  # The pixels are the library's for the same inputs and seeds.
  want = ldm_lib.to_uint8(sampling.sample(
      model, prompts=tiny_sd.PROMPTS, negative_prompt=NEGATIVE, seeds=[11, 12], steps=3,
      guidance=3.0, init_image=np.repeat(init_u8[None].astype(np.float32) / 127.5 - 1, 2, 0),
      mask=np.repeat((keep[None, ..., None] > 127).astype(np.float32), 2, 0)))
  np.testing.assert_array_equal(np.stack(images), want)
  assert np.abs(want[:, :, 10:].astype(int) - init_u8[:, 10:]).mean() > 2  # the hole was redrawn
  # One negative prompt for all: the second sample changes, the first does not.
  out2 = str(tmp_path / "b")
  code, err = run_cli(common + prompts + ["--negative_prompt", NEGATIVE[0], "--outdir", out2],
                      capsys)
  assert code == 0, err
  again = _read(out2, 2)
  np.testing.assert_array_equal(again[0], images[0])
  assert np.abs(again[1].astype(int) - images[1]).max() > 0


@pytest.mark.parametrize("extra, needles", [
    (["--negative_prompt", "a", "--negative_prompt", "b", "--negative_prompt", "c"],
     ["--negative_prompt given 3 times for 2 prompts"]),
    (["--negative_prompt", "a", "--guidance", "1"], ["--negative_prompt", "--guidance != 1"]),
    (["--noise_level", "20"], ["--noise_level was given", "not the x4 upscaler"]),
    (["--depth_map", "{mask}"], ["--depth_map was given", "not a depth-to-image model"]),
    (["--lowres", "{mask}"], ["--lowres was given", "takes no conditioning image"]),
])
def test_cli_flags_a_text_model_cannot_use(txt2img, cli_images, tmp_path, capsys, extra,
                                           needles):
  out = tmp_path / "out"
  extra = [a.format(mask=cli_images[1]) for a in extra]
  code, err = run_cli(["--diffusers", txt2img[0], "--prompt", "a", "--prompt", "b", "--steps", "1",
                       "--guidance", "2", "--outdir", str(out)] + extra, capsys)
  assert code == 2 and len(err) == 1, err
  assert all(n in err[0] for n in needles), err
  assert not out.exists()


def test_cli_inpainting_model_needs_init_image_and_mask(inpaint, tmp_path, capsys):
  out = tmp_path / "out"
  code, err = run_cli(["--diffusers", inpaint[0], "--prompt", "a", "--steps", "1", "--outdir",
                       str(out)], capsys)
  assert code == 2 and len(err) == 1 and "give --init_image and --mask" in err[0], err
  assert not out.exists()

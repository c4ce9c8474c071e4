"""Builders of tiny Stable-Diffusion-style models for the end-to-end import tests.

* `clip_text_model(seed)`: a transformers CLIPTextModel with the real CLIP vocabulary size (49408,
  so the real BPE tokenizer works) but hidden size 32 and 2 layers, every weight re-drawn.
* `diffusers_folder(root, tokenizer_dir)`: a `StableDiffusionPipeline` (UNet2DConditionModel,
  AutoencoderKL, CLIPTextModel, CLIPTokenizer, DDIMScheduler with SD's betas) written with
  `save_pretrained`; returns the folder and the torch pipeline.
* `compvis_checkpoint(root, tokenizer_dir)`: the original CompVis modules (openaimodel.UNetModel,
  Encoder/Decoder + quant convs) and a CLIPTextModel assembled into a Lightning-style `.ckpt`, plus a
  hand-written YAML in the shape of v1-inference.yaml with the tiny sizes.

Nothing is downloaded: the tokenizer directory comes from `write_clip_tokenizer_dir` (the BPE file
shipped in open-clip-torch). Weights are re-drawn with `assets_util.randomize_` (zero-initialised
ones too, LayerNorm / GroupNorm weights near 1) at a small std so activations stay O(1) through
several sampling steps.
"""

import os

import numpy as np
import torch

from assets_util import randomize_
from assets_util import stub_omegaconf

# Scale of the re-drawn weights: small enough that activations stay O(1) through the UNet.
WEIGHT_STD = 0.1
PROMPTS = ["a photo of a cat", "an oil painting of a red fox in the snow"]
# SD v1's noise schedule (scaled_linear in diffusers = CompVis 'linear').
BETA_START, BETA_END = 0.00085, 0.012
SCALE_FACTOR = 0.18215
LATENT_SIZE = 8  # latents [B, 8, 8, 4]; images 16x16 (first-stage factor 2)


def clip_text_model(seed: int = 1):
  """A tiny CLIPTextModel over the real 49408-token CLIP vocabulary (SD 1.x: quick_gelu, last)."""
  import transformers
  config = transformers.CLIPTextConfig(
      vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
      bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
  model = transformers.CLIPTextModel(config).eval()
  randomize_(model, std=WEIGHT_STD, seed=seed)
  return model


def _randomized(module, seed):
  randomize_(module, std=WEIGHT_STD, seed=seed)
  return module.eval()


# ------------------------------------------------------------------------------------------------
# diffusers
# ------------------------------------------------------------------------------------------------
def ddim_scheduler():
  """DDIM configured like the CompVis sampler grid: 'leading' spacing, offset 1, alpha_prev[0]."""
  from diffusers import DDIMScheduler
  return DDIMScheduler(num_train_timesteps=1000, beta_start=BETA_START, beta_end=BETA_END,
                       beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                       steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")


def diffusers_folder(root: str, tokenizer_dir: str, *, inpainting: bool = False):
  """Writes a tiny SD pipeline folder under root/'diffusers' (root/'diffusers_inpaint': a
  StableDiffusionInpaintPipeline whose UNet takes 9 channels); returns (folder, torch pipeline)."""
  import transformers
  from diffusers import (AutoencoderKL, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                         UNet2DConditionModel)
  unet = _randomized(UNet2DConditionModel(
      sample_size=LATENT_SIZE, in_channels=9 if inpainting else 4, out_channels=4,
      layers_per_block=1,
      block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
      attention_head_dim=4), seed=2)
  vae = _randomized(AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
      layers_per_block=1, sample_size=2 * LATENT_SIZE,
      scaling_factor=SCALE_FACTOR), seed=3)
  text = clip_text_model(seed=4)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
  cls = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
  pipe = cls(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                 scheduler=ddim_scheduler(), safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  folder = os.path.join(root, "diffusers_inpaint" if inpainting else "diffusers")
  pipe.save_pretrained(folder, safe_serialization=True)
  return folder, pipe


# ------------------------------------------------------------------------------------------------
# CompVis
# ------------------------------------------------------------------------------------------------
UNET_KWARGS = dict(image_size=LATENT_SIZE, in_channels=4, out_channels=4, model_channels=32,
                   attention_resolutions=[2], num_res_blocks=1, channel_mult=[1, 2], num_heads=4,
                   use_spatial_transformer=True, transformer_depth=1, context_dim=32,
                   legacy=False)
DDCONFIG = dict(double_z=True, z_channels=4, resolution=2 * LATENT_SIZE, in_channels=3, out_ch=3,
                ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
EMBED_DIM = 4


class FirstStage(torch.nn.Module):
  """The parts of ldm.models.autoencoder.AutoencoderKL that hold weights, under the same names
  (that class needs pytorch_lightning); encode / decode as the original."""

  def __init__(self, ddconfig, embed_dim):
    super().__init__()
    from ldm.modules.diffusionmodules import model as ae_model
    self.encoder = ae_model.Encoder(**ddconfig)
    self.decoder = ae_model.Decoder(**ddconfig)
    self.quant_conv = torch.nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
    self.post_quant_conv = torch.nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

  def encode(self, x):
    from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
    return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

  def decode(self, z):
    return self.decoder(self.post_quant_conv(z))


def compvis_modules(in_channels: int = 4):
  """(unet, first_stage, ema_unet) torch modules from the original `ldm` package, randomised;
  in_channels 9: the UNet of an inpainting model (z_t, mask, masked-image latent)."""
  stub_omegaconf()
  from ldm.modules.diffusionmodules.openaimodel import UNetModel
  kwargs = dict(UNET_KWARGS, in_channels=in_channels)
  unet = _randomized(UNetModel(**kwargs), seed=5)
  ema = _randomized(UNetModel(**kwargs), seed=6)  # EMA weights differ from the raw ones
  first = _randomized(FirstStage(DDCONFIG, EMBED_DIM), seed=7)
  return unet, first, ema


def _yaml_list(values) -> str:
  return "[" + ", ".join(str(v) for v in values) + "]"


def write_yaml(path: str, text_dir: str, *, model_channels: int = 32,
               concat_keys: tuple[str, ...] | None = None) -> str:
  """A v1-inference.yaml with the tiny sizes; `version` names the local text-model directory.

  concat_keys: a LatentInpaintDiffusion (v1-inpainting-inference.yaml: conditioning 'hybrid',
  9 UNet input channels) concatenating these in this order.
  """
  u, d = UNET_KWARGS, DDCONFIG
  target, key, in_channels, extra = "LatentDiffusion", "crossattn", u["in_channels"], ""
  if concat_keys is not None:
    target, key, in_channels = "LatentInpaintDiffusion", "hybrid", 9
    extra = f"\n    concat_keys: {_yaml_list(concat_keys)}"
  text = f"""# Tiny model in the structure of Stable Diffusion v1-inference.yaml.
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.{target}
  params:{extra}
    linear_start: {BETA_START}
    linear_end: {BETA_END}
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: {LATENT_SIZE}
    channels: 4
    cond_stage_trainable: false
    conditioning_key: {key}
    monitor: val/loss_simple_ema
    scale_factor: {SCALE_FACTOR}
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: {u['image_size']}
        in_channels: {in_channels}
        out_channels: {u['out_channels']}
        model_channels: {model_channels}
        attention_resolutions: {_yaml_list(u['attention_resolutions'])}
        num_res_blocks: {u['num_res_blocks']}
        channel_mult: {_yaml_list(u['channel_mult'])}
        num_heads: {u['num_heads']}
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: {u['context_dim']}
        use_checkpoint: True
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: {EMBED_DIM}
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: {d['z_channels']}
          resolution: {d['resolution']}
          in_channels: {d['in_channels']}
          out_ch: {d['out_ch']}
          ch: {d['ch']}
          ch_mult: {_yaml_list(d['ch_mult'])}
          num_res_blocks: {d['num_res_blocks']}
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
      params:
        version: {text_dir}
"""
  with open(path, "w") as f:
    f.write(text)
  return path


def compvis_state_dict(unet, first_stage, ema, text) -> dict[str, torch.Tensor]:
  """The LatentDiffusion state dict of an SD 1.x training checkpoint, with EMA copies."""
  sd = {}
  for k, v in unet.state_dict().items():
    sd["model.diffusion_model." + k] = v.clone()
  for k, v in first_stage.state_dict().items():
    sd["first_stage_model." + k] = v.clone()
  # SD 1.x was saved with transformers 4: CLIPTextModel keys under text_model., plus position_ids.
  for k, v in text.state_dict().items():
    sd["cond_stage_model.transformer.text_model." + k] = v.clone()
  sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = (
      torch.arange(77, dtype=torch.int64)[None])
  # LitEma: one buffer per UNet parameter, named without dots, plus its bookkeeping.
  for k, v in ema.named_parameters():
    sd["model_ema." + ("diffusion_model." + k).replace(".", "")] = v.detach().clone()
  sd["model_ema.decay"] = torch.tensor(0.9999)
  sd["model_ema.num_updates"] = torch.tensor(1234, dtype=torch.int32)
  # DDPM schedule buffers (registered by LatentDiffusion.register_schedule).
  betas = np.linspace(BETA_START ** 0.5, BETA_END ** 0.5, 1000, dtype=np.float64) ** 2
  alphas_cumprod = np.cumprod(1.0 - betas)
  sd["betas"] = torch.tensor(betas, dtype=torch.float32)
  sd["alphas_cumprod"] = torch.tensor(alphas_cumprod, dtype=torch.float32)
  sd["sqrt_alphas_cumprod"] = torch.tensor(np.sqrt(alphas_cumprod), dtype=torch.float32)
  return sd


def compvis_checkpoint(root: str, text_dir: str, state_dict) -> tuple[str, str]:
  """Saves the Lightning-style .ckpt and its YAML under root; returns (ckpt, yaml)."""
  ckpt = os.path.join(root, "tiny-sd.ckpt")
  torch.save({"state_dict": state_dict, "global_step": 1234, "epoch": 3}, ckpt)
  return ckpt, write_yaml(os.path.join(root, "tiny-sd.yaml"), text_dir)


def diffusers_upscale_folder(root: str, tokenizer_dir: str):
  """A tiny StableDiffusionUpscalePipeline under root/'diffusers_upscale' (UNet: z_t + the noised
  low-res image = 7 channels, noise level as class label; v prediction as the real x4 model;
  its low_res_scheduler the real one's). Returns (folder, torch pipeline)."""
  import transformers
  from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler,
                         StableDiffusionUpscalePipeline, UNet2DConditionModel)
  unet = _randomized(UNet2DConditionModel(
      sample_size=LATENT_SIZE, in_channels=7, out_channels=4, layers_per_block=1,
      block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
      attention_head_dim=4, num_class_embeds=1000), seed=21)
  vae = _randomized(AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
      layers_per_block=1, sample_size=2 * LATENT_SIZE, scaling_factor=0.08333), seed=22)
  scheduler = DDIMScheduler.from_config(ddim_scheduler().config, prediction_type="v_prediction")
  low_res = DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                          beta_schedule="scaled_linear")
  tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
  pipe = StableDiffusionUpscalePipeline(
      vae=vae, text_encoder=clip_text_model(seed=23), tokenizer=tokenizer, unet=unet,
      low_res_scheduler=low_res, scheduler=scheduler, max_noise_level=350)
  pipe.set_progress_bar_config(disable=True)
  folder = os.path.join(root, "diffusers_upscale")
  pipe.save_pretrained(folder, safe_serialization=True)
  return folder, pipe


def diffusers_ldm_sr_folder(root: str):
  """A tiny LDMSuperResolutionPipeline under root/'diffusers_ldm_sr' (vqvae/ with 3 latent
  channels, a UNet2DModel taking z_t + the low-res image = 6 channels). Returns (folder, pipe)."""
  from diffusers import DDIMScheduler, LDMSuperResolutionPipeline, UNet2DModel, VQModel
  vqvae = _randomized(VQModel(
      in_channels=3, out_channels=3, latent_channels=3, num_vq_embeddings=16,
      block_out_channels=(32, 64), layers_per_block=1, sample_size=2 * LATENT_SIZE,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
      seed=41)
  unet = _randomized(UNet2DModel(
      sample_size=LATENT_SIZE, in_channels=6, out_channels=3, block_out_channels=(32, 64),
      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
      up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, attention_head_dim=16),
      seed=42)
  scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0155,
                            beta_schedule="scaled_linear", clip_sample=False,
                            set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
  pipe = LDMSuperResolutionPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler)
  pipe.set_progress_bar_config(disable=True)
  folder = os.path.join(root, "diffusers_ldm_sr")
  pipe.save_pretrained(folder, safe_serialization=True)
  return folder, pipe


def diffusers_depth_folder(root: str, tokenizer_dir: str):
  """A tiny StableDiffusionDepth2ImgPipeline under root/'diffusers_depth' (UNet: z_t + one depth
  channel), without its DPT depth estimator: depth maps are given. Returns (folder, pipe)."""
  import transformers
  from diffusers import (AutoencoderKL, StableDiffusionDepth2ImgPipeline, UNet2DConditionModel)
  unet = _randomized(UNet2DConditionModel(
      sample_size=LATENT_SIZE, in_channels=5, out_channels=4, layers_per_block=1,
      block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
      attention_head_dim=4), seed=51)
  vae = _randomized(AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
      layers_per_block=1, sample_size=2 * LATENT_SIZE, scaling_factor=SCALE_FACTOR), seed=52)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
  pipe = StableDiffusionDepth2ImgPipeline(
      vae=vae, text_encoder=clip_text_model(seed=53), tokenizer=tokenizer, unet=unet,
      scheduler=ddim_scheduler(), depth_estimator=None, feature_extractor=None)
  pipe.set_progress_bar_config(disable=True)
  folder = os.path.join(root, "diffusers_depth")
  pipe.save_pretrained(folder, safe_serialization=True)
  return folder, pipe

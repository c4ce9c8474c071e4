"""Stage 2: fine-tunes Stable Diffusion 2.x 768-v or 512-base (KL-f8 latents, OpenCLIP ViT-H/14 text).

Starts from a converted SD 2.x "768-v" model (the released `v2-inference-v.yaml` network:
865.9M-parameter UNet, mc 320, mult 1-2-4-4, attention at factors 4-2-1 with 64-channel heads and
linear (Dense) transformer projections, cross-attention to the 1024-wide penultimate layer of the
frozen OpenCLIP ViT-H/14 text tower, v-prediction, the kl-f8 autoencoder, scale_factor 0.18215).
Only the UNet is trained, in bf16 with fp32 master weights, with rematerialised blocks and
parameters sharded over an FSDP mesh axis.

Convert the weights first (nothing is downloaded), then point init_from at the output folder:
  python -m ldm_jax.convert --diffusers /path/to/stable-diffusion-2-1 --out models/sd21
  python train.py --config configs/sd_v2_finetune.py --workdir workdirs/sd21_ft \
      --config.init_from=models/sd21 --config.data.data_dir=/data/captioned_images
  python train.py --config configs/sd_v2_finetune.py:tiny --workdir /tmp/sd2_tiny \
      --config.first_stage_checkpoint=/tmp/kl_f8_tiny
Variants: '' (the 768-v fine-tuning run), 'base' (the 512-base model: eps-prediction, 512 px,
`v2-inference.yaml`), 'tiny' / 'base_tiny' (2 CPU steps on shapes, a fresh miniature SD 2 of each).
The inpainting, depth-to-image and x4 upscaling models of the family build on 'base':
configs/sd_v2_inpainting.py, sd_v2_depth.py and sd_x4_upscaler.py.
The trainer builds the network from init_from's own saved config; `config.model` states the SD 2.x
network that folder must hold (tests/test_configs.py checks it against v2-inference-v.yaml and the
released parameter counts) and is what a from-scratch run (init_from='') would build.
"""

from configs import common
from configs import sd_v1_finetune

INIT_FROM = "models/sd21"  # Placeholder: the `--out` folder of ldm_jax.convert for SD 2.x (768-v).
BASE_INIT_FROM = "models/sd21_base"  # ... and for the 512-base model.


def get_config(arg: str = ""):
  if arg not in ("", "tiny", "base", "base_tiny"):
    raise ValueError(f"configs/sd_v2_finetune.py: unknown variant {arg!r}; expected '', 'tiny', "
                     f"'base' or 'base_tiny'.")
  base = arg.startswith("base")
  tiny = arg.endswith("tiny")
  # SD 1.x's recipe (captioned images, AdamW, bf16, remat, FSDP, the kl-f8 first stage, sampling)
  # with SD 2.x's network: a UNet of 64-channel heads and Dense projections, the OpenCLIP text
  # tower, and v-prediction for the 768-v model (512-base predicts eps, as SD 1.x).
  c = sd_v1_finetune.get_config("tiny" if tiny else "")
  c.model.diffusion.parameterization = "eps" if base else "v"
  if tiny:
    c.model.unet = common.unet_kwargs(
        in_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(2, 1), num_head_channels=32, use_spatial_transformer=True,
        transformer_depth=1, use_linear_in_transformer=True, context_dim=64, legacy=False)
    c.model.cond_stage = dict(
        kind="openclip",
        kwargs=dict(vocab_size=64, max_length=20, width=64, layers=2, heads=2, mlp_dim=256,
                    activation="gelu", epsilon=1e-5, output_layer="penultimate"),
        tokenizer=dict(kind="shapes", path=""))  # The built-in shapes word tokenizer.
    return c                         # A fresh miniature SD 2 on shapes, as sd_v1_finetune:tiny.
  c.init_from = BASE_INIT_FROM if base else INIT_FROM
  size = 512 if base else 768        # Latents 64x64x4 (512-base) or 96x96x4 (768-v).
  c.data.image_size = size
  c.data.min_size = size
  c.model.unet = common.unet_kwargs(
      in_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
      attention_resolutions=(4, 2, 1),
      num_head_channels=64,          # 5 / 10 / 20 heads of 64 channels.
      use_spatial_transformer=True, transformer_depth=1,
      use_linear_in_transformer=True,  # proj_in / proj_out are Dense on tokens, not 1x1 convs.
      context_dim=1024,              # = OpenCLIP ViT-H/14 text width.
      legacy=False)
  c.model.cond_stage = dict(
      kind="openclip",
      # OpenCLIP ViT-H-14 text tower (FrozenOpenCLIPEmbedder): exact GELU, the penultimate layer's
      # output (then the final LayerNorm), as SD 2.x uses.
      kwargs=dict(vocab_size=49408, max_length=77, width=1024, layers=24, heads=16, mlp_dim=4096,
                  activation="gelu", epsilon=1e-5, output_layer="penultimate"),
      tokenizer=dict(kind="openclip", path=""))  # The converted model folder carries it.
  c.model.diffusion.image_size = size // 8
  return c

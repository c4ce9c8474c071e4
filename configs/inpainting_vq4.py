"""Stage 2: the paper's inpainting LDM (VQ-f4 without attention, 64x64x3 latents) on Places.

Reproduces the inpainting model (Rombach et al. 2022, Sec. 4.5 / Tab. 7: LDM-4 "big", FID 9.39 on
the Places test masks, 2-stage fine-tuned at 512 px; the released `inpainting_big` model). The
UNet input concatenates, on channels, z_t (3), the latent of the masked image (3) and the mask
resized to latent resolution (1): 7 channels in, 3 out.

  python train.py --config configs/inpainting_vq4.py --workdir workdirs/inpaint \
      --config.first_stage_checkpoint=workdirs/vq_f4_noattn --config.data.data_dir=/data/places
  python train.py --config configs/inpainting_vq4.py:tiny --workdir /tmp/inpaint_tiny \
      --config.first_stage_checkpoint=/tmp/vq_f4_noattn_tiny
Variants: '' (the paper run), 'tiny' (2 CPU steps on shapes).
The first stage is VQ-f4 with attn_type 'none' (released `vq-f4-noattn`); train it with
  python train.py --config configs/vq_f4.py --config.model.first_stage.kwargs.attn_type=none ...
The data pipeline must supply batch["concat"] = [masked-image latent (3), mask (1)] at latent
resolution, [B, H/4, W/4, 4]: the masked image encoded by the (frozen) first stage, scaled like z.
"""

from configs import common
from configs import vq_f4

LATENT_CHANNELS = 3
CONCAT_CHANNELS = 3 + 1  # Masked-image latent + the mask.


def _first_stage(arg: str):
  fs = vq_f4.get_config(arg).model.first_stage
  fs.kwargs.attn_type = "none"       # The mid-block AttnBlocks become identities (no params).
  return fs


def get_config(arg: str = ""):
  if arg not in ("", "tiny"):
    raise ValueError(f"configs/inpainting_vq4.py: unknown variant {arg!r}; expected '' or 'tiny'.")
  c = common.base_config()
  c.stage = "ldm"
  c.data.source = "folder"           # Places2 train images; masks are drawn by the pipeline.
  c.data.image_size = 256
  c.data.random_crop = True
  c.data.min_size = 256
  c.data.batch_size = 64             # Assumed (the released YAML has no data section).
  c.model.first_stage = _first_stage(arg)
  c.model.unet = common.unet_kwargs(
      in_channels=LATENT_CHANNELS + CONCAT_CHANNELS, out_channels=LATENT_CHANNELS,
      model_channels=256, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
      attention_resolutions=(8, 4, 2), num_heads=8, resblock_updown=True)
  # No cond-stage network: CompVis uses the first stage itself (__is_first_stage__) to encode the
  # masked image, which our pipeline does before the step; the UNet only sees the concat input
  # [masked-image latent, hole mask].
  c.model.cond_stage = dict(kind="first_stage", kwargs=dict())
  c.model.diffusion = common.diffusion(linear_start=0.0015, linear_end=0.0205,
                                       conditioning_key="concat", image_size=64,
                                       channels=LATENT_CHANNELS)
  c.train.loss_type = "l1"
  # The released scheduler: 1000 warm-up steps, then cosine decay to 1e-3 of the peak by 50k.
  c.train.num_steps = 50_000
  c.train.warmup_steps = 1000
  c.train.schedule = "cosine"
  c.train.learning_rate = 1e-6       # Per example (the YAML's base lr), x global batch.
  c.train.scale_lr_by_batch = True
  c.train.ema_decay = 0.9999
  c.checkpoint.every = 5000
  c.log.every = 100
  if arg == "tiny":
    common.tiny_training(c)
    c.data.source = "shapes"
    c.data.image_size = 64           # -> 16x16x3 latents.
    c.data.random_crop = False
    c.data.min_size = 0
    c.model.unet = common.unet_kwargs(
        in_channels=LATENT_CHANNELS + CONCAT_CHANNELS, out_channels=LATENT_CHANNELS,
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
        num_heads=8, resblock_updown=True)
    c.model.diffusion.image_size = 16
    c.train.warmup_steps = 1
  return c

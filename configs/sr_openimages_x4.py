"""Stage 2: the paper's x4 super-resolution LDM on OpenImages (64 px -> 256 px, VQ-f4 latents).

The network of the paper's x4 super-resolution LDM (Rombach et al. 2022, Sec. 4.4 / Tab. 5:
LDM-4 on ImageNet 64 -> 256 with bicubic degradation, FID 2.8), as in the released general-purpose
`bsr_sr` model (same network, trained on OpenImages with BSR degradations): the
low-resolution image itself (not its latent) is concatenated to the 64x64x3 latent z_t on the
channel axis, so the UNet sees 3 + 3 = 6 input channels and predicts the 3 latent channels.

  python train.py --config configs/sr_openimages_x4.py --workdir workdirs/sr_x4 \
      --config.first_stage_checkpoint=workdirs/vq_f4 --config.data.data_dir=/data/openimages/train
  python train.py --config configs/sr_openimages_x4.py:tiny --workdir /tmp/sr_tiny \
      --config.first_stage_checkpoint=/tmp/vq_f4_tiny
Variants: '' (the paper run), 'tiny' (2 CPU steps on shapes, 16 px -> 64 px).
The training input (`ldm_task.task_inputs`) is the x4-downsampled image in [-1, 1],
[B, H/4, W/4, 3] (= the latent resolution of the f=4 first stage), degraded as `data.degradation`
says: 'bsr' (blur, noise and JPEG, as the released bsr_sr model was trained) by default, 'bicubic'
for the paper's Tab. 5 setting.
"""

from configs import common
from configs import vq_f4

LATENT_CHANNELS = 3
LOW_RES_CHANNELS = 3  # RGB low-resolution image, concatenated as is.


def get_config(arg: str = ""):
  if arg not in ("", "tiny"):
    raise ValueError(f"configs/sr_openimages_x4.py: unknown variant {arg!r}; expected '' or "
                     "'tiny'.")
  c = common.base_config()
  c.stage = "ldm"
  c.data.source = "folder"           # OpenImages train images; set --config.data.data_dir.
  c.data.image_size = 256            # High-resolution target; the condition is 64 px.
  c.data.random_crop = True
  c.data.min_size = 256
  c.data.batch_size = 64             # Released per-GPU batch; the lr scales with it.
  c.data.degradation = "bsr"         # The released bsr_sr model's degradation.
  # The same VQ-f4 network as configs/vq_f4.py (and its tiny twin), so its workdir loads here.
  c.model.first_stage = vq_f4.get_config(arg).model.first_stage
  c.model.unet = common.unet_kwargs(
      in_channels=LATENT_CHANNELS + LOW_RES_CHANNELS, out_channels=LATENT_CHANNELS,
      model_channels=160, channel_mult=(1, 2, 2, 4), num_res_blocks=2,
      # Down-sampling factors as released: with four levels (1, 2, 4, 8) only 8 exists, so the
      # coarsest level (and the middle block) attend.
      attention_resolutions=(16, 8), num_head_channels=32)
  # Identity cond stage: the pipeline's low-res image is the concat input unchanged.
  c.model.cond_stage = dict(kind="identity", kwargs=dict())
  c.model.diffusion = common.diffusion(linear_start=0.0015, linear_end=0.0155,
                                       conditioning_key="concat", image_size=64,
                                       channels=LATENT_CHANNELS)
  c.train.num_steps = 500_000        # Not in the released YAML.
  c.train.learning_rate = 1e-6       # Per example (the YAML's base lr), x global batch.
  c.train.scale_lr_by_batch = True
  c.train.ema_decay = 0.9999
  c.checkpoint.every = 10_000
  c.log.every = 100
  if arg == "tiny":
    common.tiny_training(c)
    c.data.source = "shapes"
    c.data.image_size = 64           # -> 16x16x3 latents; low-res condition 16x16x3.
    c.data.random_crop = False
    c.data.min_size = 0
    c.model.unet = common.unet_kwargs(
        in_channels=LATENT_CHANNELS + LOW_RES_CHANNELS, out_channels=LATENT_CHANNELS,
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
        num_head_channels=32)
    c.model.diffusion.image_size = 16
  return c

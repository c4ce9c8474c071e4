"""Stage 2: the paper's semantic-synthesis LDM (segmentation map -> landscape, VQ-f4 latents).

Reproduces the semantic image synthesis model (Rombach et al. 2022, Sec. 4.3.2 / Fig. 8, trained at
256 px on landscape images with COCO-Stuff labels and applied convolutionally up to 1024 px; the
released `semantic_synthesis256` model). The one-hot 182-class map is downsampled twice by 2
(bilinear) and mapped to 3 channels by a trainable 1x1 conv (SpatialRescaler), then concatenated
to z_t: 3 + 3 = 6 UNet input channels.

  python train.py --config configs/semantic_synthesis.py --workdir workdirs/semantic \
      --config.first_stage_checkpoint=workdirs/vq_f4 --config.data.data_dir=/data/landscapes
  python train.py --config configs/semantic_synthesis.py:tiny --workdir /tmp/semantic_tiny \
      --config.first_stage_checkpoint=/tmp/vq_f4_tiny
Variants: '' (the paper run), 'tiny' (2 CPU steps on shapes' class masks).
The data: an image folder with a `maps/` folder of same-named PNGs holding each pixel's class index
(palette or grayscale, < the rescaler's in_channels; see ldm_jax/data/annotations.py). The training
input is its one-hot map at pixel resolution, [B, H, W, num_classes], for the SpatialRescaler; on
shapes the maps are drawn from the boxes (0 = background, class + 1 for an object's pixels).
"""

from configs import common
from configs import vq_f4

LATENT_CHANNELS = 3
SEG_CHANNELS = 3              # The rescaler's 1x1 conv output, concatenated to z_t.
COCO_STUFF_CLASSES = 182
SHAPES_SEG_CLASSES = 18 + 1   # The 18 shapes classes + background.


def get_config(arg: str = ""):
  if arg not in ("", "tiny"):
    raise ValueError(f"configs/semantic_synthesis.py: unknown variant {arg!r}; expected '' or "
                     "'tiny'.")
  c = common.base_config()
  c.stage = "ldm"
  c.data.source = "folder"           # Landscape photos + segmentation maps; set data_dir.
  c.data.image_size = 256
  c.data.random_crop = True
  c.data.batch_size = 32             # Assumed (the released YAML has no data section).
  # The same VQ-f4 network as configs/vq_f4.py (and its tiny twin), so its workdir loads here.
  c.model.first_stage = vq_f4.get_config(arg).model.first_stage
  c.model.unet = common.unet_kwargs(
      in_channels=LATENT_CHANNELS + SEG_CHANNELS, out_channels=LATENT_CHANNELS,
      model_channels=128, channel_mult=(1, 4, 8), num_res_blocks=2,
      # As released: the three levels have down-sampling factors 1, 2, 4, so none of 32, 16, 8
      # occurs and only the middle block attends (fully convolutional, hence any image size).
      attention_resolutions=(32, 16, 8), num_heads=8)
  c.model.cond_stage = dict(
      kind="spatial_rescaler",
      # 256 px -> 64 px (two bilinear halvings) = the latent size; 182 classes -> 3 channels.
      kwargs=dict(n_stages=2, method="bilinear", multiplier=0.5, in_channels=COCO_STUFF_CLASSES,
                  out_channels=SEG_CHANNELS, bias=False))
  c.model.diffusion = common.diffusion(linear_start=0.0015, linear_end=0.0205,
                                       conditioning_key="concat", image_size=64,
                                       channels=LATENT_CHANNELS)
  c.train.loss_type = "l1"
  c.train.num_steps = 500_000        # Not in the released YAML.
  c.train.learning_rate = 1e-6       # Per example (the YAML's base lr), x global batch.
  c.train.scale_lr_by_batch = True
  c.train.ema_decay = 0.9999
  c.train.train_cond_stage = True    # cond_stage_trainable: the 1x1 channel mapper learns.
  c.checkpoint.every = 10_000
  c.log.every = 100
  if arg == "tiny":
    common.tiny_training(c)
    c.data.source = "shapes"
    c.data.image_size = 64           # -> 16x16x3 latents; maps 64 -> 16 px.
    c.data.random_crop = False
    c.model.unet = common.unet_kwargs(
        in_channels=LATENT_CHANNELS + SEG_CHANNELS, out_channels=LATENT_CHANNELS,
        model_channels=32, channel_mult=(1, 4), num_res_blocks=1,
        attention_resolutions=(32, 16, 8), num_heads=8)  # Middle-block attention only, as released.
    c.model.cond_stage.kwargs.in_channels = SHAPES_SEG_CLASSES
    c.model.diffusion.image_size = 16
  return c

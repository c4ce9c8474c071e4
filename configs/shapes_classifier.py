"""Noisy-latent classifier on shapes: the classifier that guides the unconditional shapes LDM.

The shapes analogue of configs/cin_classifier.py. It reads the 8x8x4 latents of
configs/shapes_autoencoder.py through the diffusion model named by --config.diffusion_checkpoint
(a stage-2 workdir or saved model on those latents, whose scale and schedule it takes) and learns
the 18 shapes classes (colour x shape of the first object) at every noise level.

  python train.py --config configs/shapes_classifier.py --workdir workdirs/shapes_classifier \
      --config.diffusion_checkpoint=workdirs/shapes_ldm_uncond
  python sample.py --checkpoint workdirs/shapes_ldm_uncond --classifier \
      workdirs/shapes_classifier --classifier_scale 10 --class_label 0 --outdir out/
Variants: '' (a few CPU minutes), 'tiny' (2 steps, for smoke tests).
"""

from configs import common
from configs import shapes_autoencoder
from ldm_jax.data import shapes


def get_config(arg: str = ""):
  if arg not in ("", "tiny"):
    raise ValueError(f"configs/shapes_classifier.py: unknown variant {arg!r}; expected '' or "
                     "'tiny'.")
  c = common.base_config()
  c.stage = "classifier"
  c.diffusion_checkpoint = ""        # The diffusion model whose latents and schedule it learns.
  c.data.source = "shapes"
  c.data.label_key = "label"         # colour * 3 + shape of the (first) object: 18 classes.
  c.data.image_size = 32             # As configs/shapes_autoencoder.py: 8x8x4 latents.
  c.data.batch_size = 32
  # The latent space it classifies: the diffusion checkpoint must have this first stage and this
  # schedule (checked when training starts); its scale factor is read from the checkpoint.
  c.model.first_stage = shapes_autoencoder.get_config(arg).model.first_stage
  c.model.diffusion = common.diffusion(image_size=8, channels=4, scale_by_std=True)
  # guided-diffusion's classifier shape (scale-shift norm, resblock down-sampling, attention
  # pooling) at the size of the shapes UNets: 8x8 -> 4x4, attention at 4x4.
  c.model.classifier = dict(
      in_channels=4, model_channels=64, num_classes=shapes.NUM_CLASSES, num_res_blocks=1,
      attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=32,
      use_scale_shift_norm=True, resblock_updown=True, pool="attention", image_size=8,
      dropout=0.0)
  c.train.num_steps = 1500
  c.train.learning_rate = 3e-4       # guided-diffusion's classifier lr.
  c.train.weight_decay = 1e-2        # AdamW, CompVis NoisyLatentImageClassifier's default.
  c.train.label_smoothing = 0.0      # CompVis: plain cross-entropy.
  c.train.use_ema = False            # CompVis keeps no EMA of the classifier.
  c.checkpoint.every = 500
  c.log.every = 50
  if arg == "tiny":
    common.tiny_training(c)
    c.model.classifier.model_channels = 32
  return c

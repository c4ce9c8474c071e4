"""Noisy-latent ImageNet classifier for classifier guidance of the LDM-VQ-8 (the paper's "-G").

The paper guides its class-conditional ImageNet LDM-VQ-8 (32x32x4 latents) with a classifier
trained on noised latents (Rombach et al. 2022: FID 7.77 with classifier scale 10, against
15.82 unguided). CompVis released no config for that classifier; its
`NoisyLatentImageClassifier` builds the network from the diffusion model's own unet_config (input
channels = the UNet's out_channels, out = the classes, pool 'attention'), so the network here is
`encoder_kwargs_from_unet` of the UNet of `configs/latent-diffusion/cin-ldm-vq-f8.yaml`
(model_channels 256, channel_mult 1-2-4, two res blocks, attention at 32, 16 and 8 px, 32
channels per head) with 1000 classes. Its recipe is CompVis's (t uniform in [0, T), plain
cross-entropy, AdamW weight decay 1e-2); the lr, batch and length are guided-diffusion's
256 px classifier's (3e-4, 256, 300k), which CompVis does not state.

  python train.py --config configs/cin_classifier.py --workdir workdirs/cin_classifier \
      --config.diffusion_checkpoint=workdirs/cin_ldm_vq8 --config.data.data_dir=/data/tfds
Variants: '' (the paper's classifier), 'tiny' (2 CPU steps on shapes' 18 classes, 64 px through
the tiny VQ-f8 = 8x8x4 latents).
"""

from configs import common
from configs import vq_f8
from ldm_jax.models import classifier as classifier_lib

# The UNet of cin-ldm-vq-f8.yaml (its cross-attention fields do not reach the classifier).
CIN_LDM_VQ8_UNET = common.unet_kwargs(
    in_channels=4, model_channels=256, channel_mult=(1, 2, 4), num_res_blocks=2,
    attention_resolutions=(4, 2, 1), num_head_channels=32, use_spatial_transformer=True,
    transformer_depth=1, context_dim=512)


def get_config(arg: str = ""):
  if arg not in ("", "tiny"):
    raise ValueError(f"configs/cin_classifier.py: unknown variant {arg!r}; expected '' or "
                     "'tiny'.")
  c = common.base_config()
  c.stage = "classifier"
  c.diffusion_checkpoint = ""        # The LDM-VQ-8 it guides (its latents and schedule).
  c.data.source = "tfds"
  c.data.name = "imagenet2012"       # TFDS needs the manually downloaded ILSVRC-2012 tars.
  c.data.label_key = "label"
  c.data.image_size = 256
  c.data.batch_size = 256
  # The latent space of cin-ldm-vq-f8.yaml: VQ-f8 latents, linear 0.0015 -> 0.0195, scale 1.
  c.model.first_stage = vq_f8.get_config(arg).model.first_stage
  c.model.diffusion = common.diffusion(linear_start=0.0015, linear_end=0.0195,
                                       conditioning_key="crossattn", image_size=32, channels=4)
  c.model.classifier = classifier_lib.encoder_kwargs_from_unet(
      CIN_LDM_VQ8_UNET, num_classes=1000, image_size=32, pool="attention")
  c.train.num_steps = 300_000
  c.train.learning_rate = 3e-4
  c.train.schedule = "linear"        # guided-diffusion's anneal_lr: linear decay to 0.
  c.train.weight_decay = 1e-2        # CompVis's AdamW default for this classifier.
  c.train.label_smoothing = 0.0      # CompVis: plain cross-entropy.
  c.train.use_ema = False            # CompVis keeps no EMA of the classifier.
  c.checkpoint.every = 10_000
  c.log.every = 100
  if arg == "tiny":
    common.tiny_training(c)
    c.data.source = "shapes"
    c.data.name = ""
    c.data.image_size = 64           # -> 8x8x4 latents through the tiny VQ-f8.
    c.model.diffusion.image_size = 8
    c.model.classifier = classifier_lib.encoder_kwargs_from_unet(
        common.unet_kwargs(in_channels=4, model_channels=32, channel_mult=(1, 2),
                           num_res_blocks=1, attention_resolutions=(2,), num_head_channels=32),
        num_classes=18, image_size=8, pool="attention")
  return c

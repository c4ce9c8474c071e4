"""Stage 2: class-conditional LDM-4 on ImageNet 256 (VQ-f4 latents, 64x64x3), "cin256-v2".

Reproduces the paper's class-conditional ImageNet result (Rombach et al. 2022, Tab. 3: LDM-4-G,
FID 3.60 / IS 247.7 with classifier-free guidance scale 1.5, 250 DDIM steps); the network of
`configs/latent-diffusion/cin256-v2.yaml`: a ClassEmbedder feeds a 1-token context to the UNet's
cross-attention, and the extra class 1000 is the "no class" label that classifier-free guidance
trains by dropping labels (train.cond_drop_prob).

  python train.py --config configs/cin256_v2.py --workdir workdirs/cin256 \
      --config.first_stage_checkpoint=workdirs/vq_f4 --config.data.data_dir=/data/tfds
  python train.py --config configs/cin256_v2.py:tiny --workdir /tmp/cin_tiny \
      --config.first_stage_checkpoint=/tmp/vq_f4_tiny
Variants: '' (the paper run), 'tiny' (2 CPU steps on shapes' 18 classes + null).
"""

from configs import common
from configs import vq_f4


def get_config(arg: str = ""):
  if arg not in ("", "tiny"):
    raise ValueError(f"configs/cin256_v2.py: unknown variant {arg!r}; expected '' or 'tiny'.")
  c = common.base_config()
  c.stage = "ldm"
  c.data.source = "tfds"
  c.data.name = "imagenet2012"       # TFDS needs the manually downloaded ILSVRC-2012 tars.
  c.data.label_key = "label"         # 0..999; 1000 is reserved for the null class.
  c.data.image_size = 256
  c.data.batch_size = 1024           # Not in the released YAML (it has no data section).
  # The same VQ-f4 network as configs/vq_f4.py (and its tiny twin), so its workdir loads here.
  c.model.first_stage = vq_f4.get_config(arg).model.first_stage
  c.model.unet = common.unet_kwargs(
      in_channels=3, model_channels=192, channel_mult=(1, 2, 3, 5), num_res_blocks=2,
      attention_resolutions=(8, 4, 2),  # Down-sampling factors: latent 8, 16 and 32 px levels.
      num_heads=1,                      # One head as wide as the level.
      use_spatial_transformer=True, transformer_depth=1,
      context_dim=512)                  # = the class embedding width.
  c.model.cond_stage = dict(
      kind="class",
      # ucg_rate stays 0: label dropout for guidance is done by the trainer (cond_drop_prob).
      kwargs=dict(n_classes=1001, embed_dim=512, ucg_rate=0.0))
  c.model.diffusion = common.diffusion(linear_start=0.0015, linear_end=0.0195,
                                       conditioning_key="crossattn", image_size=64, channels=3)
  c.train.num_steps = 200_000        # Not in the released YAML.
  c.train.learning_rate = 1e-4       # The YAML's base_learning_rate, used as the Adam lr.
  c.train.scale_lr_by_batch = False
  c.train.use_ema = False            # The released cin256-v2 model was trained without EMA.
  c.train.cond_drop_prob = 0.1       # Replace 10% of labels by class 1000 for CFG.
  c.checkpoint.every = 10_000
  c.log.every = 100
  c.log.sample_every = 10_000
  c.log.sample_guidance = 1.5        # The scale behind the published FID 3.60.
  if arg == "tiny":
    common.tiny_training(c)
    c.data.source = "shapes"
    c.data.name = ""
    c.data.image_size = 64           # -> 16x16x3 latents through the tiny VQ-f4.
    c.model.unet = common.unet_kwargs(
        in_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(1, 2), num_heads=1, use_spatial_transformer=True,
        transformer_depth=1, context_dim=64)
    # shapes: classes 0..17 (colour x shape) + 18 = the null class.
    c.model.cond_stage.kwargs.n_classes = 19
    c.model.cond_stage.kwargs.embed_dim = 64
    c.model.diffusion.image_size = 16
  return c

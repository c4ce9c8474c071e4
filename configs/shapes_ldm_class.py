"""Stage 2 on shapes: a class-conditional LDM ("a red circle", 18 classes) with classifier-free
guidance, the shapes analogue of the paper's cin256-v2 ImageNet model (configs/cin256_v2.py): a
ClassEmbedder gives a one-token context to cross-attention, and class 18 is the null label.

  python train.py --config configs/shapes_ldm_class.py --workdir workdirs/shapes_ldm_class \
      --config.first_stage_checkpoint=workdirs/shapes_ae
Variants: '' (the quickstart run), 'tiny' (2 steps, for smoke tests).
"""

from configs import common
from configs import shapes_autoencoder

NUM_CLASSES = 18 + 1  # 6 colours x 3 shapes, + the null class (18) for classifier-free guidance.


def get_config(arg: str = ""):
  if arg not in ("", "tiny"):
    raise ValueError(f"configs/shapes_ldm_class.py: unknown variant {arg!r}; expected '' or "
                     "'tiny'.")
  c = common.base_config()
  c.stage = "ldm"
  c.data.source = "shapes"
  c.data.label_key = "label"         # shapes: label = colour * 3 + shape of the (first) object.
  c.data.image_size = 32             # As configs/shapes_autoencoder.py: 8x8x4 latents.
  c.data.batch_size = 32
  # The autoencoder of configs/shapes_autoencoder.py, so its workdir is the first stage here.
  c.model.first_stage = shapes_autoencoder.get_config(arg).model.first_stage
  c.model.unet = common.unet_kwargs(
      in_channels=4, model_channels=64, channel_mult=(1, 2), num_res_blocks=1,
      attention_resolutions=(1, 2), num_head_channels=32, use_spatial_transformer=True,
      context_dim=128, transformer_depth=1)
  c.model.cond_stage = dict(kind="class", kwargs=dict(n_classes=NUM_CLASSES, embed_dim=128,
                                                      ucg_rate=0.0))  # Dropout: cond_drop_prob.
  c.model.diffusion = common.diffusion(conditioning_key="crossattn", scale_by_std=True,
                                       image_size=8, channels=4)
  # Trained with condition dropout for guidance: sample.py uses the scale of the sample grids.
  c.model.sampling = common.sampling(guidance=3.0)
  c.train.num_steps = 3000
  c.train.learning_rate = 5e-4
  c.train.warmup_steps = 100
  c.train.ema_decay = 0.999
  c.train.cond_drop_prob = 0.1
  c.train.grad_clip_norm = 1.0
  c.checkpoint.every = 1000
  c.log.every = 50
  c.log.sample_guidance = 3.0        # Shapes classes separate well with moderate guidance.
  if arg == "tiny":
    common.tiny_training(c)
    c.model.unet = common.unet_kwargs(
        in_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(1, 2), num_head_channels=32, use_spatial_transformer=True,
        context_dim=32, transformer_depth=1)
    c.model.cond_stage.kwargs.embed_dim = 32
  return c

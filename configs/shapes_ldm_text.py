"""Stage 2 on shapes: a text-conditional LDM ("a red circle at the top left") with the paper's
jointly trained text transformer over a word-level tokenizer of the shapes captions.

  python train.py --config configs/shapes_ldm_text.py --workdir workdirs/shapes_ldm \
      --config.first_stage_checkpoint=workdirs/shapes_ae
Variants: '' (the quickstart run), 'tiny' (2 steps, for smoke tests).
"""

from configs import common
from configs import shapes_autoencoder

TOKEN_LENGTH = 20


def get_config(arg: str = ""):
  c = common.base_config()
  c.stage = "ldm"
  c.data.source = "shapes"
  c.data.image_size = 32
  c.data.batch_size = 32
  # The autoencoder of configs/shapes_autoencoder.py, so its workdir is the first stage here.
  c.model.first_stage = shapes_autoencoder.get_config().model.first_stage
  c.model.unet = common.unet_kwargs(
      in_channels=4, model_channels=64, channel_mult=(1, 2), num_res_blocks=1,
      attention_resolutions=(2,), num_head_channels=32, use_spatial_transformer=True,
      context_dim=128, transformer_depth=1)
  c.model.cond_stage = dict(
      kind="ldm_bert",
      kwargs=dict(vocab_size=64, max_length=TOKEN_LENGTH, width=128, depth=2, heads=4,
                  head_dim=32),
      tokenizer=dict(kind="shapes", path=""))  # '' -> the built-in shapes word tokenizer.
  c.model.diffusion = common.diffusion(conditioning_key="crossattn", scale_by_std=True,
                                       image_size=8, channels=4)
  # Trained with condition dropout for guidance: what sample.py uses when given only --prompt.
  c.model.sampling = common.sampling(guidance=3.0)
  c.train.num_steps = 2000
  c.train.learning_rate = 5e-4
  c.train.warmup_steps = 100
  c.train.ema_decay = 0.999
  c.train.cond_drop_prob = 0.1
  c.train.grad_clip_norm = 1.0
  c.checkpoint.every = 1000
  c.log.every = 50
  c.log.sample_prompts = ("a red circle at the top left", "a blue square at the bottom right",
                          "a green triangle at the center", "a yellow circle at the top right")
  if arg == "tiny":
    common.tiny_training(c)
  elif arg:
    raise ValueError(f"configs/shapes_ldm_text.py: unknown variant {arg!r}; expected '' or 'tiny'.")
  return c

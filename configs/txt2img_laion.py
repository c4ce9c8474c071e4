"""Stage 2: the paper's 1.45B text-to-image LDM on LAION-400M (KL-f8 latents, 32x32x4 at 256 px).

Reproduces the LAION text-to-image model (Rombach et al. 2022, Sec. 4.3.1 / Tab. 2: LDM-KL-8-G on
MS-COCO, FID 12.63 with guidance scale 1.5, 250 DDIM steps); the network of
`configs/latent-diffusion/txt2img-1p4B-eval.yaml`: a 32-layer, 1280-wide transformer over BERT
word pieces, trained jointly with the UNet, feeds the UNet's cross-attention.

The BERT tokenizer is read from a local directory (nothing is downloaded): set
  --config.model.cond_stage.tokenizer.path=/path/to/bert-base-uncased
to a folder holding `vocab.txt` (or `tokenizer.json`) of bert-base-uncased (vocabulary 30522).

  python train.py --config configs/txt2img_laion.py --workdir workdirs/txt2img \
      --config.first_stage_checkpoint=workdirs/kl_f8 --config.data.data_dir=/data/laion400m \
      --config.model.cond_stage.tokenizer.path=/path/to/bert-base-uncased
  python train.py --config configs/txt2img_laion.py:tiny --workdir /tmp/txt2img_tiny \
      --config.first_stage_checkpoint=/tmp/kl_f8_tiny
Variants: '' (the paper run), 'tiny' (2 CPU steps on shapes captions with the word tokenizer).
"""

from configs import common
from configs import kl_f8

TOKEN_LENGTH = 77  # LDM BERTEmbedder max_seq_len.


def get_config(arg: str = ""):
  if arg not in ("", "tiny"):
    raise ValueError(f"configs/txt2img_laion.py: unknown variant {arg!r}; expected '' or 'tiny'.")
  c = common.base_config()
  c.stage = "ldm"
  c.data.source = "folder"           # LAION-400M as image files with a .txt caption beside each.
  c.data.caption_key = "caption"     # Non-empty: the folder loader reads the .txt captions.
  c.data.image_size = 256
  c.data.random_crop = True
  c.data.min_size = 256
  c.data.batch_size = 680            # Assumed (the eval YAML has no data section).
  # The same KL-f8 network as configs/kl_f8.py (and its tiny twin), so its workdir loads here.
  c.model.first_stage = kl_f8.get_config(arg).model.first_stage
  c.model.unet = common.unet_kwargs(
      in_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
      attention_resolutions=(4, 2, 1),  # Down-sampling factors: the three finest levels.
      num_heads=8, use_spatial_transformer=True, transformer_depth=1,
      context_dim=1280,                 # = the text transformer width.
      legacy=False)                     # Heads = num_heads at every level (not channels / 64).
  c.model.cond_stage = dict(
      kind="ldm_bert",
      # BERTEmbedder(n_embed=1280, n_layer=32): x-transformers Encoder with 8 heads of 64.
      kwargs=dict(vocab_size=30522, max_length=TOKEN_LENGTH, width=1280, depth=32, heads=8,
                  head_dim=64, mlp_ratio=4, epsilon=1e-5),
      tokenizer=dict(kind="bert", path=""))  # Must be set: a local bert-base-uncased folder.
  c.model.diffusion = common.diffusion(linear_start=0.00085, linear_end=0.012,
                                       conditioning_key="crossattn", scale_factor=0.18215,
                                       image_size=32, channels=4)
  c.train.num_steps = 390_000        # Assumed; not in the eval YAML.
  c.train.learning_rate = 5e-5       # The YAML's base_learning_rate, used as the Adam lr.
  c.train.scale_lr_by_batch = False
  c.train.use_ema = False            # The released model has no EMA weights (use_ema: False).
  c.train.cond_drop_prob = 0.1       # Empty-caption dropout for classifier-free guidance.
  c.train.train_cond_stage = True    # The text transformer learns jointly with the UNet.
  # 1.45B trainable parameters: fp32 weights, AdamW moments and gradients replicated are ~23 GB
  # per chip, more than a v5e (16 GiB) or v4 (32 GiB) holds (`python -m ldm_jax.aot` refuses it);
  # sharded over one 8-chip host they are ~3 GB. Use --config.mesh.fsdp=N for N chips.
  c.mesh.data = -1
  c.mesh.fsdp = 8
  c.checkpoint.every = 10_000
  c.log.every = 100
  c.log.sample_every = 10_000
  c.log.sample_guidance = 5.0
  c.log.sample_prompts = ("a painting of a virus monster playing guitar",
                          "a street sign that reads latent diffusion")
  if arg == "tiny":
    common.tiny_training(c)
    c.mesh.fsdp = 1                  # Runs on one CPU device.
    c.data.source = "shapes"
    c.data.caption_key = ""          # shapes always carries captions.
    c.data.image_size = 64           # -> 8x8x4 latents through the tiny KL-f8.
    c.data.random_crop = False
    c.data.min_size = 0
    c.model.unet = common.unet_kwargs(
        in_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(2, 1), num_heads=8, use_spatial_transformer=True,
        transformer_depth=1, context_dim=64, legacy=False)
    c.model.cond_stage = dict(
        kind="ldm_bert",
        kwargs=dict(vocab_size=64, max_length=20, width=64, depth=2, heads=8, head_dim=8,
                    mlp_ratio=4, epsilon=1e-5),
        tokenizer=dict(kind="shapes", path=""))  # The built-in shapes word tokenizer.
    c.model.diffusion.image_size = 8
    c.log.sample_prompts = ("a red circle at the top left",)
  return c

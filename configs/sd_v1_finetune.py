"""Stage 2: fine-tunes Stable Diffusion 1.x (KL-f8 latents, CLIP ViT-L/14 text, 512 px) on captions.

Starts from a converted SD 1.x model (the released `v1-inference.yaml` network: 859.5M-parameter
UNet, mc 320, mult 1-2-4-4, attention at factors 4-2-1 with 8 heads, cross-attention to the
768-wide last hidden state of the frozen CLIP ViT-L/14 text tower, the 83.7M kl-f8 autoencoder,
scale_factor 0.18215). Only the UNet is trained, in bf16 with fp32 master weights, with
rematerialised blocks and parameters sharded over an FSDP mesh axis.

Convert the weights first (nothing is downloaded), then point init_from at the output folder:
  python -m ldm_jax.convert --compvis_ckpt v1-5-pruned.ckpt --compvis_yaml v1-inference.yaml \
      --tokenizer /path/to/clip_tokenizer --out models/sd15
  python train.py --config configs/sd_v1_finetune.py --workdir workdirs/sd15_ft \
      --config.init_from=models/sd15 --config.data.data_dir=/data/captioned_images
  python train.py --config configs/sd_v1_finetune.py:tiny --workdir /tmp/sd1_tiny \
      --config.first_stage_checkpoint=/tmp/kl_f8_tiny
Variants: '' (the fine-tuning run), 'tiny' (2 CPU steps on shapes, a fresh miniature SD).
The trainer builds the network from init_from's own saved config; `config.model` states the SD 1.x
network that folder must hold (tests/test_configs.py checks it against v1-inference.yaml and the
released parameter counts) and is what a from-scratch run (init_from='') would build.
"""

from configs import common
from configs import kl_f8

INIT_FROM = "models/sd15"  # Placeholder: the `--out` folder of ldm_jax.convert for SD 1.x.


def get_config(arg: str = ""):
  if arg not in ("", "tiny"):
    raise ValueError(f"configs/sd_v1_finetune.py: unknown variant {arg!r}; expected '' or 'tiny'.")
  c = common.base_config()
  c.stage = "ldm"
  c.init_from = INIT_FROM
  c.data.source = "folder"           # Images with a .txt caption beside each.
  c.data.caption_key = "caption"     # Non-empty: the folder loader reads the .txt captions.
  c.data.image_size = 512
  c.data.random_crop = True
  c.data.random_flip = True
  c.data.min_size = 512
  c.data.batch_size = 32
  # SD's autoencoder is the paper's kl-f8 network (configs/kl_f8.py).
  c.model.first_stage = kl_f8.get_config(arg).model.first_stage
  c.model.unet = common.unet_kwargs(
      in_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
      attention_resolutions=(4, 2, 1), num_heads=8, use_spatial_transformer=True,
      transformer_depth=1,
      context_dim=768,               # = CLIP ViT-L/14 text width.
      legacy=False)                  # 8 heads at every level (head width 40 / 80 / 160).
  c.model.cond_stage = dict(
      kind="clip",
      # openai/clip-vit-large-patch14 text tower (FrozenCLIPEmbedder, last layer + final LN).
      kwargs=dict(vocab_size=49408, max_length=77, width=768, layers=12, heads=12, mlp_dim=3072,
                  activation="quick_gelu", epsilon=1e-5, output_layer="last"),
      tokenizer=dict(kind="clip", path=""))  # The converted model folder carries the tokenizer.
  c.model.diffusion = common.diffusion(linear_start=0.00085, linear_end=0.012,
                                       conditioning_key="crossattn", scale_factor=0.18215,
                                       image_size=64, channels=4)
  c.train.num_steps = 15_000
  c.train.learning_rate = 1e-5       # Absolute: fine-tuning keeps close to the released weights.
  c.train.scale_lr_by_batch = False
  c.train.warmup_steps = 500
  c.train.weight_decay = 1e-2        # AdamW, as common SD fine-tuning recipes.
  c.train.grad_clip_norm = 1.0
  c.train.ema_decay = 0.9999
  c.train.cond_drop_prob = 0.1       # Empty-prompt dropout keeps classifier-free guidance working.
  c.train.compute_dtype = "bfloat16"  # bf16 activations, fp32 master weights and norms.
  c.train.remat = True               # Recompute UNet block activations in the backward pass.
  c.mesh.data = -1
  c.mesh.fsdp = 8                    # One 8-accelerator host; use --config.mesh.fsdp=N for N.
  c.checkpoint.every = 1000
  c.log.every = 50
  c.log.sample_every = 1000
  c.log.sample_guidance = 7.5
  c.log.sample_prompts = ("a photograph of an astronaut riding a horse",
                          "a watercolor painting of a lighthouse at dawn")
  if arg == "tiny":
    common.tiny_training(c)
    c.init_from = ""                 # A fresh miniature SD; the smoke test gives the first stage.
    c.data.source = "shapes"
    c.data.caption_key = ""          # shapes always carries captions.
    c.data.image_size = 64           # -> 8x8x4 latents through the tiny KL-f8.
    c.data.random_crop = False
    c.data.random_flip = False       # Flips would contradict "left" / "right" in the captions.
    c.data.min_size = 0
    c.model.unet = common.unet_kwargs(
        in_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(2, 1), num_heads=8, use_spatial_transformer=True,
        transformer_depth=1, context_dim=64, legacy=False)
    c.model.cond_stage = dict(
        kind="clip",
        kwargs=dict(vocab_size=64, max_length=20, width=64, layers=2, heads=2, mlp_dim=256,
                    activation="quick_gelu", epsilon=1e-5, output_layer="last"),
        tokenizer=dict(kind="shapes", path=""))  # The built-in shapes word tokenizer.
    c.model.diffusion.image_size = 8
    c.mesh.fsdp = 1                  # Runs on one CPU device.
    c.train.warmup_steps = 0         # Two steps: a warm-up would keep the lr at ~0.
    c.log.sample_prompts = ("a red circle at the top left",)
  return c

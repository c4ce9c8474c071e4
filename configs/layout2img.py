"""Stage 2: the paper's layout-to-image LDM (VQ-f4 latents, 64x64x3) on OpenImages boxes.

Reproduces the layout-to-image model (Rombach et al. 2022, Sec. 4.3.2 and appendix: LDM-4 on
COCO layouts, FID 32.02 as published; the network of the released `layout2img-openimages256`):
each bounding box becomes three tokens (class, quantised top-left corner, quantised bottom-right
corner), a 16-layer, 512-wide transformer (the LDM BERTEmbedder without its tokenizer) encodes
the token sequence, and the UNet cross-attends to it with 3 transformer blocks per level.

  python train.py --config configs/layout2img.py --workdir workdirs/layout2img \
      --config.first_stage_checkpoint=workdirs/vq_f4 --config.data.data_dir=/data/openimages \
      [--config.data.boxes_file=/data/openimages/instances.json]
  python train.py --config configs/layout2img.py:tiny --workdir /tmp/layout_tiny \
      --config.first_stage_checkpoint=/tmp/vq_f4_tiny
Variants: '' (the paper run), 'tiny' (2 CPU steps on shapes' boxes).
The data: an image folder whose boxes come from metadata.jsonl lines
{"file_name": ..., "boxes": [[x0, y0, x1, y1, class], ...]} (pixels) or from a COCO instances JSON
(`data.boxes_file`); see ldm_jax/data/annotations.py. `model.cond_stage.layout` says how the boxes
become the transformer's tokens (`transforms.layout_tokens`: class, top-left and bottom-right
corner tokens per box, corners quantised on a grid x grid lattice); it is saved with the model, so
that `sample.py --layout` codes boxes as training did. No text tokenizer is involved, hence
tokenizer.kind None.
"""

from configs import common
from configs import vq_f4

# OpenImages' 601 boxable classes, corners on a 64 x 64 lattice (4 px cells at 256 px), up to 30
# boxes: 64^2 + 601 + 1 = 4698 tokens of the transformer's 8192, 90 of its 92 positions.
OPENIMAGES_LAYOUT = dict(grid=64, num_classes=601, max_objects=30)
# Tiny variant's box vocabulary on shapes: a 16 x 16 grid of corner positions (x, y) quantised to
# cells, then 18 classes, then the padding token; 3 tokens per box, at most 2 boxes.
SHAPES_CLASSES = 18
SHAPES_GRID = 16
# transforms.layout_tokens: grid^2 corner tokens, one token per class, one padding token.
SHAPES_VOCAB = SHAPES_GRID * SHAPES_GRID + SHAPES_CLASSES + 1
SHAPES_TOKENS = 6  # 2 boxes x (class, top-left, bottom-right).


def get_config(arg: str = ""):
  if arg not in ("", "tiny"):
    raise ValueError(f"configs/layout2img.py: unknown variant {arg!r}; expected '' or 'tiny'.")
  c = common.base_config()
  c.stage = "ldm"
  c.data.source = "folder"           # OpenImages images + box annotations; set data_dir.
  c.data.image_size = 256
  c.data.batch_size = 24             # Released per-GPU batch; the lr scales with it.
  # The same VQ-f4 network as configs/vq_f4.py (and its tiny twin), so its workdir loads here.
  c.model.first_stage = vq_f4.get_config(arg).model.first_stage
  c.model.unet = common.unet_kwargs(
      in_channels=3, model_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
      attention_resolutions=(8, 4, 2), num_head_channels=32, use_spatial_transformer=True,
      transformer_depth=3,              # Three self+cross attention blocks per attending level.
      context_dim=512)                  # = the box-token transformer width.
  c.model.cond_stage = dict(
      kind="ldm_bert",
      # OpenImages box tokens: 8192 ids (classes + 2D coordinate cells), up to 92 tokens (30
      # boxes x 3 + 2). x-transformers Encoder: 8 heads of 64.
      kwargs=dict(vocab_size=8192, max_length=92, width=512, depth=16, heads=8, head_dim=64,
                  mlp_ratio=4, epsilon=1e-5),
      tokenizer=dict(kind=None, path=""),  # Box tokens come from the data pipeline.
      layout=dict(OPENIMAGES_LAYOUT))
  c.model.diffusion = common.diffusion(linear_start=0.0015, linear_end=0.0205,
                                       conditioning_key="crossattn", image_size=64, channels=3)
  c.train.loss_type = "l1"
  c.train.num_steps = 500_000        # Not in the released YAML.
  c.train.learning_rate = 2e-6       # Per example (the YAML's base lr), x global batch.
  c.train.scale_lr_by_batch = True
  c.train.ema_decay = 0.9999
  c.train.train_cond_stage = True    # cond_stage_trainable: the box transformer learns jointly.
  c.checkpoint.every = 10_000
  c.log.every = 100
  if arg == "tiny":
    common.tiny_training(c)
    c.data.source = "shapes"
    c.data.num_objects = 2           # Layouts with two boxes.
    c.data.image_size = 64           # -> 16x16x3 latents.
    c.model.unet = common.unet_kwargs(
        in_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(1, 2), num_head_channels=32, use_spatial_transformer=True,
        transformer_depth=2, context_dim=64)
    c.model.cond_stage.layout = dict(grid=SHAPES_GRID, num_classes=SHAPES_CLASSES,
                                     max_objects=SHAPES_TOKENS // 3)
    c.model.cond_stage.kwargs = dict(vocab_size=SHAPES_VOCAB, max_length=SHAPES_TOKENS, width=64,
                                     depth=2, heads=8, head_dim=8, mlp_ratio=4, epsilon=1e-5)
    c.model.diffusion.image_size = 16
  return c

"""Pieces shared by the experiment configs: defaults of every section, and model builders.

Each experiment file defines `get_config(arg)` returning a ConfigDict; `arg` picks a variant
(`tiny` = a few CPU steps for smoke tests). Sections:

  stage       'autoencoder' (stage 1) or 'ldm' (stage 2)
  data        where images come from and how they are transformed
  model       first_stage / unet / cond_stage / diffusion (see ldm_jax/models/build.py), and
              optionally sampling: the settings sample.py uses when the user gives none
  train       optimiser, schedule, EMA, precision, memory
  lora        stage 2: train low-rank adapters on a frozen init_from instead of the whole UNet
  loss        stage-1 losses (LPIPS, discriminator)
  checkpoint  how often to save and how many to keep
  log         console/TensorBoard cadence and sample grids
  mesh        device mesh axes for data / FSDP sharding
"""

import ml_collections
from ml_collections import config_dict

from ldm_jax.diffusion import defaults as diffusion_defaults


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "ldm"
  c.seed = 0
  c.init_from = ""               # Path of a saved model / workdir / CompVis ckpt to start from.
  c.first_stage_checkpoint = ""  # Stage 2: the trained autoencoder (workdir or saved model).

  c.data = ml_collections.ConfigDict()
  c.data.source = "shapes"       # A name in ldm_jax.data.sources.SOURCES.
  c.data.name = ""               # TFDS dataset name (e.g. 'celeb_a_hq/256').
  c.data.split = "train"
  c.data.data_dir = ""           # TFDS data_dir, image folder root or latent cache directory.
  c.data.image_key = "image"
  c.data.caption_key = ""        # Empty: no captions.
  c.data.label_key = ""          # Empty: no labels.
  c.data.image_size = 64
  c.data.random_crop = False
  c.data.random_flip = False
  c.data.min_size = 0            # Image folders: drop images smaller than this.
  c.data.num_objects = 1         # Shapes: objects per image (1 or 2).
  c.data.num_examples = 100_000  # Shapes: virtual dataset length.
  c.data.worker_count = 0        # Grain worker processes (0 = in-process).
  c.data.boxes_file = ""         # Image folders: COCO instances JSON (else metadata.jsonl boxes).
  c.data.boxes_key = ""          # TFDS: the boxes' BBoxFeature sequence (e.g. 'objects/bbox').
  c.data.box_labels_key = ""     # TFDS: the boxes' classes (e.g. 'objects/label').
  c.data.segmentation_key = ""   # TFDS: a map of class indices (e.g. 'annotation').
  c.data.degradation = "bicubic" # Super-resolution: how the low-res input is made, bicubic or bsr.
  c.data.inpaint_masks = "mixed" # Inpainting: 'box', 'stroke' or 'mixed' random holes.
  c.data.batch_size = 32         # Global batch size (split across hosts and devices).

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000
  c.train.learning_rate = 1e-4
  c.train.scale_lr_by_batch = False  # LDM paper: lr = base_lr * global batch (x accum steps).
  c.train.warmup_steps = 0
  c.train.schedule = "constant"      # 'constant' | 'cosine' | 'linear'.
  c.train.weight_decay = 0.0
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.grad_clip_norm = 0.0       # 0 disables clipping.
  c.train.grad_accum_steps = 1
  c.train.ema_decay = 0.9999
  c.train.use_ema = True
  c.train.cond_drop_prob = 0.0       # Classifier-free guidance: drop the condition this often.
  c.train.compute_dtype = "float32"  # 'bfloat16' computes in bf16 with fp32 master weights.
  c.train.remat = False              # Rematerialise UNet blocks to save activation memory.
  c.train.nonfinite = "stop"         # 'stop' or 'skip' a step with NaN/Inf loss or gradients.
  c.train.loss_type = "l2"
  c.train.l_simple_weight = 1.0
  c.train.original_elbo_weight = 0.0
  c.train.learn_logvar = False
  c.train.logvar_init = 0.0
  c.train.min_snr_gamma = 0.0        # 0 disables min-SNR weighting.
  c.train.train_cond_stage = True    # Train a text transformer jointly (frozen encoders ignore this).

  c.lora = ml_collections.ConfigDict()  # Stage 2: LoRA adapters on the frozen model of init_from.
  c.lora.rank = 0                    # 0 trains the model itself; r > 0 trains rank-r adapters only.
  c.lora.alpha = 0.0                 # Updates are (alpha / rank) * up @ down; 0 means alpha = rank.
  c.lora.targets = ("attention",)    # Some of 'attention' (to_q/k/v/out), 'convs', 'text_encoder'.

  c.loss = ml_collections.ConfigDict()
  c.loss.kind = "kl"                 # 'kl' | 'vq'.
  c.loss.disc_start = 50001
  c.loss.kl_weight = 1e-6
  c.loss.codebook_weight = 1.0
  c.loss.disc_weight = 0.5
  c.loss.disc_factor = 1.0
  c.loss.perceptual_weight = 1.0
  c.loss.disc_loss = "hinge"
  c.loss.disc_num_layers = 3
  c.loss.disc_use_actnorm = False
  c.loss.disc_ndf = 64
  c.loss.lpips_path = ""             # npz from `python -m ldm_jax.convert.lpips`.
  c.loss.allow_no_lpips = False      # Train without LPIPS when no weights file is given.
  c.loss.learn_logvar = False        # Train the nll's log-variance (CompVis keeps it at 0).
  c.loss.base_learning_rate = 4.5e-6

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 1000
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  c.log = ml_collections.ConfigDict()
  c.log.every = 50
  c.log.sample_every = 0             # 0 disables periodic sample grids.
  c.log.num_samples = 8
  c.log.sample_steps = 50
  c.log.sample_guidance = 1.0
  c.log.sample_prompts = ()

  c.eval = ml_collections.ConfigDict()  # Stage 2: sample-and-evaluate during training.
  c.eval.every_steps = 0             # 0 disables; else FID / IS / P-R every N steps (EMA weights).
  c.eval.num_samples = 1000          # Samples per evaluation (the paper: 50k).
  c.eval.sampler = "ddim"
  c.eval.steps = 50
  c.eval.eta = 0.0
  c.eval.guidance = 1.0
  c.eval.seed = 0                    # Sample i uses seed + i: every evaluation sees the same noise.
  c.eval.batch_size = 16
  c.eval.prompts = ()                # Text models; empty: log.sample_prompts (cycled).
  c.eval.inception = ""              # FID Inception .npz (python -m ldm_jax.convert.inception).
  c.eval.inception_batch = 50
  c.eval.reference = ""              # Image folder, tfds:NAME[:SPLIT] or stats .npz ('' = IS only).
  c.eval.reference_size = 0          # Resize + centre-crop reference images (0 = as stored).
  c.eval.max_reference_images = 0    # 0 = all.
  c.eval.data_dir = ""               # TFDS data_dir of the reference.
  c.eval.cache_dir = ""              # Cache of reference statistics.
  c.eval.is_splits = 10
  c.eval.pr_k = 3                    # Precision/recall k (0 = skip; needs reference images).

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                   # -1 absorbs the devices not used by the other axes.
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.min_shard_size = 2 ** 14    # Parameters smaller than this are replicated.
  c.mesh.num_devices = 0             # Use only the first N devices (0 = all; single-host only).

  c.model = ml_collections.ConfigDict()
  return c


def autoencoder_kwargs(*, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=(),
                       resolution=256, z_channels=4, embed_dim=4, double_z=True, n_embed=None,
                       dropout=0.0, attn_type="vanilla") -> dict:
  """Encoder/Decoder fields (the CompVis `ddconfig`) plus embed_dim (+ n_embed for VQ)."""
  kwargs = dict(ch=ch, out_ch=3, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                attn_resolutions=tuple(attn_resolutions), dropout=dropout, in_channels=3,
                resolution=resolution, z_channels=z_channels, double_z=double_z,
                embed_dim=embed_dim, attn_type=attn_type)
  if n_embed is not None:
    kwargs["n_embed"] = n_embed
  return kwargs


def first_stage(kind: str, **kwargs) -> ml_collections.ConfigDict:
  if kind == "vq":
    kwargs.setdefault("double_z", False)
  return ml_collections.ConfigDict(dict(kind=kind, kwargs=autoencoder_kwargs(**kwargs)))


def unet_kwargs(*, in_channels, model_channels, out_channels=None, channel_mult=(1, 2, 4),
                num_res_blocks=2, attention_resolutions=(), num_heads=-1, num_head_channels=-1,
                context_dim=None, use_spatial_transformer=False, transformer_depth=1,
                use_linear_in_transformer=False, num_classes=None, use_scale_shift_norm=False,
                resblock_updown=False, dropout=0.0, legacy=True, adm_in_channels=None) -> dict:
  # Optional integers are typed placeholders (not plain None) so --config.model.unet.context_dim=64
  # can set them from the command line.
  context_dim = config_dict.placeholder(int) if context_dim is None else context_dim
  adm_in_channels = config_dict.placeholder(int) if adm_in_channels is None else adm_in_channels
  if num_classes is None:
    num_classes = config_dict.placeholder(int)
  return dict(in_channels=in_channels, model_channels=model_channels,
              out_channels=out_channels or in_channels, channel_mult=tuple(channel_mult),
              num_res_blocks=num_res_blocks, attention_resolutions=tuple(attention_resolutions),
              num_heads=num_heads, num_head_channels=num_head_channels, context_dim=context_dim,
              use_spatial_transformer=use_spatial_transformer,
              transformer_depth=transformer_depth,
              use_linear_in_transformer=use_linear_in_transformer, num_classes=num_classes,
              use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
              dropout=dropout, legacy=legacy, adm_in_channels=adm_in_channels)


def diffusion(**fields) -> ml_collections.ConfigDict:
  """model.diffusion: the defaults of `ldm_jax.diffusion.defaults` with `fields` replaced."""
  unknown = sorted(set(fields) - set(diffusion_defaults.DEFAULTS))
  if unknown:
    raise TypeError(f"common.diffusion({unknown[0]}=...): unknown field; expected some of "
                    f"{sorted(diffusion_defaults.DEFAULTS)}.")
  return ml_collections.ConfigDict(diffusion_defaults.with_defaults(fields))


def sampling(*, guidance: float, sampler: str = "ddim", steps: int = 50
             ) -> ml_collections.ConfigDict:
  """A model's recommended sampling settings (`model.sampling`): saved with the model, used by
  sample.py and LatentDiffusion.sample for whatever the user does not give."""
  return ml_collections.ConfigDict(dict(sampler=sampler, steps=steps, guidance=guidance))


def tiny_training(c: ml_collections.ConfigDict, *, steps: int = 2, batch: int = 2) -> None:
  """Shrinks a config's run to a CPU smoke test (models are shrunk by each config)."""
  c.train.num_steps = steps
  c.data.batch_size = batch
  c.data.num_examples = 64
  c.checkpoint.every = steps
  c.log.every = 1
  c.log.sample_every = 0
  c.log.num_samples = 2
  c.log.sample_steps = 2


def autoencoder_training(c: ml_collections.ConfigDict,
                         first_stage_config: ml_collections.ConfigDict, *, batch_size: int) -> None:
  """The paper's first-stage recipe, shared by configs/kl_f*.py and vq_f*.py (stage 1).

  256 px crops of OpenImages (set --config.data.data_dir), the CompVis learning rate scaled by the
  batch, no EMA. Each config then sets its released loss weights (disc_start, disc_weight, ...).
  """
  c.stage = "autoencoder"
  c.data.source = "folder"           # OpenImages train images; set --config.data.data_dir.
  c.data.image_size = 256
  c.data.random_crop = True          # The released data config crops 256 px from 384 px images.
  c.data.min_size = 256
  c.data.batch_size = batch_size     # Released per-GPU batch; the lr scales with it.
  c.model.first_stage = first_stage_config
  c.train.num_steps = 500_000        # Not in the released configs; long enough for disc_start.
  c.train.use_ema = False            # The CompVis autoencoders keep no EMA copy.
  c.loss.kind = first_stage_config.kind
  c.loss.base_learning_rate = 4.5e-6  # x global batch x accumulation, as CompVis main.py does.
  c.checkpoint.every = 5000
  c.log.every = 100


def tiny_autoencoder_training(c: ml_collections.ConfigDict,
                              first_stage_config: ml_collections.ConfigDict) -> None:
  """The 'tiny' variant of `autoencoder_training`: 2 CPU steps on 64 px shapes, GAN on from step 1.

  `first_stage_config` is the config's miniature network (same levels, 64 px, ch 32).
  """
  tiny_training(c)
  c.data.source = "shapes"
  c.data.image_size = 64
  c.data.random_crop = False
  c.data.min_size = 0
  c.model.first_stage = first_stage_config
  c.loss.disc_start = 1              # Exercise the GAN branch within the two steps.
  c.loss.disc_ndf = 16
  c.loss.allow_no_lpips = True       # No LPIPS weights file in smoke tests.

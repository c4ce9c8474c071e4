"""The autoencoder-training row of `peers.py`: ldm_jax's GAN step against the same step in torch.

The model is configs/shapes_autoencoder.py (KL-f4: ch 32, mult (1, 2, 2), 1 res block, 32 px,
batch 16) with its 'gan' loss: L1 + LPIPS(vgg) + KL + a hinge PatchGAN (ndf 32, 2 layers) with
the adaptive weight, discriminator active from step 0. One step = the autoencoder update and the
discriminator update, Adam (0.5, 0.9) for both, as CompVis's two optimizer_idx passes.

  * ldm_jax: `ldm_jax.train.ae_trainer.make_step` (the trainer's own step), jitted with the state
    donated.
  * torch: diffusers `AutoencoderKL` with the same weights, and a direct torch port of taming's
    `LPIPSWithDiscriminator` (VGG16 trunk and heads with the same random weights as ours; the
    torchvision VGG is not installed, so the trunk is built here from its layer list).
diffusers-Flax ships no autoencoder loss, so it has no entry in this row. The discriminators are
initialised separately (same architecture, different random weights): timing does not depend on
their values.
"""

import numpy as np
import torch
from torch import nn

VGG_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)  # torchvision indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


def vgg16_features() -> nn.Sequential:
  """torchvision's `vgg16().features` layer list (same indices, so state-dict keys match)."""
  layers, cin = [], 3
  for v in VGG_LAYERS:
    if v == "M":
      layers.append(nn.MaxPool2d(2, 2))
    else:
      layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
      cin = v
  return nn.Sequential(*layers)


class TorchLPIPS(nn.Module):
  """lpips.LPIPS(net='vgg') forward: scaling, VGG taps, unit-normalise, squared diff, 1x1 heads."""

  def __init__(self):
    super().__init__()
    self.vgg = vgg16_features()
    chans = (64, 128, 256, 512, 512)
    self.lins = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in chans])
    self.register_buffer("shift", torch.tensor(LPIPS_SHIFT)[None, :, None, None])
    self.register_buffer("scale", torch.tensor(LPIPS_SCALE)[None, :, None, None])

  def forward(self, x0, x1):  # [B, 3, H, W] each -> [B, 1, 1, 1]
    h = (torch.cat([x0, x1]) - self.shift) / self.scale
    total, tap = 0.0, 0
    for i, layer in enumerate(self.vgg):
      h = layer(h)
      if i == TAPS[tap]:
        f = h / (torch.sqrt(torch.sum(h ** 2, dim=1, keepdim=True)) + 1e-10)
        a, b = f.chunk(2)
        total = total + self.lins[tap]((a - b) ** 2).mean(dim=(2, 3), keepdim=True)
        tap += 1
        if tap == len(TAPS):
          break
    return total


def torch_discriminator(ndf: int, n_layers: int) -> nn.Sequential:
  """taming's NLayerDiscriminator (BatchNorm, no bias before it, LeakyReLU 0.2)."""
  seq = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
  mult = 1
  for n in range(1, n_layers + 1):
    prev, mult = mult, min(2 ** n, 8)
    stride = 2 if n < n_layers else 1
    seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
            nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2)]
  seq.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
  return nn.Sequential(*seq)


def torch_step(vae, lpips, disc, opt_g, opt_d, x, loss_cfg):
  """One CompVis KL + GAN step: generator update, then discriminator update. Returns the loss."""
  # Generator (optimizer_idx 0).
  posterior = vae.encode(x).latent_dist
  recon = vae.decode(posterior.sample()).sample
  rec = torch.abs(x - recon) + loss_cfg.perceptual_weight * lpips(x, recon)
  nll = torch.sum(rec) / rec.shape[0]  # logvar 0
  kl = torch.sum(posterior.kl()) / rec.shape[0]
  g_loss = -torch.mean(disc(recon))
  last = vae.decoder.conv_out.weight
  nll_grad = torch.autograd.grad(nll, last, retain_graph=True)[0]
  g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
  d_weight = torch.clamp(torch.norm(nll_grad) / (torch.norm(g_grad) + 1e-4), 0.0, 1e4).detach()
  loss = nll + loss_cfg.kl_weight * kl + d_weight * loss_cfg.disc_weight * g_loss
  opt_g.zero_grad(set_to_none=True)
  loss.backward()
  opt_g.step()
  # Discriminator (optimizer_idx 1): hinge loss on real and detached fake.
  logits_real, logits_fake = disc(x), disc(recon.detach())
  d_loss = 0.5 * (torch.mean(torch.relu(1.0 - logits_real)) +
                  torch.mean(torch.relu(1.0 + logits_fake)))
  opt_d.zero_grad(set_to_none=True)
  d_loss.backward()
  opt_d.step()
  return loss.detach()


def _torch_models(cfg):
  """diffusers AutoencoderKL in the shapes architecture, the torch LPIPS and discriminator."""
  from diffusers import AutoencoderKL
  import peer_models as pm
  kw = cfg.model.first_stage.kwargs
  channels = tuple(kw.ch * m for m in kw.ch_mult)
  vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=kw.z_channels,
                      block_out_channels=channels,
                      down_block_types=("DownEncoderBlock2D",) * len(channels),
                      up_block_types=("UpDecoderBlock2D",) * len(channels),
                      layers_per_block=kw.num_res_blocks, sample_size=kw.resolution,
                      mid_block_add_attention=kw.attn_type != "none")
  pm.randomize_(vae, seed=21)
  lpips = pm.randomize_(TorchLPIPS(), seed=22)
  disc = torch_discriminator(cfg.loss.disc_ndf, cfg.loss.disc_num_layers)
  return vae.train(), lpips.eval(), disc.train()


def row_ae_train(args):
  import jax
  import jax.numpy as jnp
  import optax
  import bench_util as bu
  from configs import shapes_autoencoder
  from ldm_jax.convert import autoencoder as ae_convert
  from ldm_jax.convert import lpips as lpips_convert
  from ldm_jax.models import build
  from ldm_jax.train import ae_trainer
  from peers import measure
  cfg = shapes_autoencoder.get_config("gan")
  cfg.loss.disc_start = 0  # the full objective from the first timed step
  batch, size = cfg.data.batch_size, cfg.data.image_size
  lr = cfg.loss.base_learning_rate * batch
  vae, lpips, disc_t = _torch_models(cfg)
  sd = {k: v.detach().numpy() for k, v in vae.state_dict().items()}
  ae = build.build_first_stage(cfg.model.first_stage)
  ae_params = ae_convert.autoencoder_from_diffusers(sd, ae)
  lpips_params = lpips_convert.lpips_from_torch(
      {k.removeprefix("vgg."): v.numpy() for k, v in lpips.state_dict().items()
       if k.startswith("vgg.")},
      {f"lin{i}.model.1.weight": m.weight.detach().numpy() for i, m in enumerate(lpips.lins)})
  disc = ae_trainer.make_discriminator(cfg)
  x_np = np.random.RandomState(7).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  x = jnp.asarray(x_np)
  opt = optax.adam(lr, b1=0.5, b2=0.9)
  state = ae_trainer.init_state(ae, disc, opt, opt, x_np, jax.random.PRNGKey(0))
  params = {"autoencoder": jax.tree.map(jnp.asarray, ae_params)}
  state = state.replace(params=params, opt_state=opt.init(params))
  step = ae_trainer.make_step(ae, disc, cfg, opt, opt, use_lpips=True)
  comp = {"ldm_jax": bu.jax_compiled(step, state, {"image": x}, lpips_params,
                                     donate_argnums=(0,))}
  holder = {"state": state}

  def jax_fn():
    holder["state"], metrics = comp["ldm_jax"]["compiled"](holder["state"], {"image": x},
                                                           lpips_params)
    return metrics["loss"]
  fns = {}
  if "torch" in args.peers:
    opt_g = torch.optim.Adam(vae.parameters(), lr=lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc_t.parameters(), lr=lr, betas=(0.5, 0.9))
    tx = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2)))
    fns["torch"] = lambda: torch_step(vae, lpips, disc_t, opt_g, opt_d, tx, cfg.loss)
  fns["ldm_jax"] = jax_fn
  return measure(fns, args.repeats, compiled=comp, flops=comp["ldm_jax"]["flops"])

"""Stage-1 losses: closed forms, the adaptive weight as a ratio of separately computed gradient
norms, and the whole VQ loss against taming-transformers' own VQLPIPSWithDiscriminator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.lpips import lpips_fn
from ldm_jax.train import ae_losses

B, H, W, C, Z = 2, 8, 8, 3, 4


def _rng(seed):
  return np.random.default_rng(seed)


def _decoder_params(seed=0):
  r = _rng(seed)
  return dict(w1=jnp.asarray(r.normal(0, 0.5, (Z, 6)), jnp.float32),
              b1=jnp.asarray(r.normal(0, 0.1, (6,)), jnp.float32),
              last=jnp.asarray(r.normal(0, 0.3, (3, 3, 6, C)), jnp.float32),
              b2=jnp.asarray(r.normal(0, 0.1, (C,)), jnp.float32))


def _decode(params, z, last):
  """Tiny stand-in decoder: per-pixel dense + tanh, then the 'last layer', a 3x3 conv."""
  h = jnp.tanh(z @ params["w1"] + params["b1"])  # [B, H, W, 6]
  out = jax.lax.conv_general_dilated(h, last, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return out + params["b2"]  # [B, H, W, C]


def _disc(x):
  """Tiny stand-in discriminator: a nonlinear per-pixel patch logit."""
  v = jnp.asarray([0.7, -1.1, 0.4], jnp.float32)
  return jnp.tanh(x) @ v[:, None] + 0.2 * jnp.sum(x * x, -1, keepdims=True)  # [B, H, W, 1]


def _setup(seed=0):
  r = _rng(seed)
  params = _decoder_params(seed)
  z = jnp.asarray(r.normal(size=(B, H, W, Z)), jnp.float32)
  x = jnp.asarray(r.uniform(-1, 1, (B, H, W, C)), jnp.float32)
  return params, z, x


def _sq_perceptual(x, y):
  """Stand-in perceptual distance with a closed form: per-image mean squared error."""
  return jnp.mean(jnp.square(x - y), axis=(1, 2, 3))


def test_adopt_weight_before_and_after_disc_start():
  assert float(ae_losses.adopt_weight(0.75, 99, 100)) == 0.0
  assert float(ae_losses.adopt_weight(0.75, 100, 100)) == 0.75
  assert float(ae_losses.adopt_weight(0.75, 5000, 100)) == 0.75
  assert float(ae_losses.adopt_weight(0.75, 3, 100, value=0.25)) == 0.25
  steps = jnp.arange(98, 103)
  got = jax.jit(jax.vmap(lambda s: ae_losses.adopt_weight(2.0, s, 100)))(steps)
  np.testing.assert_array_equal(np.asarray(got), [0, 0, 2, 2, 2])


def test_gan_losses_closed_forms():
  r = _rng(1)
  real = r.normal(0, 1.5, (3, 5, 5, 1)).astype(np.float32)
  fake = r.normal(0, 1.5, (3, 5, 5, 1)).astype(np.float32)
  hinge = 0.5 * (np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake)))
  vanilla = 0.5 * (np.mean(np.log1p(np.exp(-real))) + np.mean(np.log1p(np.exp(fake))))
  np.testing.assert_allclose(float(ae_losses.hinge_d_loss(real, fake)), hinge, rtol=1e-6)
  np.testing.assert_allclose(float(ae_losses.vanilla_d_loss(real, fake)), vanilla, rtol=1e-6)
  np.testing.assert_allclose(float(ae_losses.generator_adv_loss(fake)), -fake.mean(), rtol=1e-6)
  # Far from the margin the hinge is exact zero; vanilla at 0 logits is log 2.
  assert float(ae_losses.hinge_d_loss(np.full(4, 3.0), np.full(4, -3.0))) == 0.0
  np.testing.assert_allclose(float(ae_losses.vanilla_d_loss(np.zeros(4), np.zeros(4))),
                             np.log(2), rtol=1e-6)
  losses = ae_losses.make_autoencoder_losses("kl", disc_start=10, disc_factor=0.5,
                                             disc_loss="vanilla")
  loss, m = losses.discriminator(real, fake, global_step=10)
  np.testing.assert_allclose(float(loss), 0.5 * vanilla, rtol=1e-6)
  np.testing.assert_allclose(float(m["logits_real"]), real.mean(), rtol=1e-5)
  assert float(losses.discriminator(real, fake, global_step=9)[0]) == 0.0


def test_adaptive_weight_is_the_ratio_of_separate_gradient_norms():
  params, z, x = _setup()
  logvar = 0.3

  def nll(last):  # the KL loss's nll, written out independently of the library
    rec = jnp.abs(x - _decode(params, z, last)) + 0.5 * _sq_perceptual(
        x, _decode(params, z, last))[:, None, None, None]
    return jnp.sum(rec / np.exp(logvar) + logvar) / B

  def g(last):
    return -jnp.mean(_disc(_decode(params, z, last)))

  grad_nll = jax.jit(jax.grad(nll))(params["last"])
  grad_g = jax.jit(jax.grad(g))(params["last"])
  n_nll, n_g = np.linalg.norm(np.asarray(grad_nll)), np.linalg.norm(np.asarray(grad_g))
  assert n_nll > 0 and n_g > 0
  want = 0.8 * min(n_nll / (n_g + 1e-4), 1e4)
  got = ae_losses.calculate_adaptive_weight(grad_nll, grad_g, 0.8)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # The helper for train steps: both gradients from one VJP.
  (v_nll, v_g), (h_nll, h_g) = jax.jit(lambda w: ae_losses.last_layer_grads(
      lambda u: (nll(u), g(u)), w))(params["last"])
  np.testing.assert_allclose(float(v_nll), float(nll(params["last"])), rtol=1e-6)
  np.testing.assert_allclose(float(v_g), float(g(params["last"])), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(h_nll), np.asarray(grad_nll), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(h_g), np.asarray(grad_g), rtol=1e-5, atol=1e-7)

  losses = ae_losses.make_autoencoder_losses("kl", disc_start=0, disc_weight=0.8,
                                             perceptual_weight=0.5)
  kl = jnp.ones((B,))
  gen = lambda last: losses.generator(x, lambda w: _decode(params, z, w), last,
                                      discriminator=_disc, global_step=1,
                                      perceptual=_sq_perceptual, kl=kl, logvar=logvar)
  (loss, m), grad = jax.jit(jax.value_and_grad(gen, has_aux=True))(params["last"])
  np.testing.assert_allclose(float(m["d_weight"]), want, rtol=1e-5)
  # d_weight is a constant for the optimiser: dL/dW = dnll/dW + d_weight * dg/dW.
  manual = grad_nll + want * grad_g
  np.testing.assert_allclose(np.asarray(grad), np.asarray(manual), rtol=1e-4, atol=1e-6)
  # The upper clip: a discriminator blind to the reconstruction has zero generator gradient.
  blind = lambda x_: jnp.zeros(x_.shape[:-1] + (1,)) + 0.5
  _, m_blind = losses.generator(x, lambda w: _decode(params, z, w), params["last"],
                                discriminator=blind, global_step=1, kl=kl)
  assert float(m_blind["d_weight"]) == pytest.approx(0.8 * 1e4)


@pytest.mark.parametrize("step", [3, 20])
def test_kl_total_matches_closed_form(step):
  params, z, x = _setup(2)
  r = _rng(3)
  mean, lv = r.normal(size=(B, 2, 2, 4)), r.normal(0, 0.5, (B, 2, 2, 4))
  kl = 0.5 * np.sum(mean ** 2 + np.exp(lv) - 1 - lv, axis=(1, 2, 3))  # [B]
  weights = r.uniform(0.5, 1.5, (B, H, W, C)).astype(np.float32)
  logvar, kl_w, pw, disc_factor = -0.4, 1e-3, 0.7, 0.6
  losses = ae_losses.make_autoencoder_losses("kl", disc_start=10, kl_weight=kl_w,
                                             disc_factor=disc_factor, perceptual_weight=pw)
  loss, m = losses.generator(x, lambda w: _decode(params, z, w), params["last"],
                             discriminator=_disc, global_step=step, perceptual=_sq_perceptual,
                             kl=jnp.asarray(kl), logvar=logvar, weights=weights)
  xn, yn = np.asarray(x, np.float64), np.asarray(_decode(params, z, params["last"]), np.float64)
  rec = np.abs(xn - yn) + pw * np.mean((xn - yn) ** 2, axis=(1, 2, 3))[:, None, None, None]
  nll = rec / np.exp(logvar) + logvar
  g = -np.mean(np.asarray(_disc(jnp.asarray(yn, jnp.float32)), np.float64))
  factor = disc_factor if step >= 10 else 0.0
  want = np.sum(weights * nll) / B + kl_w * np.sum(kl) / B + float(m["d_weight"]) * factor * g
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(m["total_loss"]), want, rtol=1e-5)
  np.testing.assert_allclose(float(m["nll_loss"]), np.sum(nll) / B, rtol=1e-5)
  np.testing.assert_allclose(float(m["rec_loss"]), rec.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m["kl_loss"]), kl.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m["g_loss"]), g, rtol=1e-5)
  assert float(m["disc_factor"]) == pytest.approx(factor) and float(m["d_weight"]) > 0
  assert float(m["logvar"]) == pytest.approx(logvar)
  assert set(m) == {"total_loss", "logvar", "kl_loss", "nll_loss", "rec_loss", "d_weight",
                    "disc_factor", "g_loss"}
  # disc_factor 0: CompVis does not compute the adaptive weight at all.
  off = ae_losses.make_autoencoder_losses("kl", disc_start=0, disc_factor=0.0)
  _, m_off = off.generator(x, lambda w: _decode(params, z, w), params["last"],
                           discriminator=_disc, global_step=step, kl=jnp.asarray(kl))
  assert float(m_off["d_weight"]) == 0.0


def test_vq_total_matches_closed_form():
  params, z, x = _setup(4)
  codebook = jnp.asarray([0.3, 0.5])
  losses = ae_losses.make_autoencoder_losses("vq", disc_start=0, codebook_weight=2.0,
                                             disc_weight=0.5, perceptual_weight=1.5)
  loss, m = losses.generator(x, lambda w: _decode(params, z, w), params["last"],
                             discriminator=_disc, global_step=0, perceptual=_sq_perceptual,
                             codebook_loss=codebook)
  xn, yn = np.asarray(x, np.float64), np.asarray(_decode(params, z, params["last"]), np.float64)
  p = np.mean((xn - yn) ** 2, axis=(1, 2, 3))
  rec = np.abs(xn - yn) + 1.5 * p[:, None, None, None]
  g = -np.mean(np.asarray(_disc(jnp.asarray(yn, jnp.float32)), np.float64))
  want = rec.mean() + float(m["d_weight"]) * g + 2.0 * 0.4
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(m["p_loss"]), p.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m["quant_loss"]), 0.4, rtol=1e-6)
  assert {"quant_loss", "p_loss", "nll_loss", "rec_loss", "d_weight", "g_loss"} <= set(m)



def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="kind='gan'"):
    ae_losses.make_autoencoder_losses("gan")
  with pytest.raises(ValueError, match="disc_loss='wgan'"):
    ae_losses.make_autoencoder_losses("kl", disc_loss="wgan")
  params, z, x = _setup()
  with pytest.raises(ValueError, match="needs kl="):
    ae_losses.make_autoencoder_losses("kl").generator(
        x, lambda w: _decode(params, z, w), params["last"], discriminator=_disc, global_step=0)
  tree = {"decoder": {"conv_out": {"kernel": 1, "bias": 2}}}
  new = ae_losses.replace_leaf(tree, ("decoder", "conv_out", "kernel"), 5)
  assert new["decoder"]["conv_out"] == {"kernel": 5, "bias": 2}
  assert tree["decoder"]["conv_out"]["kernel"] == 1  # the input is not modified
  with pytest.raises(KeyError, match="'conv'"):
    ae_losses.replace_leaf(tree, ("decoder", "conv", "kernel"), 5)


def _stub_torchvision(torch):
  """A `torchvision.models` whose vgg16() has the standard VGG16 `features` with random weights
  (PyPI torchvision does not load beside this torch build)."""
  import importlib.machinery
  import types
  nn = torch.nn

  def vgg16(pretrained=False, weights=None, **unused):
    layers, cin = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"):
      if v == "M":
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
      else:
        layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
        cin = v
    return types.SimpleNamespace(features=nn.Sequential(*layers))

  tv, models = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")
  for m in (tv, models):
    m.__spec__ = importlib.machinery.ModuleSpec(m.__name__, None)
  models.vgg16, tv.models = vgg16, models
  return {"torchvision": tv, "torchvision.models": models}


def test_vq_loss_matches_taming(monkeypatch):
  """taming's VQLPIPSWithDiscriminator (its own LPIPS, NLayerDiscriminator and torch autograd for
  the adaptive weight) against make_autoencoder_losses('vq') with our LPIPS and discriminator.
  Also: LPIPS of identical images is 0, and taming's GAN losses on the same logits."""
  disc_loss = "hinge"
  torch = pytest.importorskip("torch")
  pytest.importorskip("taming", reason="pip install --no-deps taming-transformers")
  import sys
  from ldm_jax.convert.lpips import lpips_from_torch
  from ldm_jax.models.discriminator import NLayerDiscriminator
  for name, module in _stub_torchvision(torch).items():
    monkeypatch.setitem(sys.modules, name, module)
  monkeypatch.delitem(sys.modules, "taming.modules.losses.lpips", raising=False)
  monkeypatch.delitem(sys.modules, "taming.modules.losses.vqperceptual", raising=False)
  from taming.modules.losses import lpips as taming_lpips
  from taming.modules.losses import vqperceptual
  monkeypatch.setattr(taming_lpips.LPIPS, "load_from_pretrained", lambda self, name=None: None)

  torch.manual_seed(0)
  ref = vqperceptual.VQLPIPSWithDiscriminator(
      disc_start=3, codebook_weight=1.3, disc_weight=0.7, perceptual_weight=0.9, disc_ndf=8,
      disc_factor=0.8, disc_loss=disc_loss)
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if name.startswith("perceptual_loss.lin"):
        p.copy_(torch.rand_like(p) + 0.1)
      elif p.ndim == 4:
        fan_in = p.shape[1] * p.shape[2] * p.shape[3]
        p.normal_(0.0, (2.0 / fan_in) ** 0.5)
      elif name.endswith("weight"):
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, 0.2)
  ref.train()
  ref.perceptual_loss.eval()  # dropout off on both sides for a deterministic comparison

  r = _rng(7)
  x_np = r.uniform(-1, 1, (B, 3, 24, 24)).astype(np.float32)
  h_np = r.normal(size=(B, 6, 24, 24)).astype(np.float32)  # decoder features before conv_out
  last = torch.nn.Parameter(torch.from_numpy(r.normal(0, 0.2, (3, 6, 3, 3)).astype(np.float32)))
  bias = torch.from_numpy(r.normal(0, 0.1, (3,)).astype(np.float32))
  recon_t = torch.tanh(torch.nn.functional.conv2d(torch.from_numpy(h_np), last, bias, padding=1))
  codebook = torch.tensor(0.37)
  sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}  # before BN updates
  loss_t, log = ref(codebook, torch.from_numpy(x_np), recon_t, 0, global_step=5, last_layer=last)
  d_loss_t, dlog = ref(codebook, torch.from_numpy(x_np), recon_t.detach(), 1, global_step=5)

  lp = lpips_from_torch({k.split(".", 3)[3]: v for k, v in sd.items()
                         if k.startswith("perceptual_loss.net.")},
                        {k[len("perceptual_loss."):]: v for k, v in sd.items()
                         if k.startswith("perceptual_loss.lin")})
  disc_params, disc_stats = {}, {}
  for k, v in sd.items():
    if not k.startswith("discriminator.main."):
      continue
    _, _, index, field = k.split(".")
    name = f"main_{index}"
    if v.ndim == 4:
      disc_params.setdefault(name, {})["kernel"] = v.transpose(2, 3, 1, 0)
    elif field == "running_mean" or field == "running_var":
      disc_stats.setdefault(name, {})["mean" if field == "running_mean" else "var"] = v
    elif field in ("weight", "bias"):
      is_conv = isinstance(ref.discriminator.main[int(index)], torch.nn.Conv2d)
      key = "bias" if field == "bias" else ("kernel" if is_conv else "scale")
      disc_params.setdefault(name, {})[key] = v
  disc = NLayerDiscriminator(ndf=8)
  disc_vars = {"params": disc_params, "batch_stats": disc_stats}
  apply_disc = lambda img: disc.apply(disc_vars, img, train=True, mutable=["batch_stats"])[0]

  losses = ae_losses.make_autoencoder_losses("vq", disc_start=3, codebook_weight=1.3,
                                             disc_weight=0.7, perceptual_weight=0.9,
                                             disc_factor=0.8, disc_loss=disc_loss)
  x = jnp.asarray(x_np.transpose(0, 2, 3, 1))
  h = jnp.asarray(h_np.transpose(0, 2, 3, 1))

  def reconstruct(w):  # w: [3, 3, 6, 3] HWIO
    out = jax.lax.conv_general_dilated(h, w, (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.tanh(out + jnp.asarray(bias.numpy()))

  w0 = jnp.asarray(last.detach().numpy().transpose(2, 3, 1, 0))

  @jax.jit
  def run(x, w):
    loss, m = losses.generator(x, reconstruct, w, discriminator=apply_disc, global_step=5,
                               perceptual=lpips_fn(lp), codebook_loss=0.37)
    recon = jax.lax.stop_gradient(reconstruct(w))
    d_loss, dm = losses.discriminator(apply_disc(x), apply_disc(recon), global_step=5)
    return loss, m, d_loss, dm

  loss, m, d_loss, dm = run(x, w0)
  assert float(log["train/d_weight"]) > 1e-3 and float(log["train/p_loss"]) > 1e-3
  np.testing.assert_allclose(float(loss), float(loss_t.detach()), rtol=1e-4)
  for name in ("total_loss", "quant_loss", "nll_loss", "rec_loss", "p_loss", "d_weight",
               "disc_factor", "g_loss"):
    np.testing.assert_allclose(float(m[name]), float(log[f"train/{name}"]), rtol=1e-4,
                               atol=1e-6, err_msg=name)
  np.testing.assert_allclose(float(d_loss), float(d_loss_t.detach()), rtol=1e-4)
  for name in ("disc_loss", "logits_real", "logits_fake"):
    np.testing.assert_allclose(float(dm[name]), float(dlog[f"train/{name}"]), rtol=1e-4,
                               atol=1e-6, err_msg=name)
  # A perfect reconstruction: L1 and LPIPS are both 0 (same compiled function).
  _, m_same, _, _ = run(reconstruct(w0), w0)
  # Zero up to float rounding (compiled convs may round batch rows differently).
  assert float(m_same["rec_loss"]) < 1e-6 and float(m_same["p_loss"]) < 1e-6
  # taming's own GAN losses on shared logits.
  real, fake = r.normal(0, 2, (2, 1, 3, 3)), r.normal(0, 2, (2, 1, 3, 3))
  for ours, theirs in ((ae_losses.hinge_d_loss, vqperceptual.hinge_d_loss),
                       (ae_losses.vanilla_d_loss, vqperceptual.vanilla_d_loss)):
    want = float(theirs(torch.from_numpy(real), torch.from_numpy(fake)))
    np.testing.assert_allclose(float(ours(real.transpose(0, 2, 3, 1), fake.transpose(0, 2, 3, 1))),
                               want, rtol=1e-5)

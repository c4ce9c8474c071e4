"""Stage-1 (autoencoder) losses of CompVis ldm / taming, as pure functions.

`LPIPSWithDiscriminator` (KL autoencoders, ldm/modules/losses/contperceptual.py) and
`VQLPIPSWithDiscriminator` (VQ, taming/modules/losses/vqperceptual.py), term by term:

  rec   = |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)       # [B, H, W, C], LPIPS broadcast
  KL:  nll = sum(rec / exp(logvar) + logvar) / B                   # a per-image SUM over pixels
       loss = weighted_nll + kl_weight * sum(kl) / B + d_weight * disc_factor * g_loss
  VQ:  nll = mean(rec)                                             # a MEAN over pixels
       loss = nll + d_weight * disc_factor * g_loss + codebook_weight * mean(codebook_loss)
  g_loss   = -mean(D(x_rec))
  d_weight = disc_weight * clip(||dnll/dW|| / (||dg/dW|| + 1e-4), 0, 1e4), no gradient, with W the
             decoder's last conv kernel
  disc_factor = adopt_weight(disc_factor, step, disc_start): 0 before disc_start
  D side:  disc_factor * hinge or vanilla loss of D(x) and D(x_rec) (both detached)

Note on `logvar`: CompVis keeps it as a parameter of the loss module, but `AutoencoderKL`'s
optimizer only receives the encoder, decoder and quant convs, so in the released models it stays
at its initial 0. Here it is an argument: the caller decides whether it is trained.

CompVis's `pixelloss_weight` is stored but never used, so it has no counterpart here.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
Metrics = dict[str, Array]
ADAPTIVE_EPS = 1e-4
ADAPTIVE_MAX = 1e4


def adopt_weight(weight, global_step, threshold, value=0.0) -> Array:
  """`weight` from step `threshold` on, `value` before it (jit-safe: step may be traced)."""
  return jnp.where(jnp.asarray(global_step) < threshold, value, weight).astype(jnp.float32)


def hinge_d_loss(logits_real: Array, logits_fake: Array) -> Array:
  """0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec))))."""
  loss_real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
  loss_fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
  return 0.5 * (loss_real + loss_fake)


def vanilla_d_loss(logits_real: Array, logits_fake: Array) -> Array:
  """0.5 * (mean(softplus(-D(x))) + mean(softplus(D(x_rec)))): the non-saturating GAN loss."""
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real.astype(jnp.float32))) +
                jnp.mean(jax.nn.softplus(logits_fake.astype(jnp.float32))))


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def generator_adv_loss(logits_fake: Array) -> Array:
  """-mean(D(x_rec)), the generator's adversarial term for both GAN losses."""
  return -jnp.mean(logits_fake.astype(jnp.float32))


def _l2_norm(tree) -> Array:
  """Frobenius norm over all leaves (torch.norm of the one kernel in the usual case)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree_util.tree_leaves(tree)))


def calculate_adaptive_weight(nll_grads, g_grads, disc_weight) -> Array:
  """disc_weight * clip(||nll_grads|| / (||g_grads|| + 1e-4), 0, 1e4), gradient stopped.

  Args:
    nll_grads, g_grads: gradients of the nll and of the generator loss w.r.t. the decoder's
      last layer (arrays or pytrees of arrays).
  """
  ratio = _l2_norm(nll_grads) / (_l2_norm(g_grads) + ADAPTIVE_EPS)
  return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, ADAPTIVE_MAX)) * disc_weight


def last_layer_grads(fn: Callable, last_layer, has_aux: bool = False):
  """Both gradients the adaptive weight needs from one forward pass.

  Args:
    fn: last_layer -> (nll_loss, g_loss) [, aux]: the two scalar losses as functions of the
      decoder's last layer, e.g. the decoder applied with that kernel swapped in (see
      `replace_leaf`), or only the last conv applied to cached decoder features.
    last_layer: the current value of that layer (array or pytree).
  Returns:
    ((nll_loss, g_loss), (nll_grads, g_grads)), plus aux when has_aux. The losses stay
    differentiable w.r.t. anything `fn` closes over.
  """
  if has_aux:
    (nll, g), vjp_fn, aux = jax.vjp(fn, last_layer, has_aux=True)
  else:
    (nll, g), vjp_fn = jax.vjp(fn, last_layer)
  nll_grads, = vjp_fn((jnp.ones_like(nll), jnp.zeros_like(g)))
  g_grads, = vjp_fn((jnp.zeros_like(nll), jnp.ones_like(g)))
  out = ((nll, g), (nll_grads, g_grads))
  return out + (aux,) if has_aux else out


def replace_leaf(tree: dict, path: tuple[str, ...], value) -> dict:
  """A copy of nested dict `tree` with tree[path[0]]...[path[-1]] set to `value`."""
  if not path:
    return value
  if path[0] not in tree:
    raise KeyError(f"replace_leaf: key {path[0]!r} not in the tree (keys {sorted(tree)}).")
  return {**tree, path[0]: replace_leaf(tree[path[0]], path[1:], value)}


def get_leaf(tree: dict, path: tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


def reconstruction_loss(inputs: Array, reconstructions: Array,
                        perceptual: Callable[[Array, Array], Array] | None = None,
                        perceptual_weight: float = 1.0) -> tuple[Array, Array]:
  """|x - x_rec| + perceptual_weight * LPIPS(x, x_rec) broadcast over pixels.

  Returns:
    rec [B, H, W, C] and the perceptual distance p [B] (zeros without a perceptual metric).
  """
  x = inputs.astype(jnp.float32)
  y = reconstructions.astype(jnp.float32)
  rec = jnp.abs(x - y)  # [B, H, W, C]
  if perceptual is not None and perceptual_weight > 0:
    p = perceptual(x, y).reshape(x.shape[0]).astype(jnp.float32)  # [B]
    rec = rec + perceptual_weight * p[:, None, None, None]
  else:
    p = jnp.zeros((x.shape[0],), jnp.float32)
  return rec, p


class AutoencoderLosses(NamedTuple):
  """generator(...) -> (loss, metrics); discriminator(...) -> (loss, metrics)."""
  generator: Callable[..., tuple[Array, Metrics]]
  discriminator: Callable[..., tuple[Array, Metrics]]


def make_autoencoder_losses(kind: str = "kl", disc_start: int = 0, kl_weight: float = 1.0,
                            codebook_weight: float = 1.0, disc_weight: float = 1.0,
                            disc_factor: float = 1.0, perceptual_weight: float = 1.0,
                            disc_loss: str = "hinge") -> AutoencoderLosses:
  """The two sides of LPIPSWithDiscriminator ('kl') or VQLPIPSWithDiscriminator ('vq').

  generator(inputs, reconstruct, last_layer, *, discriminator, global_step, perceptual=None,
            kl=None, codebook_loss=None, logvar=0.0, weights=None, compute_d_weight=True)
    inputs: [B, H, W, C] images in [-1, 1].
    reconstruct: last_layer -> reconstructions [B, H, W, C]; called once, inside a VJP that is
      pulled back twice for the adaptive weight, so it should recompute as little as possible
      (e.g. only the last conv on cached decoder features).
    last_layer: the decoder's current last-layer kernel.
    discriminator: images -> patch logits (apply the discriminator in train mode, as CompVis's
      generator pass does).
    perceptual: (x, x_rec) -> [B] frozen LPIPS (e.g. `ldm_jax.models.lpips.lpips_fn`).
    kl: per-image KL [B] (posterior.kl()), for 'kl'. codebook_loss: scalar or array, for 'vq'.
    logvar: scalar, 'kl' only. weights: optional per-pixel weights of the nll, 'kl' only.
    compute_d_weight: False gives d_weight 0, as CompVis's validation pass (no autograd) does.
  discriminator(logits_real, logits_fake, *, global_step)
    logits of the discriminator run separately on the inputs and the detached reconstructions
    (two calls: BatchNorm statistics are per call in CompVis).
  """
  if kind not in ("kl", "vq"):
    raise ValueError(f"make_autoencoder_losses: kind={kind!r}; expected 'kl' or 'vq'.")
  if disc_loss not in D_LOSSES:
    raise ValueError(f"make_autoencoder_losses: disc_loss={disc_loss!r}; expected one of "
                     f"{sorted(D_LOSSES)}.")
  d_loss_fn = D_LOSSES[disc_loss]

  def generator(inputs, reconstruct, last_layer, *, discriminator, global_step, perceptual=None,
                kl=None, codebook_loss=None, logvar=0.0, weights=None, compute_d_weight=True):
    if kind == "kl" and kl is None:
      raise ValueError("generator: kind='kl' needs kl=posterior.kl() ([B] per image).")
    if kind == "vq" and codebook_loss is None:
      raise ValueError("generator: kind='vq' needs codebook_loss (the quantizer's loss).")
    batch = inputs.shape[0]
    logvar = jnp.asarray(logvar, jnp.float32)

    def nll_terms(recon):
      rec, p = reconstruction_loss(inputs, recon, perceptual, perceptual_weight)
      if kind == "kl":
        nll = rec / jnp.exp(logvar) + logvar  # [B, H, W, C]
        nll_loss = jnp.sum(nll) / batch
        weighted = nll_loss if weights is None else jnp.sum(weights * nll) / batch
      else:
        nll_loss = weighted = jnp.mean(rec)
      return nll_loss, dict(rec_loss=jnp.mean(rec), p_loss=jnp.mean(p), weighted_nll=weighted)

    def g_term(recon):
      return generator_adv_loss(discriminator(recon))

    # CompVis KL skips the adaptive weight when disc_factor is 0; VQ always computes it.
    if compute_d_weight and (kind == "vq" or disc_factor > 0):
      # Chain rule split at the reconstruction: LPIPS and the discriminator each run forward and
      # backward once; only the `reconstruct` part is pulled back twice. (A VJP of the whole
      # thing with cotangents (1, 0) and (0, 1) would run the VGG backward twice.)
      recon, pullback = jax.vjp(reconstruct, last_layer)
      (nll_loss, aux), d_nll = jax.value_and_grad(nll_terms, has_aux=True)(recon)
      g_loss, d_g = jax.value_and_grad(g_term)(recon)
      d_weight = calculate_adaptive_weight(pullback(d_nll)[0], pullback(d_g)[0], disc_weight)
    else:
      recon = reconstruct(last_layer)
      nll_loss, aux = nll_terms(recon)
      g_loss = g_term(recon)
      d_weight = jnp.zeros((), jnp.float32)
    factor = adopt_weight(disc_factor, global_step, disc_start)
    metrics = dict(nll_loss=nll_loss, rec_loss=aux["rec_loss"], d_weight=d_weight,
                   disc_factor=factor, g_loss=g_loss)
    if kind == "kl":
      kl_loss = jnp.sum(kl.astype(jnp.float32)) / batch
      loss = aux["weighted_nll"] + kl_weight * kl_loss + d_weight * factor * g_loss
      metrics.update(logvar=logvar, kl_loss=kl_loss)
    else:
      quant = jnp.mean(jnp.asarray(codebook_loss, jnp.float32))
      loss = nll_loss + d_weight * factor * g_loss + codebook_weight * quant
      metrics.update(quant_loss=quant, p_loss=aux["p_loss"])
    metrics["total_loss"] = loss
    return loss, jax.lax.stop_gradient(metrics)

  def discriminator(logits_real, logits_fake, *, global_step):
    factor = adopt_weight(disc_factor, global_step, disc_start)
    loss = factor * d_loss_fn(logits_real, logits_fake)
    metrics = dict(disc_loss=loss, logits_real=jnp.mean(logits_real.astype(jnp.float32)),
                   logits_fake=jnp.mean(logits_fake.astype(jnp.float32)))
    return loss, jax.lax.stop_gradient(metrics)

  return AutoencoderLosses(generator, discriminator)

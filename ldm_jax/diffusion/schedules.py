"""Noise schedules of the CompVis latent-diffusion code, derived in float64 and stored in float32.

`make_betas` reproduces `ldm.modules.diffusionmodules.util.make_beta_schedule`; `Schedule` holds the
arrays that `ldm.models.diffusion.ddpm.DDPM.register_schedule` registers as buffers. Everything is
computed in float64 numpy first (as the original does) and only the finished arrays are cast to
fp32, so alphas_cumprod[999] of the SD schedule (linear 0.00085 -> 0.012) is 0.004660 to 6 digits.
"""

import flax.struct
import jax.numpy as jnp
import numpy as np

BETA_KINDS = ('linear', 'sqrt_linear', 'sqrt', 'cosine')


def make_betas(kind: str, num_timesteps: int = 1000, linear_start: float = 1e-4,
               linear_end: float = 2e-2, cosine_s: float = 8e-3) -> np.ndarray:
  """Returns the float64 betas [T] of a named schedule.

  'linear' is the paper's (and SD's) linspace(sqrt(start), sqrt(end))^2 - diffusers calls it
  'scaled_linear'; 'sqrt_linear' is a plain linspace(start, end); 'sqrt' its square root; 'cosine'
  is Nichol & Dhariwal's with offset `cosine_s`, betas clipped at 0.999.
  """
  if num_timesteps < 1:
    raise ValueError(f'num_timesteps={num_timesteps!r}: expected a positive integer')
  if kind == 'linear':
    betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, num_timesteps,
                        dtype=np.float64) ** 2
  elif kind == 'sqrt_linear':
    betas = np.linspace(linear_start, linear_end, num_timesteps, dtype=np.float64)
  elif kind == 'sqrt':
    betas = np.linspace(linear_start, linear_end, num_timesteps, dtype=np.float64) ** 0.5
  elif kind == 'cosine':
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps + cosine_s  # [T+1]
    alphas_bar = np.cos(steps / (1 + cosine_s) * np.pi / 2) ** 2
    alphas_bar = alphas_bar / alphas_bar[0]
    betas = np.clip(1 - alphas_bar[1:] / alphas_bar[:-1], 0.0, 0.999)
  else:
    raise ValueError(f'schedule kind={kind!r}: expected one of {BETA_KINDS}')
  return betas


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Lin et al. 2023, Alg. 1: shifts and scales sqrt(alphas_cumprod) so the last one is exactly 0.

  The first value is kept, so the low-noise end of the schedule is unchanged. Returns float64 betas
  whose last entry is 1 (alphas_cumprod[-1] == 0): such schedules need 'v' or 'x0' models, since an
  eps prediction carries no information about x0 at zero SNR.
  """
  betas = np.asarray(betas, dtype=np.float64)
  sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))  # [T]
  first, last = sqrt_ab[0], sqrt_ab[-1]
  sqrt_ab = (sqrt_ab - last) * first / (first - last)
  alphas_bar = sqrt_ab ** 2
  alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
  return 1.0 - alphas


def _f32(x: np.ndarray) -> jnp.ndarray:
  return jnp.asarray(np.asarray(x, dtype=np.float32))


@flax.struct.dataclass
class Schedule:
  """Per-timestep arrays [T] of a discrete DDPM schedule (fp32, derived in float64).

  A pytree: pass it to jitted functions as an argument, so changing schedules does not recompile.
  `num_timesteps` is static metadata.
  """
  betas: jnp.ndarray
  alphas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  alphas_cumprod_prev: jnp.ndarray
  sqrt_alphas_cumprod: jnp.ndarray
  sqrt_one_minus_alphas_cumprod: jnp.ndarray
  log_one_minus_alphas_cumprod: jnp.ndarray
  sqrt_recip_alphas_cumprod: jnp.ndarray
  sqrt_recipm1_alphas_cumprod: jnp.ndarray
  posterior_variance: jnp.ndarray
  posterior_log_variance_clipped: jnp.ndarray
  posterior_mean_coef1: jnp.ndarray
  posterior_mean_coef2: jnp.ndarray
  num_timesteps: int = flax.struct.field(pytree_node=False, default=1000)

  @classmethod
  def from_betas(cls, betas: np.ndarray, v_posterior: float = 0.0) -> 'Schedule':
    """Derives every array from float64 betas like `DDPM.register_schedule`.

    v_posterior mixes the posterior variance towards beta_t (0 = the true posterior, the default).
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
      raise ValueError(f'betas: expected a 1-D array with values in (0, 1], got shape '
                       f'{betas.shape}, range [{betas.min()}, {betas.max()}]')
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)  # [T]
    ac_prev = np.append(1.0, ac[:-1])
    # A zero-terminal-SNR schedule has ac[-1] == 0: 1/ac is inf there, which is the honest value.
    with np.errstate(divide='ignore'):
      recip = 1.0 / ac
      post_var = ((1 - v_posterior) * betas * (1.0 - ac_prev) / (1.0 - ac)
                  + v_posterior * betas)
      # posterior_variance[0] is 0: clip before the log, as the original does.
      post_logvar = np.log(np.maximum(post_var, 1e-20))
      log_1m = np.log(1.0 - ac)
    return cls(
        betas=_f32(betas), alphas=_f32(alphas), alphas_cumprod=_f32(ac),
        alphas_cumprod_prev=_f32(ac_prev), sqrt_alphas_cumprod=_f32(np.sqrt(ac)),
        sqrt_one_minus_alphas_cumprod=_f32(np.sqrt(1.0 - ac)),
        log_one_minus_alphas_cumprod=_f32(log_1m),
        sqrt_recip_alphas_cumprod=_f32(np.sqrt(recip)),
        sqrt_recipm1_alphas_cumprod=_f32(np.sqrt(recip - 1)),
        posterior_variance=_f32(post_var),
        posterior_log_variance_clipped=_f32(post_logvar),
        posterior_mean_coef1=_f32(betas * np.sqrt(ac_prev) / (1.0 - ac)),
        posterior_mean_coef2=_f32((1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)),
        num_timesteps=int(betas.shape[0]))

  @classmethod
  def create(cls, kind: str = 'linear', num_timesteps: int = 1000, linear_start: float = 1e-4,
             linear_end: float = 2e-2, cosine_s: float = 8e-3, zero_terminal_snr: bool = False,
             v_posterior: float = 0.0) -> 'Schedule':
    """`Schedule.create('linear', 1000, 0.00085, 0.012)` is Stable Diffusion's schedule."""
    betas = make_betas(kind, num_timesteps, linear_start, linear_end, cosine_s)
    if zero_terminal_snr:
      betas = rescale_zero_terminal_snr(betas)
    return cls.from_betas(betas, v_posterior=v_posterior)

  def snr(self) -> jnp.ndarray:
    """Signal-to-noise ratio alphas_cumprod / (1 - alphas_cumprod) [T], fp32."""
    return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

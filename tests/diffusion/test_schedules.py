"""Schedules against closed forms, the numerics file, and diffusers' tables."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as hf_rescale

from ldm_jax.diffusion.schedules import Schedule, make_betas, rescale_zero_terminal_snr


def test_sd_linear_schedule_values():
  s = Schedule.create('linear', 1000, 0.00085, 0.012)
  ac = np.asarray(s.alphas_cumprod)
  assert ac.dtype == np.float32 and ac.shape == (1000,)
  assert round(float(ac[999]), 6) == 0.004660  # the numerics file's value
  np.testing.assert_allclose(ac[0], 1 - 0.00085, rtol=1e-7)
  # 'linear' is linspace of the square roots, squared (closed form at an interior point).
  t = 437
  beta = (math.sqrt(0.00085) + t / 999 * (math.sqrt(0.012) - math.sqrt(0.00085))) ** 2
  np.testing.assert_allclose(float(s.betas[t]), beta, rtol=1e-6)
  np.testing.assert_allclose(ac[t], np.prod([1 - (math.sqrt(0.00085) + i / 999 * (
      math.sqrt(0.012) - math.sqrt(0.00085))) ** 2 for i in range(t + 1)]), rtol=1e-6)


def test_derived_arrays_closed_forms():
  s = Schedule.create('linear', 1000, 0.0015, 0.0195)
  b = make_betas('linear', 1000, 0.0015, 0.0195)
  ac = np.cumprod(1 - b)
  acp = np.append(1.0, ac[:-1])
  close = lambda x, y: np.testing.assert_allclose(np.asarray(x), y, rtol=2e-6, atol=1e-30)
  close(s.alphas_cumprod_prev, acp)
  close(s.sqrt_alphas_cumprod, np.sqrt(ac))
  close(s.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - ac))
  close(s.sqrt_recipm1_alphas_cumprod, np.sqrt(1 / ac - 1))
  pv = b * (1 - acp) / (1 - ac)
  close(s.posterior_variance, pv)
  assert float(s.posterior_variance[0]) == 0.0
  close(s.posterior_log_variance_clipped, np.log(np.maximum(pv, 1e-20)))
  close(s.posterior_mean_coef1, b * np.sqrt(acp) / (1 - ac))
  close(s.posterior_mean_coef2, (1 - acp) * np.sqrt(1 - b) / (1 - ac))
  # With eps = 0, i.e. x_t = sqrt(ac_t) x0, the posterior mean must be sqrt(ac_{t-1}) x0.
  t = 300
  x0 = 0.7
  mean = float(s.posterior_mean_coef1[t]) * x0 + float(s.posterior_mean_coef2[t]) * math.sqrt(
      ac[t]) * x0
  np.testing.assert_allclose(mean, math.sqrt(acp[t]) * x0, rtol=1e-5)


def test_other_kinds():
  np.testing.assert_allclose(make_betas('sqrt_linear', 10, 1e-4, 2e-2), np.linspace(1e-4, 2e-2, 10))
  np.testing.assert_allclose(make_betas('sqrt', 10, 1e-4, 2e-2),
                             np.sqrt(np.linspace(1e-4, 2e-2, 10)))
  # Cosine: alpha_bar(t) = f(t)/f(0), f(t) = cos((t/T + s)/(1 + s) * pi/2)^2, betas clip at 0.999.
  T, s = 1000, 8e-3
  f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
  betas = make_betas('cosine', T, cosine_s=s)
  for t in (0, 1, 500, 998):
    np.testing.assert_allclose(betas[t], min(1 - f(t + 1) / f(t), 0.999), rtol=1e-10)
  assert betas[-1] == 0.999
  ac = np.cumprod(1 - betas)
  np.testing.assert_allclose(ac[499], f(500) / f(0), rtol=1e-10)
  with pytest.raises(ValueError, match="kind='quadratic'"):
    make_betas('quadratic')


def test_table_matches_diffusers():
  """diffusers' float32 table for SD ('scaled_linear') agrees with ours to float32 rounding."""
  ours = np.asarray(Schedule.create('linear', 1000, 0.00085, 0.012).alphas_cumprod)
  ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear')
  np.testing.assert_allclose(ours, ref.alphas_cumprod.numpy(), rtol=2e-5)


def test_zero_terminal_snr():
  b = make_betas('linear', 1000, 0.00085, 0.012)
  rb = rescale_zero_terminal_snr(b)
  s = Schedule.from_betas(rb)
  assert float(s.alphas_cumprod[-1]) == 0.0
  assert np.isinf(float(s.sqrt_recip_alphas_cumprod[-1]))
  # The first alpha_bar is kept.
  np.testing.assert_allclose(np.cumprod(1 - rb)[0], np.cumprod(1 - b)[0], rtol=1e-12)
  ref = hf_rescale(torch.from_numpy(b)).numpy()  # float64 in, float64 out
  np.testing.assert_allclose(rb, ref, rtol=1e-10, atol=1e-14)
  np.testing.assert_array_equal(
      np.asarray(Schedule.create('linear', 1000, 0.00085, 0.012, zero_terminal_snr=True).betas),
      np.asarray(s.betas))

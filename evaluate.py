"""Evaluates samples and models with the paper's metrics (FID, IS, precision/recall, PSNR, SSIM,
LPIPS, rFID). See ldm_jax/cli/evaluate.py for the modes and examples:

  python evaluate.py samples --checkpoint workdirs/shapes_ldm --num_samples 1000 \
      --inception fid_inception.npz --reference data/shapes_val --out results/ldm.json
"""

import sys

from ldm_jax.cli.evaluate import main

if __name__ == "__main__":
  sys.exit(main())

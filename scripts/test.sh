#!/usr/bin/env bash
# Installs the test requirements into ./.venv (created if missing) and runs the test suite.
#   bash scripts/test.sh            # whole suite
#   bash scripts/test.sh tests/models -k unet   # any pytest arguments
#   TEST_WORKERS=0 bash scripts/test.sh ...      # no worker processes (pytest-xdist's -n 0)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements-test.txt
# CLIP's BPE vocabulary ships inside open-clip-torch, whose dependencies (torchvision) do not install
# beside the CPU torch build: take the package alone, for its data files.
python -m pip install -q --no-deps open-clip-torch==3.3.0
# Independent references whose own dependency lists pull torchvision: the packages alone suffice
# (lpips: the LPIPS heads and logic; taming-transformers: PatchGAN and VQ losses).
python -m pip install -q --no-deps lpips==0.1.4 taming-transformers==0.0.1
# The original CompVis `ldm` package (pure-torch modules only): the reference for CompVis key layouts.
python -m pip install -q --no-deps stable-diffusion-sdkit==2.1.5
# OpenAI's guided_diffusion (pure torch): the reference EncoderUNetModel of the noisy-latent classifier.
python -m pip install -q --no-deps guided-diffusion-sdk==1.0.0
# pytorch-fid (the FID Inception reference) needs torchvision, which must stay out of site-packages
# (transformers and diffusers would import it): both go to .venv/fid-refs, which tests/eval adds.
[ -d .venv/fid-refs/pytorch_fid ] ||
  python -m pip install -q --no-deps --target .venv/fid-refs torchvision==0.28.0 pytorch-fid==0.3.0
export JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Two workers (one per core here) with whole files kept together, so module fixtures are built once;
# TEST_WORKERS=0 runs everything in this process.
python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile "$@"

#!/usr/bin/env bash
# Installs the test requirements into ./.venv (created if missing) and runs the test suite.
#   bash scripts/test.sh            # whole suite
#   bash scripts/test.sh tests/models -k unet   # any pytest arguments
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
export JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pytest -q "$@"

#!/usr/bin/env bash
# The quickstart: installs ldm_jax into ./.venv, trains the shapes autoencoder and a text-conditional
# shapes LDM on the CPU, samples a grid for 16 prompts and grades it with the shapes detector.
# Re-running resumes or skips finished work. About 9 minutes on 2 idle CPU cores, installs
# included (measured: see README, Measured results).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements.txt
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}

python train.py --config configs/shapes_autoencoder.py --workdir workdirs/shapes_ae
python train.py --config configs/shapes_ldm_text.py --workdir workdirs/shapes_ldm \
    --config.first_stage_checkpoint=workdirs/shapes_ae
# No sampler flags: the model's own recommended settings (saved in its config) are what a user
# gets from `python sample.py --checkpoint workdirs/shapes_ldm --prompt "..."` too.
python sample.py --checkpoint workdirs/shapes_ldm --prompt_file configs/shapes_prompts.txt \
    --batch_size 16 --outdir outputs/quickstart
echo "Sample grid: outputs/quickstart/grid.png"
# Last line: this run's match rates beside the range the README reports.
python -m ldm_jax.evaluate_shapes outputs/quickstart --quickstart

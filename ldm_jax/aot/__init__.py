"""Ahead-of-time compilation for TPU topologies, from a machine without a TPU.

    python -m ldm_jax.aot --config configs/sd_v1_finetune.py --topology v5e:2x4 [--sample]

libtpu's compiler builds the real train step of a config (the trainer's own step, state, shardings,
donation and dtypes; `programs`) for the devices of a named topology, from abstract shapes only, and
`report` turns XLA's memory and cost analyses into per-chip figures: does it fit the chip's HBM,
how long would a step take, at what MFU.
"""

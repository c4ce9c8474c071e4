"""The command lines' floor: argument parsing, checks of what the user typed, printing, exit codes.

`sample.py`, `evaluate.py`, `sweep.py` and `train.py` at the repository root are thin wrappers
around `cli.sample`, `cli.evaluate`, `cli.sweep` and `cli.train`. Nothing in the library imports
this package: library code raises `ldm_jax.errors` types, and the command lines turn every
`UserError` into one line on stderr and exit code 2.
"""

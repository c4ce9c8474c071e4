"""Test helper: sample.py's main run in-process, as a user would run the command."""

import sample


def run_sample(args, capsys) -> tuple[int, str, str]:
  """sample.main(args) -> (exit code, stdout, stderr) captured by pytest's capsys."""
  try:
    sample.main(args)
    code = 0
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return code, out.out, out.err

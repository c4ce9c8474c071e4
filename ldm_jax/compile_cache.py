"""JAX's persistent compilation cache for the command lines (sample.py, train.py).

Every run of a command line traces and compiles the UNet, the sampler loop and the decoder again:
seconds on CPU, minutes on TPU. With the cache on, XLA's executables are written to a directory and
a later run whose programs are the same (another prompt, seed, guidance scale or LoRA scale: these
are arguments of the compiled programs, not constants in them) loads them instead of compiling.

Where the cache lives, first match wins:
  * the command line's `--compilation_cache DIR`, or `off` to disable it;
  * the environment variable LDM_JAX_COMPILATION_CACHE (a directory, or `off`);
  * $XDG_CACHE_HOME/ldm_jax/jax, else ~/.cache/ldm_jax/jax.
Programs are cached whatever their compile time: on CPU most of them compile in under a second,
JAX's default threshold, and together they are the start-up the cache is there to remove.
"""

import os

ENV = "LDM_JAX_COMPILATION_CACHE"
OFF = "off"


def default_dir(environ=None) -> str:
  """The cache directory used when neither the flag nor the environment names one."""
  environ = os.environ if environ is None else environ
  home = environ.get("HOME") or os.path.expanduser("~")
  base = environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
  return os.path.join(base, "ldm_jax", "jax")


def resolve(flag: str | None, environ=None) -> str | None:
  """The cache directory for a `--compilation_cache` value (None: not given), or None when off."""
  environ = os.environ if environ is None else environ
  choice = flag if flag else environ.get(ENV) or default_dir(environ)
  return None if choice.strip().lower() == OFF else os.path.abspath(os.path.expanduser(choice))


def enable(flag: str | None = None) -> str | None:
  """Turns the cache on (before anything is compiled); returns its directory, or None when off.

  Raises OSError naming the directory when it cannot be created.
  """
  import jax
  path = resolve(flag)
  if path is None:
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise OSError(f"compilation cache {path}: cannot create it ({e.strerror}); give another "
                  f"directory with --compilation_cache or {ENV}, or 'off'.") from None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path

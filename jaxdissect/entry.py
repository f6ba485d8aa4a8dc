"""What every command-line entry point (main.py, python -m jaxdissect.X) does around its
work, and only there: a library import changes nothing in the caller's process.

prepare(), before anything imports transformers: transformers imports PyTorch and
TensorFlow at start-up when they are installed, for its PyTorch and TF classes. This
package uses only its Flax models, tokenizers and image processors, which need neither
(PyTorch-format safetensors are read with safetensors' NumPy/Flax loaders), and tf.data
imports TensorFlow on its own where a probe pass needs it. Measured on the synthetic
smoke run with torch installed: 14-16 s to the loaded target, 4.5-5 s with these
defaults. A user's own USE_TORCH / USE_TF still win.

finish(), after the work: Python's last collections at exit scan every object that
TensorFlow, JAX and transformers made (4 s of the synthetic smoke run's 45). gc.freeze()
leaves them out; frozen objects are still freed by reference counting and the atexit
handlers (JAX's, jax.distributed's shutdown) still run, so only cyclic garbage is left
to the operating system.

use_compilation_cache(), once the config is read: JAX's persistent compilation cache
(config.compilation_cache_dir), so that a second run compiles little, bounded in size
on a local disk.
"""
import gc
import os
import sys
from typing import Callable, NoReturn


def prepare() -> None:
  os.environ.setdefault("USE_TORCH", "0")
  os.environ.setdefault("USE_TF", "0")


def finish() -> None:
  gc.freeze()


def run(main: Callable[[], int | None]) -> NoReturn:
  """A `python -m jaxdissect.X` entry point: prepare(), main(), finish(), then exit
  with main's status (None: 0)."""
  prepare()
  status = main()
  finish()
  sys.exit(status)


# Settings of config.compilation_cache_dir that turn the cache off, besides "": as a
# path each would make a directory of that name wherever the run starts.
OFF_SETTINGS = ("none", "off", "false", "0")


def compilation_cache_dir(setting: str, environ=None) -> str:
  """config.compilation_cache_dir -> the directory JAX's persistent compilation cache
  uses ("" for none): "auto" is $JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/
  jaxdissect/jax, else ~/.cache/jaxdissect/jax; "" and OFF_SETTINGS (any case) turn it
  off (./none is a directory called none); any other value is taken as given (~
  expanded)."""
  environ = os.environ if environ is None else environ
  if setting.strip().lower() in OFF_SETTINGS:
    return ""
  if setting != "auto":
    return os.path.expanduser(setting) if setting else ""
  if environ.get("JAX_COMPILATION_CACHE_DIR"):
    return environ["JAX_COMPILATION_CACHE_DIR"]
  cache_home = environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return os.path.join(cache_home, "jaxdissect", "jax")


# JAX caches only programs that took at least 1 s to compile by default: 4 of the
# synthetic smoke run's programs (78 s cold, 71 s again). From 0.1 s: 47 programs,
# 1.5 MB, and the second run takes 45.5 s.
MIN_COMPILE_SECONDS = 0.1
# JAX's cache grows without bound by default, and every new shape of probe set, concept
# set or layer adds programs. Beyond this size on a local disk JAX deletes the least
# recently used entries (the synthetic smoke run's programs take 1.5 MB).
MAX_CACHE_BYTES = 2**30


def use_compilation_cache(setting: str) -> str:
  """Points JAX's persistent compilation cache at compilation_cache_dir(setting), or
  turns it off for ""; returns the directory ("" for off). A user's
  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS wins over MIN_COMPILE_SECONDS, and
  JAX_COMPILATION_CACHE_MAX_SIZE over MAX_CACHE_BYTES. A cache on a remote store
  (gs://...) keeps JAX's default of no bound: JAX's eviction locks the directory with a
  lock file, meant for a local disk."""
  import jax  # pylint: disable=g-import-not-at-top
  directory = compilation_cache_dir(setting)
  if not directory:
    jax.config.update("jax_enable_compilation_cache", False)
    return ""
  jax.config.update("jax_compilation_cache_dir", directory)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ and "://" not in directory:
    jax.config.update("jax_compilation_cache_max_size", MAX_CACHE_BYTES)
  return directory

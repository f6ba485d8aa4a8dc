"""pytest runs the absltest suites: absl flags (test_tmpdir, ...) need parsing first."""
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The slow tier runs main.py in subprocesses again and again on the same tiny models:
# JAX's persistent compilation cache lets them share compiled programs (one synthetic
# smoke run: 68 s cold, 40 s warm). Inherited by every subprocess the tests start; the
# key covers the program, the backend and the JAX version, so a stale entry is never
# used. Set JAX_COMPILATION_CACHE_DIR to choose another place.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"jaxdissect-tests-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()


def pytest_configure(config):
  """xdist's loadscope otherwise reorders the classes by their number of tests, most
  first, which puts the one-test whole-run classes (memory, multihost) last again."""
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  """Slow tests first (stable otherwise): with `-n 2 --dist loadscope` each worker takes
  the next class when it is free, so the minutes-long whole-run classes start early and
  the short ones fill the end, instead of one worker running a 4-minute class alone at
  the end (the slow classes sort late by file name: memory, multihost, resume,
  sharding)."""
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)

"""entry.prepare() keeps transformers from importing PyTorch (and TensorFlow) in the
entry points' processes, while what they need from transformers still loads; the
compilation cache's directory follows config.compilation_cache_dir, bounded in size on a
local disk."""
import gc
import importlib.util
import os
import subprocess
import sys

from unittest import mock

from absl.testing import absltest

from jaxdissect import entry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = """
import sys
from jaxdissect import entry
entry.prepare()
import transformers
from transformers import AutoImageProcessor, FlaxCLIPModel
print(sorted(name for name in ("torch", "tensorflow") if name in sys.modules))
"""


class PrepareTest(absltest.TestCase):

  def test_transformers_imports_neither_torch_nor_tensorflow(self):
    if importlib.util.find_spec("torch") is None:
      self.skipTest("torch is not installed: nothing for transformers to import")
    env = {k: v for k, v in os.environ.items() if k not in ("USE_TORCH", "USE_TF")}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertEqual(proc.stdout.strip().splitlines()[-1], "[]")


ENVIRONMENT = """
import sys
from jaxdissect import entry
entry.prepare()
from jaxdissect import results
versions = results.environment()["versions"]
print("tensorflow" in sys.modules, versions.get("tensorflow"))
"""


class EnvironmentTest(absltest.TestCase):

  def test_records_tensorflow_version_without_importing_it(self):
    proc = subprocess.run([sys.executable, "-c", ENVIRONMENT], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    imported, version = proc.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    self.assertEqual(imported, "False")
    if importlib.util.find_spec("tensorflow") is not None:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self.assertEqual(version, tf.__version__)


class RunTest(absltest.TestCase):

  def test_exits_with_mains_status_after_prepare_and_finish(self):
    with mock.patch.dict(os.environ, clear=False), mock.patch.object(
        entry.gc, "freeze") as freeze:
      os.environ.pop("USE_TORCH", None)
      with self.assertRaises(SystemExit) as caught:
        entry.run(lambda: 3)
      self.assertEqual(os.environ["USE_TORCH"], "0")
    freeze.assert_called_once()
    self.assertEqual(caught.exception.code, 3)
    with mock.patch.dict(os.environ, clear=False), mock.patch.object(entry.gc, "freeze"), \
        self.assertRaises(SystemExit) as caught:
      entry.run(lambda: None)
    self.assertIsNone(caught.exception.code)
    self.assertEqual(gc.get_freeze_count(), 0)  # the test process's collector untouched


class CompilationCacheDirTest(absltest.TestCase):

  def test_auto_prefers_jax_variable_then_xdg_then_home(self):
    home = os.path.expanduser("~")
    self.assertEqual(entry.compilation_cache_dir("auto", {}),
                     os.path.join(home, ".cache", "jaxdissect", "jax"))
    self.assertEqual(entry.compilation_cache_dir("auto", {"XDG_CACHE_HOME": "/x"}),
                     "/x/jaxdissect/jax")
    self.assertEqual(entry.compilation_cache_dir(
        "auto", {"XDG_CACHE_HOME": "/x", "JAX_COMPILATION_CACHE_DIR": "/j"}), "/j")

  def test_explicit_path_or_off(self):
    env = {"JAX_COMPILATION_CACHE_DIR": "/j"}
    self.assertEqual(entry.compilation_cache_dir("~/c", env),
                     os.path.join(os.path.expanduser("~"), "c"))
    self.assertEqual(entry.compilation_cache_dir("gs://bucket/c", env), "gs://bucket/c")
    self.assertEqual(entry.compilation_cache_dir("", env), "")
    # Words for "off" are not directories named after them in the current directory.
    for off in ("none", "None", "OFF", "false", "0"):
      self.assertEqual(entry.compilation_cache_dir(off, env), "", off)
    self.assertEqual(entry.compilation_cache_dir("./none", env), "./none")


CACHE_PROBE = """
import os, sys
import jax, jax.numpy as jnp
from jaxdissect import entry
entry.use_compilation_cache(sys.argv[1])
print(jax.config.jax_compilation_cache_max_size)
if "://" not in sys.argv[1]:
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(7)).block_until_ready()
  print(*sorted(os.listdir(sys.argv[1])), sep=chr(10))
"""


class CacheBoundTest(absltest.TestCase):
  """In fresh processes: use_compilation_cache changes JAX's global config."""

  def _probe(self, directory, **env):
    env = {**{k: v for k, v in os.environ.items()
              if k != "JAX_COMPILATION_CACHE_MAX_SIZE"}, **env}
    proc = subprocess.run([sys.executable, "-c", CACHE_PROBE, directory], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    return proc.stdout.strip().splitlines()

  def test_local_cache_is_bounded_and_evictable(self):
    directory = self.create_tempdir().full_path
    size, *files = self._probe(directory)
    self.assertEqual(int(size), entry.MAX_CACHE_BYTES)
    # JAX keeps an access time beside each entry only when it may evict.
    self.assertTrue(any(name.endswith("-atime") for name in files), files)

  def test_users_bound_wins_and_remote_store_is_not_bounded(self):
    directory = self.create_tempdir().full_path
    self.assertEqual(int(self._probe(directory, JAX_COMPILATION_CACHE_MAX_SIZE="12345")[0]),
                     12345)
    self.assertEqual(int(self._probe("gs://bucket/cache")[0]), -1)


if __name__ == "__main__":
  absltest.main()

"""The activation store: atomic entries, checksums, fingerprints."""
import os
import shutil
import tempfile
from unittest import mock

from absl.testing import absltest
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect import activations
from jaxdissect import store
from jaxdissect import tiny_models
from jaxdissect.models import clip as clip_lib
from jaxdissect.models import targets


class Block(nn.Module):
  nonlinearity: str

  @nn.compact
  def __call__(self, x):
    return getattr(nn, self.nonlinearity)(nn.Dense(4, name="dense")(x))


class Net(nn.Module):
  """Same parameters whatever the nonlinearity: only the code differs."""
  nonlinearity: str = "relu"

  @nn.compact
  def __call__(self, pixels):
    return Block(self.nonlinearity, name="block")(jnp.mean(pixels, axis=(1, 2)))


def make_probe(seed=0):
  rng = np.random.default_rng(seed)
  return store.ProbeActivations(
      rng.standard_normal((5, 4)).astype(np.float32),
      {"layer4": rng.standard_normal((5, 3)).astype(np.float32),
       "fc": rng.standard_normal((5, 2)).astype(np.float32)},
      [f"img{i}.png" for i in range(5)])


class StoreTest(absltest.TestCase):

  def test_round_trip(self):
    root = self.create_tempdir().full_path
    probe = make_probe()
    probe.skipped = [7, 9]
    store.save_probe(root, "k1", probe, {"note": "x"})
    loaded = store.load_probe(root, "k1")
    np.testing.assert_array_equal(loaded.image_embeddings, probe.image_embeddings)
    self.assertEqual(list(loaded.activations), ["layer4", "fc"])
    np.testing.assert_array_equal(loaded.activations["fc"], probe.activations["fc"])
    self.assertEqual(loaded.image_ids, probe.image_ids)
    self.assertEqual(loaded.skipped, [7, 9])
    self.assertIsNone(store.load_probe(root, "other"))
    self.assertEqual([n for n in os.listdir(root) if n.startswith(".tmp")], [])

  def test_runs_sharing_a_store_keep_each_others_files(self):
    root = self.create_tempdir().full_path
    store.save_probe_chunk(root, "k", 0, 5, make_probe())
    partial = os.path.join(root, "partial-k")
    # Another run's chunk, half written (what _write_entry's temp directory holds).
    in_progress = os.path.join(partial, ".tmp-chunk-000000000005-000000000010-abc")
    os.makedirs(in_progress)
    store.remove_probe_chunks(root, "k")
    self.assertEqual(os.listdir(partial), [os.path.basename(in_progress)])
    os.rmdir(in_progress)
    store.remove_probe_chunks(root, "k")
    self.assertFalse(os.path.exists(partial))
    store.remove_probe_chunks(root, "never-written")  # nothing to remove: no error

  def test_assembly_uses_the_entry_another_run_finished(self):
    root = self.create_tempdir().full_path
    finished = make_probe(seed=3)

    def other_run_finishes(*args, **kwargs):
      # Between this run's start and its read of a chunk, the other run assembled the
      # pass and removed the chunks.
      del args, kwargs
      store.save_probe(root, "k", finished, {})
      return None

    with mock.patch.object(store, "load_probe_chunk", other_run_finishes):
      assembled = store.assemble_probe(root, "k", [(0, 5)], {})
    np.testing.assert_array_equal(assembled.activations["fc"], finished.activations["fc"])
    with self.assertRaisesRegex(FileNotFoundError, "chunk 0..4 of probe-other is missing"):
      store.assemble_probe(root, "other", [(0, 5)], {})

  def test_remote_store_through_tf_gfile(self):
    # gs:// on TPU VMs, tested on TF's in-memory filesystem through the same API.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from jaxdissect import topk  # pylint: disable=g-import-not-at-top
    cache = self.create_tempdir().full_path
    root = f"ram://store-test-{os.getpid()}/activations"
    with mock.patch.dict(os.environ, {"JAXDISSECT_CACHE": cache}):
      probe = make_probe()
      probe.top = {name: topk.from_activations(values, 2)
                   for name, values in probe.activations.items()}
      store.save_probe(root, "whole", probe, {})
      self.assertTrue(tf.io.gfile.exists(f"{root}/probe-whole/manifest.json"))
      loaded = store.load_probe(root, "whole", mmap=True)
      self.assertIsInstance(loaded.activations["fc"], np.memmap)  # the local copy
      np.testing.assert_array_equal(loaded.activations["fc"], probe.activations["fc"])
      self.assertIsNone(store.load_probe(root, "absent"))
      # Chunks, assembly, clean-up.
      halves = [(0, 3), (3, 5)]
      for start, stop in halves:
        part = store.ProbeActivations(
            probe.image_embeddings[start:stop],
            {k: v[start:stop] for k, v in probe.activations.items()},
            probe.image_ids[start:stop],
            top={k: topk.from_activations(v[start:stop], 2)
                 for k, v in probe.activations.items()})
        store.save_probe_chunk(root, "pass", start, stop, part)
      assembled = store.assemble_probe(root, "pass", halves, {})
      np.testing.assert_array_equal(assembled.activations["layer4"],
                                    probe.activations["layer4"])
      store.remove_probe_chunks(root, "pass")
      self.assertCountEqual(store.listdir(root), ["probe-whole", "probe-pass"])
      # A damaged remote entry is dropped, not read, by a machine without a local copy.
      with tf.io.gfile.GFile(f"{root}/probe-whole/layer-1.npy", "wb") as f:
        f.write(b"garbage")
      self.assertIsNotNone(store.load_probe(root, "whole"))  # this machine's copy is whole
      shutil.rmtree(os.path.join(cache, "store"))
      with self.assertLogs(level="WARNING"):
        self.assertIsNone(store.load_probe(root, "whole"))
      self.assertFalse(tf.io.gfile.exists(f"{root}/probe-whole/manifest.json"))

  def test_corrupted_or_truncated_entry_is_dropped_not_read(self):
    root = self.create_tempdir().full_path
    entry = store.save_probe(root, "k", make_probe(), {})
    path = os.path.join(entry, "layer-0.npy")
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) - 4)
    with self.assertLogs(level="WARNING"):
      self.assertIsNone(store.load_probe(root, "k"))
    self.assertFalse(os.path.exists(entry))
    entry = store.save_text(root, "t", np.ones((3, 4), np.float32), ["a", "b", "c"], {})
    with open(os.path.join(entry, "text_embeddings.npy"), "r+b") as f:
      f.seek(-1, os.SEEK_END)
      f.write(b"\x01")
    with self.assertLogs(level="WARNING"):
      self.assertIsNone(store.load_text(root, "t"))

  def test_fingerprint_is_order_free_and_sensitive(self):
    a = store.fingerprint({"x": 1, "y": [1, 2]})
    self.assertEqual(a, store.fingerprint({"y": [1, 2], "x": 1}))
    self.assertNotEqual(a, store.fingerprint({"x": 1, "y": [2, 1]}))
    self.assertNotEqual(a, store.fingerprint({"x": 2, "y": [1, 2]}))


class ComputationFingerprintTest(absltest.TestCase):
  """The store key covers the computation, not only weights, names and transforms."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.clip = clip_lib.load_clip(tiny_models.make_tiny_clip(
        os.path.join(tempfile.mkdtemp(), "clip")))
    cls.variables = Net().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))

  def key(self, nonlinearity="relu", variables=None):
    target = targets.TargetModel(name="net", module=Net(nonlinearity),
                                 variables=variables or self.variables,
                                 transform=self.clip.transform)
    layers = target.resolve_layers(["block"])
    return activations.computation_fingerprint(self.clip, target, layers, "avg", "cls")

  def test_same_computation_same_key(self):
    self.assertEqual(self.key(), self.key())
    # Weights are arguments of the program, not part of it (they have their own hash).
    other = Net().init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))
    self.assertEqual(self.key(), self.key(variables=other))

  def test_edited_code_changes_the_key(self):
    self.assertNotEqual(self.key("relu"), self.key("gelu"))


if __name__ == "__main__":
  absltest.main()

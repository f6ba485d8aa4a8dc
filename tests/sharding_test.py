"""Similarity sharded over neurons on 8 (fake CPU) devices equals one device.

The device count is fixed when the XLA backend starts, so the 8-device side runs in a
subprocess with --xla_force_host_platform_device_count=8.
"""
import os
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest
import jax
import numpy as np
import pytest

from jaxdissect import sharding
from jaxdissect import tiny_models
from tests import main_test

EIGHT = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}

_FUNCTIONS_CHECK = textwrap.dedent("""
    import jax, numpy as np
    from jaxdissect import sharding, streaming, topk
    assert jax.device_count() == 8, jax.device_count()
    rng = np.random.default_rng(0)
    images = rng.standard_normal((700, 24)).astype(np.float32)
    texts = rng.standard_normal((90, 24)).astype(np.float32)
    # 37 neurons: not a multiple of 8, so the padding is exercised. Ties on purpose.
    acts = rng.integers(0, 6, (700, 37)).astype(np.float32)
    mesh = sharding.make_mesh()
    running = topk.from_activations(acts, 100)
    for name in ("soft_wpmi", "wpmi"):
      fn = streaming.FUNCTIONS[name]
      one = np.asarray(fn(images, texts, acts))
      eight = np.asarray(fn(images, texts, acts, mesh=mesh))
      from_top = np.asarray(fn(images, texts, None, top_images=running.ids.T, mesh=mesh))
      assert np.array_equal(one, eight), (name, np.abs(one - eight).max())
      assert np.array_equal(one, from_top), (name, np.abs(one - from_top).max())
      # bfloat16 products, then each neuron's candidates rescored in float32.
      one, eight = (np.asarray(fn(images, texts, acts, mesh=m, compute_dtype="bfloat16"))
                    for m in (None, mesh))
      assert np.array_equal(one, eight), (name, np.abs(one - eight).max())
    # Several layers in one pass over the concepts (3 neurons: fewer than the devices).
    for name in ("soft_wpmi", "wpmi"):
      tops = [running.ids.T, running.ids.T[:3, ::-1]]
      one, eight = (streaming.layers_log_likelihood(name, images, texts, tops, mesh=m)
                    for m in (None, mesh))
      assert all(np.array_equal(a, b) for a, b in zip(one, eight)), name
    # 5 neurons over 3,000 images share few top images: the rank-group plan.
    wide = rng.standard_normal((3000, 24)).astype(np.float32)
    few = rng.random((3000, 5)).astype(np.float32)
    for name in ("soft_wpmi", "wpmi"):
      fn = streaming.FUNCTIONS[name]
      one, eight = (np.asarray(fn(wide, texts, few, mesh=m)) for m in (None, mesh))
      assert np.array_equal(one, eight), (name, np.abs(one - eight).max())
    for name in ("cos_similarity", "cos_similarity_cubed"):
      fn = streaming.FUNCTIONS[name]
      one = np.asarray(fn(images, texts, acts))
      eight = np.asarray(fn(images, texts, acts, mesh=mesh))
      # The matmul is split by rows across devices: equal to float32 rounding.
      np.testing.assert_allclose(eight, one, rtol=1e-5, atol=1e-6, err_msg=name)
      assert np.array_equal(one.argmax(1), eight.argmax(1)), name
    # Stability's resamples split over the devices (3 of them: padded to 8).
    from jaxdissect import similarity, stability
    for name in ("soft_wpmi", "wpmi"):
      rows = stability.resampled_top_rows(running.ids[:stability.depth(name)].T,
                                          stability.poisson_weights(700, 3, 0),
                                          similarity.default_top_k(name))
      one, eight = (streaming.resampled_labels(name, images, texts, rows, mesh=m)
                    for m in (None, mesh))
      assert np.array_equal(one, eight), name
      # Two layers in one pass, each resample's prior over its own layer's units.
      one, eight = (streaming.layers_resampled_labels(name, images, texts,
                                                      [rows, rows[:, 3:9]], mesh=m)
                    for m in (None, mesh))
      assert all(np.array_equal(a, b) for a, b in zip(one, eight)), name
    from jaxdissect import linear
    moments = linear.image_moments(images, acts)[0]
    one, eight = (linear.fit(moments, texts, np.ones(37, bool), 4, m) for m in (None, mesh))
    assert np.array_equal(one.concept_ids, eight.concept_ids)
    assert np.array_equal(one.weights, eight.weights)
    assert np.array_equal(linear.correlation_labels(moments, texts, np.ones(37, bool)),
                          linear.correlation_labels(moments, texts, np.ones(37, bool), mesh))
    from jaxdissect import visibility
    for block in (50, 96):  # 50 is rounded up to a multiple of the 8 devices
      one, eight = (visibility.images_showing(images, texts, 5, block, m)
                    for m in (None, mesh))
      assert np.array_equal(one, eight), block
      assert one.sum() == 5 * len(images)
    from jaxdissect import compositional
    held = linear.holdout_mask(700, 0.25, 0)
    names = [f"c{i}" for i in range(90)]
    one, eight = (compositional.compose(acts, images, texts, names, np.ones(37, bool), held,
                                        beam=4, mesh=m) for m in (None, mesh))
    assert one.expression == eight.expression
    np.testing.assert_allclose(one.score, eight.score, rtol=0, atol=1e-6)  # float32 sums
    from jaxdissect import config as config_lib, errors
    config = config_lib.get_base_config()
    config.num_devices = 4
    assert sharding.mesh_from_config(config).devices.size == 4
    config.num_devices = 0
    assert sharding.mesh_from_config(config).devices.size == 8
    config.num_devices = 9
    try:
      sharding.mesh_from_config(config)
      raise AssertionError("9 of 8 devices accepted")
    except errors.UserError as err:
      assert "num_devices" in err.one_line(), err.one_line()
    print("SHARDED_OK")
""")


class ShardOffsetsTest(absltest.TestCase):

  def test_slices_of_global_batches(self):
    np.testing.assert_array_equal(sharding.shard_offsets(11, 2, 1, 3), [2, 3, 8, 9])
    np.testing.assert_array_equal(sharding.shard_offsets(5, 4, 0, 1), np.arange(5))
    for count, local_batch, num_shards in ((141, 16, 2), (100, 3, 4), (7, 5, 3)):
      shards = [sharding.shard_offsets(count, local_batch, p, num_shards)
                for p in range(num_shards)]
      # Disjoint, covering, ascending; process 0 holds the most rows.
      np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(count))
      for rows in shards:
        self.assertTrue(np.all(np.diff(rows) > 0))
        self.assertLessEqual(len(rows), len(shards[0]))
        # The k-th row of a shard sits at position k % local_batch of its local
        # batch, as the image does in one process's batches of local_batch.
        np.testing.assert_array_equal(np.arange(len(rows)) % local_batch,
                                      rows % local_batch)


class ToDeviceTest(absltest.TestCase):

  def test_values_dtype_and_alignment(self):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((1001, 37)).astype(np.float32)

    def at_offset(offset):  # a copy of base starting `offset` bytes past a 64-byte line
      raw = np.empty(base.nbytes + 128, np.uint8)
      start = -raw.ctypes.data % 64 + offset
      return raw[start:start + base.nbytes].view(np.float32).reshape(base.shape)

    inputs = {
        "aligned": at_offset(0),
        "unaligned": at_offset(4),
        "strided": np.asfortranarray(base),
        "float64": base.astype(np.float64),
        "jax": jax.numpy.asarray(base),
    }
    np.copyto(inputs["aligned"], base)
    np.copyto(inputs["unaligned"], base)
    self.assertNotEqual(inputs["unaligned"].ctypes.data % 64, 0)
    for name, array in inputs.items():
      out = sharding.to_device(array)
      self.assertIsInstance(out, jax.Array, name)
      self.assertEqual(out.dtype, np.float32, name)
      np.testing.assert_array_equal(np.asarray(out), base, err_msg=name)
      if jax.default_backend() == "cpu":
        self.assertEqual(out.unsafe_buffer_pointer() % sharding.HOST_ALIGN_BYTES, 0, name)
    # An aligned float32 array is used in place on CPU: no copy at all.
    if jax.default_backend() == "cpu":
      self.assertEqual(sharding.to_device(inputs["aligned"]).unsafe_buffer_pointer(),
                       inputs["aligned"].ctypes.data)
    self.assertEqual(sharding.to_device(np.zeros((0, 3))).shape, (0, 3))
    self.assertEqual(sharding.to_device(np.arange(3), np.int32).dtype, np.int32)


class ShardedSimilarityTest(absltest.TestCase):

  def test_streaming_functions_on_eight_devices_equal_one_device(self):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **EIGHT)
    proc = subprocess.run([sys.executable, "-c", _FUNCTIONS_CHECK], env=env,
                          capture_output=True, text=True, timeout=600,
                          cwd=main_test.REPO)
    self.assertIn("SHARDED_OK", proc.stdout, proc.stderr[-3000:])


@pytest.mark.slow
class ShardedMainTest(absltest.TestCase):
  """main.py with P too large for concept_matrix_max_gb, on 8 devices."""

  def test_main_on_eight_devices(self):
    tmp = tempfile.mkdtemp()
    clip = tiny_models.make_tiny_clip(os.path.join(tmp, "clip"))
    resnet = tiny_models.make_tiny_resnet(os.path.join(tmp, "resnet"), "basic")
    images = os.path.join(tmp, "images")
    tiny_models.write_image_folder(images, 150)
    concepts = tiny_models.write_concepts(os.path.join(tmp, "concepts.txt"),
                                          main_test.CONCEPTS)
    names = ("descriptions.csv", "descriptions_topk.csv", "top_images.csv",
             "explanations.csv", "unit_trust.csv", "concept_visibility.csv")

    def run(workdir, env=None, **overrides):
      args = ["--config", main_test.BASE_CONFIG,
              "--workdir", workdir, f"--config.clip_model={clip}",
              f"--config.target_model={resnet}", "--config.target_layers=layer3,layer4,fc",
              f"--config.d_probe=folder:{images}", f"--config.concept_set={concepts}",
              "--config.batch_size=40", "--config.concept_matrix_max_gb=1e-9"]
      args += [f"--config.{k}={v}" for k, v in overrides.items()]
      proc = main_test.run_main(*args, env_extra=env)
      self.assertIn("streaming soft_wpmi", proc.stderr)
      files = {name: open(os.path.join(workdir, "results", name), "rb").read()
               for name in names}
      return proc, files

    _, one = run(os.path.join(tmp, "one"))
    self.assertIn(b"layer4", one["descriptions.csv"])
    # The same stored activations, scored with the neurons split over 8 devices: every
    # result file is byte-identical.
    proc, reused = run(os.path.join(tmp, "sharded_similarity"), EIGHT,
                       activation_dir=os.path.join(tmp, "one", "activations"))
    self.assertIn("8 local device(s)", proc.stderr)
    self.assertIn("Probe activations reused", proc.stderr)
    for name in names:
      self.assertEqual(reused[name], one[name], name)
    # Everything on 8 devices: the probe pass's convolutions see 5 images per device
    # instead of 40, which moves activations by float32 rounding; the labels and the
    # top images stay the same.
    _, eight = run(os.path.join(tmp, "eight"), EIGHT)
    for name, columns in (("descriptions.csv", 3), ("descriptions_topk.csv", 4),
                          ("top_images.csv", 4)):
      rows_one = [r.split(",")[:columns] for r in one[name].decode().splitlines()]
      rows_eight = [r.split(",")[:columns] for r in eight[name].decode().splitlines()]
      self.assertEqual(rows_eight, rows_one, name)


if __name__ == "__main__":
  absltest.main()

"""Probe sources and the batching pipeline: ids, order, conversions, padding, TFDS."""
import os
import tempfile
from unittest import mock

from absl.testing import absltest
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from jaxdissect import errors
from jaxdissect import sharding
from jaxdissect import tiny_models
from jaxdissect import topk
from jaxdissect.data import preprocessing
from jaxdissect.data import probe
import tiny_fixtures

IDENTITY_8 = preprocessing.ImageTransform(resize_to=(8, 8), resample="nearest",
                                          rescale_factor=1.0, mean=(0, 0, 0),
                                          std=(1, 1, 1))
HALF_6 = preprocessing.ImageTransform(resize_shortest_edge=6, crop_size=(6, 6))


class TinyProbeDataset(tfds.core.GeneratorBasedBuilder):
  """A TFDS dataset built in the test, read back through tfds_source."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.ClassLabel(
            num_classes=2)}))

  def _split_generators(self, dl_manager):
    return {"validation": self._generate_examples()}

  def _generate_examples(self):
    for i, image in enumerate(tiny_models.render_images(9, seed=3)):
      yield f"key{i}", {"image": image, "label": i % 2}


def collect(probe_set, batch_size, **kwargs):
  batches = list(probe_set.batches(IDENTITY_8, HALF_6, batch_size, **kwargs))
  merged = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  return batches, merged


class ProbeTest(absltest.TestCase):

  def test_folder_is_recursive_sorted_and_padded(self):
    with tempfile.TemporaryDirectory() as tmp:
      rel = tiny_models.write_image_folder(tmp, 11)
      with open(os.path.join(tmp, "notes.txt"), "w") as f:
        f.write("not an image")
      source = probe.folder_source(tmp)
      self.assertEqual(source.num_images, 11)
      batches, merged = collect(probe.ProbeSet([source]), 4)
      self.assertLen(batches, 3)
      for batch in batches:
        self.assertEqual(batch["clip_pixels"].shape, (4, 8, 8, 3))
        self.assertEqual(batch["target_pixels"].shape, (4, 6, 6, 3))
      np.testing.assert_array_equal(merged["mask"], [True] * 11 + [False])
      np.testing.assert_array_equal(merged["index"][:11], np.arange(11))
      self.assertEqual(merged["index"][11], -1)
      self.assertEqual([i.decode() for i in merged["image_id"][:11]], rel)
      # The pixels are those of the file, decoded once (nearest resize of a PNG).
      first_png = next(i for i, r in enumerate(rel) if r.endswith(".png"))
      image = np.asarray(Image.open(os.path.join(tmp, rel[first_png])).resize(
          (8, 8), Image.NEAREST))
      self.assertLess(np.abs(merged["clip_pixels"][first_png] - image).mean(), 40)

  def test_grayscale_rgba_and_16_bit_become_rgb(self):
    with tempfile.TemporaryDirectory() as tmp:
      gray = np.full((10, 12), 200, np.uint8)
      Image.fromarray(gray, "L").save(os.path.join(tmp, "0_gray.png"))
      rgba = np.zeros((10, 12, 4), np.uint8)
      rgba[..., 0] = 255
      rgba[..., 3] = 10
      Image.fromarray(rgba, "RGBA").save(os.path.join(tmp, "1_rgba.png"))
      deep = np.full((10, 12), 65535 // 2, np.uint16)
      Image.fromarray(deep).save(os.path.join(tmp, "2_deep.png"))
      Image.fromarray(np.full((1, 1, 3), 90, np.uint8)).save(os.path.join(tmp, "3_one.jpg"))
      _, merged = collect(probe.ProbeSet([probe.folder_source(tmp)]), 4)
      pixels = merged["clip_pixels"]
      np.testing.assert_allclose(pixels[0], 200, atol=1)
      np.testing.assert_allclose(pixels[1][..., 0], 255, atol=1)
      np.testing.assert_allclose(pixels[1][..., 1:], 0, atol=1)
      np.testing.assert_allclose(pixels[2], 255, atol=1)  # clipped, as convert("RGB")
      np.testing.assert_allclose(pixels[3], 90, atol=3)

  def test_sources_concatenate_with_global_indices_and_shards(self):
    with tempfile.TemporaryDirectory() as tmp:
      tiny_models.write_image_folder(tmp, 5)
      arrays = probe.array_source(np.zeros((4, 9, 9, 3), np.uint8), ["x", "y", "z", "w"])
      probe_set = probe.ProbeSet([probe.folder_source(tmp), arrays])
      self.assertEqual(probe_set.num_images, 9)
      _, merged = collect(probe_set, 3)
      np.testing.assert_array_equal(merged["index"], np.arange(9))
      self.assertEqual([i.decode() for i in merged["image_id"][5:]], ["x", "y", "z", "w"])
      # Global batches of 2 x 2 images, each cut into two consecutive slices: every
      # image at the position it has in one process's batches of 2.
      expected = {0: [[0, 1], [4, 5], [8, -1]], 1: [[2, 3], [6, 7], [-1, -1]]}
      for shard in range(2):
        batches, part = collect(probe_set, 2, shard_index=shard, num_shards=2)
        self.assertEqual([list(b["index"]) for b in batches], expected[shard])
        np.testing.assert_array_equal(
            part["index"][part["mask"]],
            sharding.shard_offsets(9, 2, shard, 2))

  def test_undecodable_image_keeps_its_place(self):
    with tempfile.TemporaryDirectory() as tmp:
      tiny_models.write_image_folder(tmp, 5)
      with open(os.path.join(tmp, "img_00001b.png"), "wb") as f:
        f.write(b"not an image")
      probe_set = probe.ProbeSet([probe.folder_source(tmp)])
      self.assertEqual(probe_set.num_images, 6)
      _, merged = collect(probe_set, 4)
      bad = probe_set.sources[0].image_ids.index("img_00001b.png")
      # Masked in place: the images after it sit where they would without it.
      np.testing.assert_array_equal(merged["index"][:6], np.arange(6))
      np.testing.assert_array_equal(merged["mask"],
                                    (np.arange(8) < 6) & (np.arange(8) != bad))
      self.assertFalse(merged["clip_pixels"][bad].any())

  def test_image_range_reads_the_same_images_as_a_full_pass(self):
    with tempfile.TemporaryDirectory() as tmp:
      tiny_models.write_image_folder(tmp, 4)
      arrays = probe.array_source(np.arange(5 * 9 * 9 * 3, dtype=np.uint32).reshape(
          5, 9, 9, 3).astype(np.uint8))
      probe_set = probe.ProbeSet([probe.folder_source(tmp), arrays])
      _, full = collect(probe_set, 2)
      # A range across the two sources: global indices, same pixels, padded batches.
      batches, part = collect(probe_set, 2, start=3, stop=8)
      self.assertLen(batches, 3)
      np.testing.assert_array_equal(part["index"], [3, 4, 5, 6, 7, -1])
      np.testing.assert_array_equal(part["clip_pixels"][:5], full["clip_pixels"][3:8])
      self.assertEqual(list(part["image_id"][:5]), list(full["image_id"][3:8]))
      with self.assertRaisesRegex(ValueError, "empty image range"):
        collect(probe_set, 2, start=9)

  def test_probe_chunks_are_whole_batches(self):
    from jaxdissect import probe_pass  # pylint: disable=g-import-not-at-top
    self.assertEqual(probe_pass.probe_chunks(1000, 300, 128),
                     [(0, 384), (384, 768), (768, 1000)])
    self.assertEqual(probe_pass.probe_chunks(10, 10240, 4), [(0, 10)])

  def test_multi_process_runs_gather_activations_within_the_budget(self):
    """probe_pass._top_k_only: the activations stay ungathered only for a streamed
    (soft-)WPMI beyond activation_gather_max_gb, with a warning that names the fix."""
    import types  # pylint: disable=g-import-not-at-top
    from jaxdissect import config as config_lib  # pylint: disable=g-import-not-at-top
    from jaxdissect import probe_pass  # pylint: disable=g-import-not-at-top
    # 2**20 images x (100 + 156) units x 4 bytes: 1.0 GB; P (2**20 x 1,000) streams.
    probe = types.SimpleNamespace(activations={"a": np.zeros((3, 100), np.float32),
                                               "b": np.zeros((3, 156), np.float32)})

    def config_with(**fields):
      config = config_lib.get_base_config()
      config.concept_matrix_max_gb = 1e-9
      config.update(fields)
      return config

    def top_k_only(**fields):  # for the cases that gather: no warning either
      with mock.patch.object(probe_pass.logging, "warning") as warning:
        decided = probe_pass._top_k_only(config_with(**fields), probe, 2**20, 1_000)
      warning.assert_not_called()
      return decided

    self.assertFalse(top_k_only(activation_gather_max_gb=1.0))
    self.assertFalse(top_k_only(activation_gather_max_gb=0.5, concept_matrix_max_gb=100.0))
    self.assertFalse(top_k_only(activation_gather_max_gb=0.5, similarity_fn="cos_similarity"))
    self.assertFalse(top_k_only(activation_gather_max_gb=0.5,
                                num_top_images=topk.RUNNING_TOP_K + 1))
    with self.assertLogs(level="WARNING") as logs:
      self.assertTrue(probe_pass._top_k_only(config_with(activation_gather_max_gb=0.5),
                                             probe, 2**20, 1_000))
    self.assertIn("1048576 images x 256 units (1.0 GB) exceed activation_gather_max_gb=0.5",
                  logs.output[0])
    self.assertIn("--config.activation_gather_max_gb=2", logs.output[0])

  def test_probe_step_compiles_once_across_chunks(self):
    from jaxdissect import activations  # pylint: disable=g-import-not-at-top
    from jaxdissect.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
    from jaxdissect.models import targets  # pylint: disable=g-import-not-at-top
    clip = clip_lib.load_clip(tiny_fixtures.clip())
    target = targets.load_target(tiny_fixtures.resnet())
    layers = target.resolve_layers(["layer2", "fc"])
    probe_set = probe.ProbeSet([probe.array_source(np.stack(
        tiny_models.render_images(23, seed=2, min_size=40, max_size=40)))])
    step = activations.make_probe_step(clip, target, layers, "avg", "cls")
    parts = []
    for start, stop in ((0, 8), (8, 16), (16, 23)):  # the last chunk is padded
      batches = probe_set.batches(clip.transform, target.transform, 4, start=start,
                                  stop=stop)
      parts.append(activations.run_probe_pass(clip, target, layers, batches,
                                              stop - start, first_index=start,
                                              step=step))
    self.assertEqual(step._cache_size(), 1)  # pylint: disable=protected-access
    whole = activations.run_probe_pass(
        clip, target, layers, probe_set.batches(clip.transform, target.transform, 4), 23)
    np.testing.assert_allclose(np.concatenate([p.activations["fc"] for p in parts]),
                               whole.activations["fc"], rtol=1e-5, atol=1e-6)
    # The running top-k kept in-graph, merged over chunks, is the top-k of the matrix.
    merged = topk.merge([p.top["layer2"] for p in parts])
    expected = topk.from_activations(whole.activations["layer2"], topk.RUNNING_TOP_K)
    np.testing.assert_array_equal(merged.ids, expected.ids)
    np.testing.assert_array_equal(merged.ids, whole.top["layer2"].ids)
    self.assertEqual(int(np.sum(merged.ids != topk.EMPTY_ID)), 23 * merged.ids.shape[1])

  def _broden(self, tmp, rows):
    """A Broden-shaped directory: index.csv (its real columns) and images/ files."""
    root = os.path.join(tmp, "broden1_224")
    images = tiny_models.render_images(len(rows), seed=5, min_size=30, max_size=30)
    for rel, image in zip(rows, images):
      os.makedirs(os.path.join(root, "images", os.path.dirname(rel)), exist_ok=True)
      Image.fromarray(image).save(os.path.join(root, "images", rel))
    with open(os.path.join(root, "index.csv"), "w", encoding="utf-8") as f:
      f.write("image,split,ih,iw,sh,sw,color,object,part,material,scene,texture\n")
      for rel in rows:
        f.write(f"{rel},train,224,224,112,112,{rel}_color.png,,,,,\n")
    return root

  def test_broden_source_reads_index_order(self):
    with tempfile.TemporaryDirectory() as tmp:
      # Not sorted on purpose: the index's order is the probe order.
      rows = ["opensurfaces/25.jpg", "ade20k/ADE_train_1.jpg", "dtd/braided_0050.jpg"]
      root = self._broden(tmp, rows)
      # A file under images/ that index.csv does not list is not a probe image.
      Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(
          os.path.join(root, "images", "extra.png"))
      (source,) = probe.parse_probe_spec(f"broden:{root}")
      self.assertEqual(source.num_images, 3)
      self.assertEqual(source.image_ids, [f"images/{r}" for r in rows])
      batches = list(probe.ProbeSet([source]).batches(IDENTITY_8, HALF_6, 2))
      ids = [i.decode() for b in batches for i, m in zip(b["image_id"], b["mask"]) if m]
      self.assertEqual(ids, [f"images/{r}" for r in rows])
      before = source.identity
      with open(os.path.join(root, "index.csv"), "a", encoding="utf-8") as f:
        f.write(f"{rows[0]},val,224,224,112,112,,,,,,\n")
      self.assertNotEqual(probe.parse_probe_spec(f"broden:{root}")[0].identity, before)

  def test_broden_errors_name_the_fix(self):
    with tempfile.TemporaryDirectory() as tmp:
      with self.assertRaisesRegex(errors.UserError, "no index.csv"):
        probe.parse_probe_spec(f"broden:{tmp}")
      root = self._broden(tmp, ["dtd/a.jpg"])
      with open(os.path.join(root, "index.csv"), "a", encoding="utf-8") as f:
        f.write("dtd/gone.jpg,train,224,224,112,112,,,,,,\n")
      with self.assertRaisesRegex(errors.UserError, "missing, e.g. images/dtd/gone.jpg"):
        probe.parse_probe_spec(f"broden:{root}")
      with open(os.path.join(root, "index.csv"), "w", encoding="utf-8") as f:
        f.write("picture,split\ndtd/a.jpg,train\n")
      with self.assertRaisesRegex(errors.UserError,
                                  "no 'image' column.*give the index.csv that ships"):
        probe.parse_probe_spec(f"broden:{root}")

  def test_union_and_named_sets(self):
    with tempfile.TemporaryDirectory() as tmp:
      root = self._broden(tmp, ["dtd/a.jpg", "dtd/b.jpg"])
      plus = os.path.join(tmp, "a+b")  # a "+" inside a path is not a union
      os.makedirs(plus)
      Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(plus, "x.png"))
      sources = probe.parse_probe_spec(f"folder:{plus}+broden:{root}+synthetic:in_dist:3")
      self.assertEqual([s.num_images for s in sources], [1, 2, 3])
      self.assertEqual(probe.ProbeSet(sources).num_images, 6)
      with mock.patch.dict(os.environ, {"BRODEN_DIR": root}):
        self.assertEqual(probe.expand_probe_spec("imagenet_broden"),
                         ["tfds:imagenet2012:validation", f"broden:{root}"])
        (only,) = probe.parse_probe_spec("broden")
        self.assertEqual(only.num_images, 2)
      self.assertEqual(probe.expand_probe_spec("cifar100_train+places365_val"),
                       ["tfds:cifar100:train", "tfds:places365_small:validation"])
      with mock.patch.dict(os.environ, {"BRODEN_DIR": ""}):
        with self.assertRaisesRegex(errors.UserError, "export BRODEN_DIR"):
          probe.parse_probe_spec("imagenet_broden")

  def test_tfds_source_reads_split_with_keys(self):
    with tempfile.TemporaryDirectory() as tmp:
      TinyProbeDataset(data_dir=tmp).download_and_prepare()
      old = os.environ.get("TFDS_DATA_DIR")
      os.environ["TFDS_DATA_DIR"] = tmp
      try:
        sources = probe.parse_probe_spec("tfds:tiny_probe_dataset:validation[:7]")
      finally:
        if old is None:
          os.environ.pop("TFDS_DATA_DIR")
        else:
          os.environ["TFDS_DATA_DIR"] = old
      self.assertEqual(sources[0].num_images, 7)
      _, merged = collect(probe.ProbeSet(sources), 4)
      ids = [i.decode() for i in merged["image_id"][merged["mask"]]]
      self.assertLen(set(ids), 7)
      self.assertTrue(all(i.startswith("tiny_probe_dataset-validation") for i in ids), ids)

  def test_bad_specs_name_the_field(self):
    with tempfile.TemporaryDirectory() as tmp:
      for spec in ("", "s3:bucket", f"folder:{tmp}/missing", f"folder:{tmp}",
                   "tfds:no_such_dataset_xyz:train"):
        with self.assertRaises(errors.UserError, msg=spec) as ctx:
          probe.parse_probe_spec(spec)
        self.assertEqual(ctx.exception.field, "d_probe")

  def test_tfds_spec_with_version_and_slice(self):
    # Parsing only: name with version, split with a colon inside the slice.
    with self.assertRaises(errors.UserError) as ctx:
      probe.parse_probe_spec("tfds:no_such_dataset_xyz:1.0.0:validation[:10]")
    self.assertIn("no_such_dataset_xyz:1.0.0", ctx.exception.one_line())
    self.assertIn("validation[:10]", ctx.exception.one_line())


if __name__ == "__main__":
  absltest.main()

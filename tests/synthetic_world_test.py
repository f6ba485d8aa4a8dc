"""The synthetic world: determinism, masks, captions; the planted units' known functions."""
import os

from absl.testing import absltest
import pytest
import jax
import numpy as np

from jaxdissect.synthetic import benchmark
from jaxdissect.synthetic import planted
from jaxdissect.synthetic import train
from jaxdissect.synthetic import world


class WorldTest(absltest.TestCase):

  def test_training_negatives_are_outside_the_concept_set_and_match_nothing(self):
    # The distractors must stay unseen by the CLIP, or a label test would be rigged.
    self.assertEmpty(set(world.TRAINING_NEGATIVES) & set(world.CONCEPTS))
    self.assertEmpty(set(world.TRAINING_NEGATIVES) & set(world.TEMPLATE_WORDS))
    rng = np.random.default_rng(0)
    scene = world.sample_scene(rng)
    for word in world.TRAINING_NEGATIVES[:10]:
      self.assertFalse(world.caption_matches(word, scene))
      self.assertFalse(world.caption_matches(f"a {word}", scene))

  def test_vocabulary_sizes_and_concept_file(self):
    self.assertGreaterEqual(len(world.SHAPES), 8)
    self.assertGreaterEqual(len(world.COLOURS), 8)
    self.assertLen(world.TEXTURES, 4)
    self.assertGreaterEqual(len(world.BACKGROUNDS), 4)
    self.assertGreaterEqual(len(world.CONCEPTS), 50)
    self.assertLen(set(world.CONCEPTS), len(world.CONCEPTS))
    with open(world.CONCEPTS_FILE, encoding="utf-8") as f:
      self.assertEqual(f.read().split("\n")[:-1], list(world.CONCEPTS))

  def test_rendering_is_seeded(self):
    a, scenes_a, _ = world.make_dataset(6, seed=4)
    b, scenes_b, _ = world.make_dataset(6, seed=4)
    c, _, _ = world.make_dataset(6, seed=5)
    np.testing.assert_array_equal(a, b)
    self.assertEqual(scenes_a, scenes_b)
    self.assertFalse(np.array_equal(a, c))
    self.assertEqual(a.shape, (6, 64, 64, 3))
    self.assertEqual(a.dtype, np.uint8)

  def test_annotation_matrix_marks_the_words_each_scene_has(self):
    obj = world.SceneObject("heart", "red", "striped", (32.0, 32.0), 16.0, 0.0)
    scenes = [world.Scene((obj,), "sky"), world.Scene((obj,), "snow")]
    words = ["sky", "heart", "dog", "striped", "blue"]
    np.testing.assert_array_equal(world.annotation_matrix(scenes, words),
                                  [[1, 1, 0, 1, 0], [0, 1, 0, 1, 0]])
    # "red" and "snow" are not among the words: left out, not an error.
    self.assertEqual(world.annotation_matrix(scenes, words).dtype, np.float32)

  def test_masks_match_annotations(self):
    images, scenes, masks = world.make_dataset(40, seed=1, with_masks=True)
    for image, scene, mask in zip(images, scenes, masks):
      self.assertEqual(set(mask), scene.concepts())
      objects = np.zeros((64, 64), bool)
      for obj in scene.objects:
        objects |= mask[obj.shape]
      np.testing.assert_array_equal(mask[scene.background], ~objects)
      # A plain, visible object's colour mask holds its colour.
      for obj in scene.objects:
        region = mask[obj.colour]
        if obj.texture == "plain" and region.sum() > 20:
          mean = image[region].mean(axis=0)
          np.testing.assert_allclose(mean, world.COLOURS[obj.colour], atol=12)

  def test_captions_describe_their_scene(self):
    rng = np.random.default_rng(0)
    _, scenes, _ = world.make_dataset(200, seed=2)
    for scene in scenes:
      text = world.caption(scene, rng)
      self.assertTrue(world.caption_matches(text, scene), (text, scene))
    scene = world.Scene((world.SceneObject("star", "red", "plain", (30, 30), 10, 0),),
                        "grass")
    self.assertTrue(world.caption_matches("a red star on grass", scene))
    self.assertFalse(world.caption_matches("blue star", scene))
    self.assertFalse(world.caption_matches("red star on sky", scene))

  def test_tokenizer_keeps_world_words_whole(self):
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
    out = self.create_tempdir().full_path
    train.write_tokenizer(out, world.ATTRIBUTE_WORDS + world.TEMPLATE_WORDS)
    tokenizer = AutoTokenizer.from_pretrained(out)
    self.assertEqual(tokenizer.tokenize("a checkered Star on grass"),
                     ["a", "checkered", "star", "on", "grass"])
    ids = tokenizer("striped")["input_ids"]
    self.assertEqual(ids[-1], max(tokenizer.get_vocab().values()))  # eos pools the text


class PlantedTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.images, cls.scenes, cls.masks = world.make_dataset(500, seed=3, with_masks=True)
    pixels = ((cls.images / 255.0 - np.asarray(train.IMAGENET_MEAN))
              / np.asarray(train.IMAGENET_STD)).astype(np.float32)
    module = planted.PlantedNet()
    cls.outputs = np.asarray(jax.jit(module.apply)(planted.planted_variables(), pixels))

  def test_colour_units_measure_colour_area(self):
    for k, colour in enumerate(planted.COLOUR_NAMES):
      area = np.array([m.get(colour, np.zeros((64, 64))).mean() for m in self.masks])
      self.assertGreater(np.corrcoef(self.outputs[:, k], area)[0, 1], 0.99, colour)

  def test_stripe_unit_prefers_striped_objects(self):
    k = len(planted.COLOUR_NAMES)
    striped = np.array(["striped" in s.concepts() for s in self.scenes])
    top = np.argsort(-self.outputs[:, k], kind="stable")[:50]
    self.assertGreater(striped[top].mean(), 0.75)
    self.assertGreater(self.outputs[striped, k].mean(), 3 * self.outputs[~striped, k].mean())

  def test_stripe_unit_does_not_prefer_a_colour_or_background(self):
    # Contrast-normalised: its top images are not dominated by black-and-white stripes
    # or by the wavy water background.
    k = len(planted.COLOUR_NAMES)
    top = np.argsort(-self.outputs[:, k], kind="stable")[:100]
    colours = [o.colour for i in top for o in self.scenes[i].objects if o.texture == "striped"]
    backgrounds = [self.scenes[i].background for i in top]
    self.assertLess(max(colours.count(c) for c in set(colours)) / len(colours), 0.3)
    self.assertLess(max(backgrounds.count(b) for b in set(backgrounds)) / len(top), 0.45)

  def test_surface_units_measure_background_area(self):
    for j, surface in enumerate(planted.BACKGROUND_PALETTE):
      k = len(planted.COLOUR_NAMES) + 1 + j
      area = np.array([m[surface].mean() if s.background == surface else 0.0
                       for s, m in zip(self.scenes, self.masks)])
      self.assertGreater(np.corrcoef(self.outputs[:, k], area)[0, 1], 0.9, surface)
      self.assertLess(self.outputs[area == 0, k].max(), 0.05, surface)



@pytest.mark.slow
class TrainingDeterminismTest(absltest.TestCase):

  def test_short_training_runs_are_identical(self):
    from jaxdissect.models import targets  # pylint: disable=g-import-not-at-top
    from transformers import FlaxCLIPModel, FlaxResNetForImageClassification  # pylint: disable=g-import-not-at-top
    hashes = []
    for run in range(2):
      out = self.create_tempdir(f"run{run}").full_path
      # Half the captions match no image: the loss must stay finite without targets.
      train.train_clip(f"{out}/clip", steps=3, batch_size=16, num_images=64,
                       negative_fraction=0.5)
      train.train_target(f"{out}/resnet", steps=3, batch_size=16, num_images=64)
      clip = FlaxCLIPModel.from_pretrained(f"{out}/clip")
      resnet = FlaxResNetForImageClassification.from_pretrained(f"{out}/resnet")
      for leaf in jax.tree_util.tree_leaves(clip.params):
        self.assertTrue(np.all(np.isfinite(leaf)))
      hashes.append((targets.params_fingerprint(clip.params),
                     targets.params_fingerprint(resnet.params)))
    self.assertEqual(hashes[0], hashes[1])

  def test_main_chains_the_three_clip_stages(self):
    from transformers import FlaxCLIPModel  # pylint: disable=g-import-not-at-top
    out = self.create_tempdir().full_path
    train.main(["--out", out, "--only", "clip", "--clip_steps", "1",
                "--clip_negative_steps", "1", "--clip_shape_steps", "1",
                "--clip_images", "32", "--clip_batch_size", "8"])
    # Only the last stage is kept; it loads, with its tokenizer and preprocessing.
    self.assertEqual(os.listdir(out), ["clip"])
    FlaxCLIPModel.from_pretrained(f"{out}/clip")
    self.assertTrue(os.path.exists(f"{out}/clip/preprocessor_config.json"))
    self.assertTrue(os.path.exists(f"{out}/clip/tokenizer.json"))


class MeanOverDrawsTest(absltest.TestCase):

  @staticmethod
  def _record(method, layer, top1, top5=1.0, clip_cos=0.5):
    return {"method": method, "probe": "in_dist", "layer": layer, "top1": top1,
            "top5": top5, "clip_cos": clip_cos, "num_units": 8}

  def test_means_and_per_draw_values(self):
    draws = [[self._record("soft_wpmi", "fc", 1.0, clip_cos=1.0),
              self._record("wpmi", "fc", 0.5)],
             [self._record("soft_wpmi", "fc", 0.875, clip_cos=0.9),
              self._record("wpmi", "fc", 0.25)]]
    merged = benchmark.mean_over_draws(draws)
    self.assertEqual([(r["method"], r["layer"]) for r in merged],
                     [("soft_wpmi", "fc"), ("wpmi", "fc")])
    self.assertAlmostEqual(merged[0]["top1"], 0.9375)
    self.assertAlmostEqual(merged[0]["clip_cos"], 0.95)
    self.assertEqual(merged[0]["top1_per_draw"], [1.0, 0.875])
    self.assertEqual(merged[1]["top1_per_draw"], [0.5, 0.25])
    self.assertEqual(merged[1]["num_draws"], 2)
    self.assertEqual(merged[1]["num_units"], 8)
    # One draw: the record as it was, no per-draw lists.
    single = benchmark.mean_over_draws(draws[:1])
    self.assertEqual(single[0]["top1"], 1.0)
    self.assertNotIn("top1_per_draw", single[0])

  def test_mismatched_or_missing_draws_are_refused(self):
    with self.assertRaisesRegex(ValueError, "same"):
      benchmark.mean_over_draws([[self._record("soft_wpmi", "fc", 1.0)],
                                 [self._record("wpmi", "fc", 1.0)]])
    with self.assertRaisesRegex(ValueError, "at least one"):
      benchmark.mean_over_draws([])


if __name__ == "__main__":
  absltest.main()

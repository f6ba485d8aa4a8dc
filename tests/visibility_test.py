"""The concepts the probe shows (visibility.py): counts against a NumPy float64 ranking,
independent of blocks and memmaps; a planted world where a word no image shows tracks a
unit better than the shown words and the explanations still choose among the shown
ones; the filter's off switch, fallback and bad arguments."""
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from jaxdissect import config as config_lib
from jaxdissect import errors
from jaxdissect import explanations
from jaxdissect import linear
from jaxdissect import metrics
from jaxdissect import visibility


def _reference_counts(images, texts, rank):
  """Per concept, the images whose top `rank` concepts (float64 P, stable order: the
  lower index first among ties) hold it."""
  P = linear.normalise_rows(np.asarray(images, np.float64)) @ linear.normalise_rows(
      np.asarray(texts, np.float64)).T
  top = np.argsort(-P, axis=1, kind="stable")[:, :rank]
  return np.bincount(top.ravel(), minlength=len(texts))


def _planted_world(seed=0, num_images=3000, dim=24):
  """Images that show 6 concepts (the first 6 axes, each present or not); concept 6 is
  a word no image shows (far from every image, but its column tracks concept 0 and
  concept 1 together); unit 0 = presence of concept 0 + presence of concept 1."""
  rng = np.random.default_rng(seed)
  presence = rng.random((num_images, 6)) < 0.3
  images = np.zeros((num_images, dim))
  images[:, :6] = presence * 3.0
  images[:, 6:] = rng.normal(size=(num_images, dim - 6)) * 0.3
  images[:, 7] += 4.0  # every image: a shared offset, so the rank is about content
  texts = np.zeros((7, dim))
  texts[np.arange(6), np.arange(6)] = 1.0
  texts[:, 7] = 0.5
  # The word nothing shows: far from every image (negative on the shared offset), its
  # column still rises with concepts 0 and 1.
  texts[6, 0] = texts[6, 1] = 1.0
  texts[6, 7] = -6.0
  activations = (presence[:, 0].astype(float) + presence[:, 1]
                 + 0.05 * rng.normal(size=num_images))[:, None]
  return images.astype(np.float32), texts.astype(np.float32), activations


class CountsTest(parameterized.TestCase):

  @parameterized.parameters((1, None), (3, None), (5, 7), (40, 64), (40, 1000))
  def test_equal_a_float64_ranking_whatever_the_blocks(self, rank, block):
    rng = np.random.default_rng(rank)
    images = rng.normal(size=(301, 16)).astype(np.float32)
    texts = rng.normal(size=(40, 16)).astype(np.float32)
    got = visibility.images_showing(images, texts, rank, block_images=block)
    np.testing.assert_array_equal(got, _reference_counts(images, texts, rank))
    self.assertEqual(int(got.sum()), 301 * rank)

  def test_a_memmap_is_read_the_same(self):
    rng = np.random.default_rng(3)
    images = rng.normal(size=(200, 8)).astype(np.float32)
    texts = rng.normal(size=(30, 8)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "images.npy")
      np.save(path, images)
      mapped = np.load(path, mmap_mode="r")
      np.testing.assert_array_equal(
          visibility.images_showing(mapped, texts, 5, block_images=33),
          _reference_counts(images, texts, 5))

  def test_the_rank_scales_with_the_concepts(self):
    self.assertEqual(visibility.visible_rank(56), 5)
    self.assertEqual(visibility.visible_rank(20000), 200)
    self.assertEqual(visibility.visible_rank(3), 3)
    self.assertEqual(visibility.visible_rank(1000, 0.0), 5)


class PlantedWorldTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.images, self.texts, self.activations = _planted_world()
    self.shown = visibility.concept_visibility(self.images, self.texts)

  def test_the_word_no_image_shows_is_not_visible(self):
    np.testing.assert_array_equal(self.shown.visible, [True] * 6 + [False])
    self.assertEqual(self.shown.images_showing[6], 0)
    self.assertGreater(self.shown.images_showing[:6].min(), 100)
    self.assertFalse(self.shown.fallback)
    lines = self.shown.to_csv([f"c{i}" for i in range(7)]).splitlines()
    self.assertEqual(lines[0], "concept,images_showing,visible")
    self.assertEqual(lines[7], "c6,0,false")
    self.assertTrue(lines[1].endswith(",true"))

  def test_the_explanations_choose_among_the_shown_concepts(self):
    P = linear.normalise_rows(self.images) @ linear.normalise_rows(self.texts).T
    corr = metrics.pearson_columns(self.activations, P)[0]
    # The planted trap: the word nothing shows tracks the unit best.
    self.assertEqual(int(np.argmax(corr)), 6)
    usable = np.ones(1, bool)
    unrestricted = explanations.layer_explanations(
        self.activations, self.images, self.texts, np.array([6]), usable, seed=0,
        max_concepts=2)
    self.assertEqual(unrestricted.correlation_label[0], 6)
    got = explanations.layer_explanations(
        self.activations, self.images, self.texts, np.array([6]), usable, seed=0,
        max_concepts=2, visible=self.shown.visible, beam=3,
        concepts=[f"c{i}" for i in range(7)],
        weights=np.random.default_rng(1).poisson(1.0, (4, len(self.images))))
    self.assertIn(got.correlation_label[0], (0, 1))
    self.assertIn(got.fit_correlation_label[0], (0, 1))
    self.assertEqual(sorted(got.linear.concept_ids[0]), [0, 1])
    self.assertNotIn("c6", got.compositions.expression[0])
    np.testing.assert_array_equal(got.selection_share[0], 1.0)
    # Exactly the unrestricted fit over the shown columns alone.
    alone = explanations.layer_explanations(
        self.activations, self.images, self.texts[:6], np.array([0]), usable, seed=0,
        max_concepts=2)
    np.testing.assert_array_equal(got.linear.concept_ids, alone.linear.concept_ids)
    np.testing.assert_allclose(got.simulation, alone.simulation, rtol=1e-12)


class OffFallbackAndBadInputTest(absltest.TestCase):

  def test_zero_images_turns_the_filter_off(self):
    images, texts, _ = _planted_world()
    off = visibility.concept_visibility(images, texts, min_images=0)
    self.assertTrue(off.visible.all())
    self.assertFalse(off.fallback)

  def test_no_concept_shown_often_enough_falls_back_to_all(self):
    images, texts, _ = _planted_world(num_images=40)
    with self.assertLogs(level="WARNING") as logs:
      shown = visibility.concept_visibility(images, texts, min_images=1000)
    self.assertTrue(shown.fallback)
    self.assertTrue(shown.visible.all())
    self.assertIn("visible_min_images", logs.output[0])

  def test_bad_arguments(self):
    images, texts, _ = _planted_world(num_images=10)
    with self.assertRaisesRegex(ValueError, "min_images"):
      visibility.concept_visibility(images, texts, min_images=-1)
    with self.assertRaisesRegex(ValueError, "top_share"):
      visibility.concept_visibility(images, texts, top_share=1.5)
    with self.assertRaisesRegex(ValueError, "rank"):
      visibility.images_showing(images, texts, 8)
    with self.assertRaisesRegex(ValueError, "allowed"):
      linear.concept_geometry(texts, np.eye(texts.shape[1]), np.ones(3, bool))

  def test_config_refuses_bad_settings(self):
    for field, value in (("visible_top_share", 2.0), ("visible_min_images", -1)):
      config = config_lib.get_base_config()
      config.clip_model = "x"
      config[field] = value
      with self.assertRaisesRegex(errors.UserError, field):
        config_lib.validate(config)


if __name__ == "__main__":
  absltest.main()

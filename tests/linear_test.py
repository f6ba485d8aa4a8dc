"""Linear explanations from moments, against an explicit-P NumPy float64 reference, and
planted units; the held-out p-values against explicit shuffles; Benjamini-Hochberg."""
from unittest import mock

from absl.testing import absltest
import numpy as np

from jaxdissect import explanations
from jaxdissect import linear
from jaxdissect import metrics


def _embeddings(num_images=600, num_concepts=40, dim=16, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(num_images, dim)).astype(np.float32),
          rng.normal(size=(num_concepts, dim)).astype(np.float32))


def _p_matrix(images, texts):
  return linear.normalise_rows(images) @ linear.normalise_rows(texts).T


def _reference_omp(P, a, steps):
  """Orthogonal matching pursuit on explicit columns, float64: (ids in the order
  chosen, weights), with the same relative ridge as linear.least_squares."""
  Pc = P - P.mean(axis=0)
  ac = a - a.mean()
  n = len(a)
  std = np.sqrt(np.mean(Pc ** 2, axis=0))
  chosen, w = [], np.zeros(0)
  for _ in range(steps):
    residual = ac - Pc[:, chosen] @ w
    score = np.abs(Pc.T @ residual / n) / std
    score[chosen] = -np.inf
    chosen.append(int(np.argmax(score)))
    cols = Pc[:, chosen]
    gram = cols.T @ cols / n
    ridge = linear.RIDGE * np.trace(gram) / len(chosen)
    w = np.linalg.solve(gram + ridge * np.eye(len(chosen)), cols.T @ ac / n)
  return np.array(chosen), w


class MomentsTest(absltest.TestCase):

  def test_equal_direct_covariances_and_chunking_changes_nothing(self):
    images, _ = _embeddings()
    rng = np.random.default_rng(1)
    acts = (rng.normal(size=(600, 5)) + 1e4).astype(np.float64)  # a large mean
    held = linear.holdout_mask(600, 0.25, 0)
    fit, test, both = linear.image_moments(images, acts, held)
    normed = linear.normalise_rows(images)
    for moments, rows in ((fit, ~held), (test, held), (both, np.ones(600, bool))):
      x, a = normed[rows], acts[rows]
      self.assertEqual(moments.count, rows.sum())
      np.testing.assert_allclose(moments.image_cov, np.cov(x.T, bias=True), atol=1e-12)
      np.testing.assert_allclose(moments.activation_var, a.var(axis=0), rtol=1e-9)
      cross = (a - a.mean(0)).T @ (x - x.mean(0)) / len(x)
      np.testing.assert_allclose(moments.cross, cross, atol=1e-10)
    with mock.patch.object(linear, "CHUNK_BYTES", 8 * 21 * 7):  # 7 images a chunk
      chunked = linear.image_moments(images, acts, held)
    for one, other in zip((fit, test, both), chunked):
      np.testing.assert_allclose(other.image_cov, one.image_cov, atol=1e-12)
      np.testing.assert_allclose(other.cross, one.cross, atol=1e-9)

  def test_resampled_moments_equal_the_repeated_images(self):
    images, _ = _embeddings(num_images=300)
    acts = np.random.default_rng(14).normal(size=(300, 4)) + 50.0
    rows = linear.holdout_mask(300, 0.25, 0)  # the held-out rows, as any subset
    weights = np.random.default_rng(15).poisson(1.0, (3, 300))
    with mock.patch.object(linear, "CHUNK_BYTES", 8 * 20 * 11):  # 11 images a chunk
      got = linear.resampled_moments(images, acts, rows, weights)
    for resample, moments in enumerate(got):
      repeated = np.repeat(np.flatnonzero(rows), weights[resample, rows])
      direct = linear.image_moments(images[repeated], acts[repeated])[0]
      self.assertEqual(moments.count, len(repeated))
      for field in ("image_cov", "cross", "activation_var", "image_mean"):
        np.testing.assert_allclose(getattr(moments, field), getattr(direct, field),
                                   rtol=1e-9, atol=1e-12, err_msg=field)

  def test_holdout_mask(self):
    mask = linear.holdout_mask(1000, 0.25, 3)
    self.assertEqual(mask.sum(), 250)
    np.testing.assert_array_equal(mask, linear.holdout_mask(1000, 0.25, 3))
    self.assertFalse(np.array_equal(mask, linear.holdout_mask(1000, 0.25, 4)))
    self.assertEqual(linear.holdout_mask(2, 0.01, 0).sum(), 1)
    self.assertEqual(linear.holdout_mask(2, 0.99, 0).sum(), 1)
    for bad in (0.0, 1.0, -0.5):
      with self.assertRaisesRegex(ValueError, "held-out fraction"):
        linear.holdout_mask(10, bad, 0)

  def test_mismatched_rows_are_refused(self):
    images, _ = _embeddings()
    with self.assertRaisesRegex(ValueError, "599 image embeddings but 600 rows"):
      linear.image_moments(images[:599], np.zeros((600, 2)))


class CorrelationLabelTest(absltest.TestCase):

  def test_equals_the_argmax_of_pearson_over_p(self):
    images, texts = _embeddings(num_images=300, num_concepts=40)
    P = _p_matrix(images, texts)
    rng = np.random.default_rng(2)
    activations = rng.normal(size=(300, 6)).astype(np.float32)
    activations[:, 1] += 3 * P[:, 17].astype(np.float32)  # planted: concept 17
    activations[:, 4] = 2.0  # constant
    usable = np.array([True, True, True, True, True, False])
    moments = linear.image_moments(images, activations)[2]
    got = linear.correlation_labels(moments, texts, usable)
    expected = metrics.pearson_columns(activations, P).argmax(axis=1)
    np.testing.assert_array_equal(got[:4], expected[:4])
    self.assertEqual(got[1], 17)
    np.testing.assert_array_equal(got[4:], [-1, -1])


class FitTest(absltest.TestCase):

  def test_equals_explicit_matching_pursuit(self):
    images, texts = _embeddings()
    P = _p_matrix(images, texts)
    rng = np.random.default_rng(4)
    acts = rng.normal(size=(600, 7)) + P[:, :7] @ rng.normal(size=(7, 7)) * 5
    moments = linear.image_moments(images, acts)[0]
    got = linear.fit(moments, texts, np.ones(7, bool), 4)
    for unit in range(7):
      ids, w = _reference_omp(P, acts[:, unit], 4)
      order = np.argsort(-np.abs(w), kind="stable")
      np.testing.assert_array_equal(got.concept_ids[unit], ids[order])
      np.testing.assert_allclose(got.weights[unit], w[order], rtol=1e-7, atol=1e-9)
      # The direction predicts exactly sum_c w_c P[:, c] (up to its mean).
      predicted = linear.normalise_rows(images) @ got.directions[unit]
      np.testing.assert_allclose(predicted - predicted.mean(),
                                 (P[:, ids] @ w) - (P[:, ids] @ w).mean(), atol=1e-9)

  def test_planted_signed_combination_is_recovered(self):
    images, texts = _embeddings(num_images=2000, num_concepts=60, dim=32, seed=5)
    P = _p_matrix(images, texts)
    rng = np.random.default_rng(6)
    acts = np.stack([3 * P[:, 11] - 2 * P[:, 40] + 1 * P[:, 7],
                     -4 * P[:, 3] + 0.5 * rng.normal(size=2000) * P[:, 3].std()], 1)
    acts[:, 0] += 0.01 * rng.normal(size=2000) * acts[:, 0].std()
    got = linear.fit(linear.image_moments(images, acts)[0], texts, np.ones(2, bool), 5)
    np.testing.assert_array_equal(got.concept_ids[0, :3], [11, 40, 7])
    np.testing.assert_allclose(got.weights[0, :3], [3, -2, 1], rtol=0.05)
    self.assertEqual(got.concept_ids[1, 0], 3)
    self.assertLess(got.weights[1, 0], 0)

  def test_unit_blocks_and_unusable_units(self):
    images, texts = _embeddings()
    acts = np.random.default_rng(7).normal(size=(600, 9))
    acts[:, 2] = 1.5  # constant
    usable = np.ones(9, bool)
    usable[5] = False
    moments = linear.image_moments(images, acts)[0]
    whole = linear.fit(moments, texts, usable, 3)
    with mock.patch.object(linear, "BLOCK_BYTES", 4 * 40 * 2):  # 2 units a block
      blocked = linear.fit(moments, texts, usable, 3)
    np.testing.assert_array_equal(blocked.concept_ids, whole.concept_ids)
    np.testing.assert_array_equal(blocked.weights, whole.weights)
    for unit in (2, 5):
      np.testing.assert_array_equal(whole.concept_ids[unit], [-1, -1, -1])
      np.testing.assert_array_equal(whole.weights[unit], [0, 0, 0])
    self.assertTrue((whole.concept_ids[[0, 1, 3, 4, 6, 7, 8]] >= 0).all())

  def test_more_concepts_than_exist_and_bad_arguments(self):
    images, texts = _embeddings(num_concepts=3)
    acts = np.random.default_rng(8).normal(size=(600, 2))
    got = linear.fit(linear.image_moments(images, acts)[0], texts, np.ones(2, bool), 5)
    self.assertEqual(sorted(got.concept_ids[0, :3]), [0, 1, 2])
    np.testing.assert_array_equal(got.concept_ids[:, 3:], -1)
    with self.assertRaisesRegex(ValueError, "max_concepts must be at least 1"):
      linear.fit(linear.image_moments(images, acts)[0], texts, np.ones(2, bool), 0)

  def test_simulation_equals_pearson_on_the_images(self):
    images, texts = _embeddings()
    P = _p_matrix(images, texts)
    acts = np.random.default_rng(9).normal(size=(600, 3)) + P[:, :3] * 10
    held = linear.holdout_mask(600, 0.3, 1)
    fit, test, _ = linear.image_moments(images, acts, held)
    got = linear.fit(fit, texts, np.ones(3, bool), 2)
    simulated = linear.simulation(got.directions, test)
    for unit in range(3):
      ids, w = got.concept_ids[unit], got.weights[unit]
      prediction = P[held][:, ids] @ w
      self.assertAlmostEqual(simulated[unit],
                             np.corrcoef(prediction, acts[held, unit])[0, 1], places=10)


class SignificanceTest(absltest.TestCase):

  def test_p_values_match_explicit_shuffles(self):
    rng = np.random.default_rng(10)
    n = 150
    for predictor, activation in (
        (rng.normal(size=n), rng.normal(size=n)),
        # Sparse, heavy-tailed activations as ReLU units have.
        (rng.normal(size=n), np.maximum(rng.standard_t(3, size=n), 0) ** 2)):
      activation = activation + 0.25 * predictor * activation.std()
      r = np.corrcoef(predictor, activation)[0, 1]
      shuffled = np.array([np.corrcoef(predictor, rng.permutation(activation))[0, 1]
                           for _ in range(20000)])
      expected = (1 + np.sum(shuffled >= r)) / 20001
      got = linear.correlation_p_values(np.array([r]), n)[0]
      self.assertLess(abs(got - expected), 0.01 + 0.2 * expected, (r, got, expected))
    np.testing.assert_array_equal(np.isnan(linear.correlation_p_values(
        np.array([np.nan, 0.1]), 100)), [True, False])
    self.assertAlmostEqual(linear.correlation_p_values(np.array([0.0]), 100)[0], 0.5)

  def test_benjamini_hochberg(self):
    q = linear.benjamini_hochberg(np.array([0.01, 0.04, np.nan, 0.03, 0.005]))
    np.testing.assert_allclose(q[[0, 1, 3, 4]], [0.02, 0.04, 0.04, 0.02])
    self.assertTrue(np.isnan(q[2]))
    # Against the definition: min over j >= i of p_(j) m / j.
    p = np.random.default_rng(11).random(50) ** 3
    order = np.argsort(p)
    expected = np.empty(50)
    for i, unit in enumerate(order):
      expected[unit] = min(1.0, min(p[order[j]] * 50 / (j + 1) for j in range(i, 50)))
    np.testing.assert_allclose(linear.benjamini_hochberg(p), expected)


class LayerExplanationsTest(absltest.TestCase):

  def test_planted_units_explained_noise_not_and_the_recommendation(self):
    images, texts = _embeddings(num_images=2000, num_concepts=50, dim=32, seed=12)
    P = _p_matrix(images, texts)
    rng = np.random.default_rng(13)
    noise = rng.normal(size=(2000, 40))
    planted = np.stack([P[:, c] + 0.3 * P[:, c].std() * rng.normal(size=2000)
                        for c in range(8)], 1)
    acts = np.concatenate([planted, noise], axis=1)
    usable = np.ones(48, bool)
    usable[47] = False
    # The run's labels: right for the planted units but unit 0, wrong (concept 49).
    labels = np.full(48, 49)
    labels[1:8] = np.arange(1, 8)
    got = explanations.layer_explanations(acts, images, texts, labels, usable, seed=0)
    self.assertTrue(got.explained[:8].all())
    self.assertLessEqual(got.explained[8:].sum(), 2)  # BH at 5%: about 0 of 39
    self.assertFalse(got.explained[47])
    self.assertTrue(np.isnan(got.simulation[47]))
    np.testing.assert_array_equal(got.correlation_label[:8], np.arange(8))
    self.assertEqual(got.held_out, 500)
    self.assertGreater(got.simulation[:8].min(), 0.9)
    self.assertAlmostEqual(got.label_simulation[3], got.correlation_simulation[3])
    summary = got.summary()
    self.assertEqual(summary["explained_units"], int(got.explained.sum()))
    self.assertEqual(summary["recommended_label"], explanations.CORRELATION)
    self.assertEqual(summary["best_explanation"], explanations.LINEAR)
    self.assertEqual(summary["held_out_images"], 500)
    # Resampling the fit images: the planted units keep their concept every time.
    weights = np.random.default_rng(16).poisson(1.0, (8, 2000))
    resampled = explanations.layer_explanations(acts, images, texts, labels, usable,
                                                seed=0, weights=weights)
    np.testing.assert_array_equal(resampled.linear.concept_ids, got.linear.concept_ids)
    np.testing.assert_array_equal(resampled.selection_share[:8, 0], 1.0)
    self.assertLess(np.nanmean(resampled.selection_share[8:47]), 0.6)
    self.assertTrue(np.isnan(resampled.selection_share[47]).all())
    self.assertEqual(resampled.summary()["first_concept_selection_share"],
                     float(np.nanmean(resampled.selection_share[:, 0])))
    # The compositional labels' shares come from the same resamples.
    composed = explanations.layer_explanations(
        acts, images, texts, labels, usable, seed=0, weights=weights, beam=3,
        concepts=[f"c{i}" for i in range(len(texts))])
    shares = composed.compositions.selection_share
    np.testing.assert_array_equal(shares[:8], 1.0)
    self.assertTrue(np.isnan(shares[47]))
    self.assertEqual(composed.summary()["compositional_selection_share"],
                     float(np.nanmean(shares)))
    # With the right label for every unit, both single labels simulate alike; the
    # run's label wins the tie.
    again = explanations.layer_explanations(planted, images, texts, np.arange(8),
                                            np.ones(8, bool), seed=0)
    self.assertEqual(again.summary()["recommended_label"], explanations.LABEL)


if __name__ == "__main__":
  absltest.main()

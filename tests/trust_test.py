"""Per-unit AUC and permutation p-values against references and planted units."""

from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import ml_collections
import numpy as np

from jaxdissect import similarity
from jaxdissect import trust


def _embeddings(num_images=400, num_concepts=12, dim=16, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(num_images, dim)).astype(np.float32)
  texts = rng.normal(size=(num_concepts, dim)).astype(np.float32)
  return images, texts


def _p_matrix(images, texts):
  images = images / np.linalg.norm(images, axis=1, keepdims=True)
  texts = texts / np.linalg.norm(texts, axis=1, keepdims=True)
  return images.astype(np.float64) @ texts.T.astype(np.float64)


class AucTest(absltest.TestCase):

  def test_equals_pairwise_count_with_ties(self):
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, size=200).astype(float)  # many ties
    positive = rng.random(200) < 0.2
    pos, neg = scores[positive], scores[~positive]
    pairs = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    self.assertAlmostEqual(trust.auc(scores, positive), pairs.mean(), places=12)

  def test_perfect_reversed_and_degenerate(self):
    scores = np.arange(10.0)
    self.assertEqual(trust.auc(scores, scores >= 7), 1.0)
    self.assertEqual(trust.auc(-scores, scores >= 7), 0.0)
    self.assertTrue(np.isnan(trust.auc(scores, np.zeros(10, bool))))


class PriorNullTest(parameterized.TestCase):

  @parameterized.parameters("soft_wpmi", "wpmi")
  def test_null_score_equals_rescoring_the_shuffled_layer(self, fn_name):
    # A shuffled column's score, computed from its top images alone, must equal the
    # similarity function run on the whole layer with that column shuffled.
    images, texts = _embeddings()
    p = _p_matrix(images, texts)
    rng = np.random.default_rng(2)
    activations = rng.normal(size=(len(images), 6)).astype(np.float32)
    params = trust.function_defaults(fn_name)
    fn = similarity.SIMILARITY_FUNCTIONS[fn_name]
    top_k = params["top_k"]
    _, log_l = fn(p.astype(np.float32), activations, return_log_likelihood=True)
    log_l = np.asarray(log_l, np.float64)
    unit, concept = 3, 5
    log_probs = trust.log_softmax_columns(images, texts, np.array([concept]),
                                          params["a"])[:, 0]
    shuffled_sets, expected = [], []
    for _ in range(3):
      permuted = activations.copy()
      permuted[:, unit] = rng.permutation(activations[:, unit])
      shuffled_sets.append(np.argsort(-permuted[:, unit], kind="stable")[:top_k])
      expected.append(np.asarray(fn(p.astype(np.float32), permuted))[unit, concept])
    score, null = trust.prior_null_scores(log_probs, log_l[:, concept], unit,
                                          np.stack(shuffled_sets), fn_name, params)
    observed = np.asarray(fn(p.astype(np.float32), activations))[unit, concept]
    self.assertAlmostEqual(score, observed, delta=2e-3 * max(1.0, abs(observed)))
    np.testing.assert_allclose(null, expected, rtol=1e-3, atol=2e-3)


class LogSoftmaxColumnsTest(absltest.TestCase):

  def test_equal_the_float64_log_softmax_in_any_image_chunks(self):
    images, texts = _embeddings(num_images=300, num_concepts=40)
    logits = 10.0 * _p_matrix(images, texts)
    top = logits.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    expected = logits - lse[:, None]
    ids = np.array([3, 17, 39])
    # 8-byte x 40-concept rows: 64 KiB chunks of 204 images, so 300 take two.
    with mock.patch.object(trust, "_BLOCK_BYTES", 64 * 1024):
      normalisers = trust.image_log_normalisers(images, texts, 10.0)
      shared = trust.log_softmax_columns(images, texts, ids, 10.0, normalisers)
      alone = trust.log_softmax_columns(images, texts, ids, 10.0)
    # float32 products, float64 sums: within a few float32 ulps of the logits (|a P| <= 10).
    np.testing.assert_allclose(normalisers, lse, rtol=0, atol=1e-5)
    np.testing.assert_allclose(shared, expected[:, ids], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(shared, alone)

  def test_shared_normalisers_give_the_same_p_values(self):
    images, texts = _embeddings(num_images=500, num_concepts=30)
    rng = np.random.default_rng(5)
    activations = rng.normal(size=(500, 5)).astype(np.float32)
    top_ids = np.argsort(-activations, axis=0, kind="stable")[:128].T
    args = ("layer", "soft_wpmi", activations, images, texts, np.array([0, 4, 9, 4, 2]),
            np.ones(5, bool), top_ids)
    alone = trust.unit_trust(*args, num_permutations=40)
    shared = trust.unit_trust(*args, num_permutations=40,
                              log_normalisers=trust.image_log_normalisers(images, texts,
                                                                          10.0))
    np.testing.assert_array_equal(alone.p_value, shared.p_value)
    np.testing.assert_array_equal(alone.auc, shared.auc)


class ComputesStabilityTest(absltest.TestCase):

  def test_only_for_prior_functions_with_resamples(self):
    def config(fn, **fields):
      return ml_collections.ConfigDict(dict(similarity_fn=fn, **fields))
    self.assertTrue(trust.computes_stability(config("soft_wpmi", trust_bootstrap=20)))
    self.assertTrue(trust.computes_stability(config("wpmi", trust_bootstrap=2)))
    self.assertFalse(trust.computes_stability(config("soft_wpmi", trust_bootstrap=0)))
    self.assertFalse(trust.computes_stability(config("cos_similarity", trust_bootstrap=20)))
    # A run written before trust_bootstrap existed (the evaluate CLI reads its config).
    self.assertFalse(trust.computes_stability(config("soft_wpmi")))


class UnitTrustTest(parameterized.TestCase):

  @parameterized.parameters("soft_wpmi", "wpmi", "cos_similarity",
                            "cos_similarity_cubed", "rank_reorder")
  def test_planted_unit_is_trusted_and_noise_is_not(self, fn_name):
    images, texts = _embeddings(num_images=2000)
    p = _p_matrix(images, texts)
    rng = np.random.default_rng(3)
    # Unit 0 tracks concept 4; units 1..5 are noise; unit 6 is dead.
    activations = rng.normal(size=(len(images), 7)).astype(np.float32)
    activations[:, 0] = p[:, 4] * 10 + 0.1 * rng.normal(size=len(images))
    activations[:, 6] = 1.0
    labels = np.array([4, 0, 1, 2, 3, 5, 0])
    usable = np.array([True] * 6 + [False])
    top_ids = np.argsort(-activations, axis=0, kind="stable")[:128].T
    result = trust.unit_trust("layer", fn_name, activations, images, texts, labels,
                              usable, top_ids, num_permutations=50)
    self.assertGreater(result.auc[0], 0.95)
    self.assertAlmostEqual(result.p_value[0], 1 / 51)
    self.assertTrue(np.all(np.abs(result.auc[1:6] - 0.5) < 0.15), result.auc)
    self.assertGreater(np.median(result.p_value[1:6]), 0.05)
    self.assertTrue(np.isnan(result.auc[6]) and np.isnan(result.p_value[6]))

  def test_seeded_per_unit(self):
    images, texts = _embeddings(num_images=500)
    rng = np.random.default_rng(4)
    activations = rng.normal(size=(500, 4)).astype(np.float32)
    top_ids = np.argsort(-activations, axis=0, kind="stable")[:128].T
    args = ("layer", "soft_wpmi", activations, images, texts, np.array([0, 1, 2, 3]))
    whole = trust.unit_trust(*args, np.ones(4, bool), top_ids, num_permutations=30)
    again = trust.unit_trust(*args, np.ones(4, bool), top_ids, num_permutations=30)
    np.testing.assert_array_equal(whole.p_value, again.p_value)
    other_seed = trust.unit_trust(*args, np.ones(4, bool), top_ids, num_permutations=30,
                                  seed=1)
    self.assertFalse(np.array_equal(whole.p_value, other_seed.p_value))


if __name__ == "__main__":
  absltest.main()

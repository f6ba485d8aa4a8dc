"""Label stability (jaxdissect/stability.py) against a direct NumPy bootstrap, on planted
and noise units, and its pieces on hand-made cases."""
from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from jaxdissect import metrics
from jaxdissect import registry
from jaxdissect import similarity
from jaxdissect import stability
from jaxdissect import streaming
from jaxdissect import topk as topk_lib


def _direct_labels(P: np.ndarray, activations: np.ndarray, name: str) -> np.ndarray:
  """float64 (soft-)WPMI labels of an explicit probe set (rows may repeat)."""
  params = registry.SIMILARITY[name].defaults
  top_k = params["top_k"]
  logits = params["a"] * P
  logits -= logits.max(axis=1, keepdims=True)
  S = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  # Stable sort: equal activations (copies of one image, or ties) keep row order.
  top = np.argsort(-activations, axis=0, kind="stable")[:top_k].T
  if name == "soft_wpmi":
    p = params["p_start"] - np.arange(top_k) / top_k * (params["p_start"] - params["p_end"])
    L = np.log(1 + p[None, :, None] * (S[top] - 1) + params["min_prob"]).sum(axis=1)
  else:
    L = np.log(S[top] + params["min_prob"]).sum(axis=1)
  peak = L.max(axis=0)
  prior = peak + np.log(np.exp(L - peak).sum(axis=0)) - np.log(L.shape[0])
  return np.argmax(L - params["lam"] * prior, axis=1)


def _direct_stability(P, activations, name, num_resamples, seed):
  """The bootstrap written out: each resample as an explicit list of images (image i
  repeated w[r, i] times), relabelled from scratch; agreement over pairs."""
  weights = stability.poisson_weights(len(P), num_resamples, seed)
  labels = []
  for r in range(num_resamples):
    rows = np.repeat(np.arange(len(P)), weights[r])
    labels.append(_direct_labels(P[rows], activations[rows], name))
  labels = np.stack(labels)
  same = sum((labels[a] == labels[b]).astype(int) for a in range(num_resamples)
             for b in range(num_resamples) if a != b)
  return same / (num_resamples * (num_resamples - 1)), labels


def _world(num_images=400, num_concepts=30, dim=16, num_units=12, seed=1):
  """Random embeddings; units 0-5 respond to concept u with growing strength (from
  barely to clearly), the others are noise."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(num_images, dim)).astype(np.float32)
  texts = rng.normal(size=(num_concepts, dim)).astype(np.float32)
  P = (images / np.linalg.norm(images, axis=1, keepdims=True)).astype(np.float64) @ (
      texts / np.linalg.norm(texts, axis=1, keepdims=True)).T.astype(np.float64)
  activations = rng.normal(size=(num_images, num_units))
  for unit in range(6):
    activations[:, unit] += (unit + 1) * 0.5 * P[:, unit]
  return images, texts, P, activations.astype(np.float32)


def _top_rows(activations: np.ndarray, name: str) -> np.ndarray:
  depth = stability.depth(name)
  return topk_lib.from_activations(activations, depth).ids[:depth].T.astype(np.int64)


class StabilityTest(parameterized.TestCase):

  @parameterized.parameters("soft_wpmi", "wpmi")
  def test_equals_a_direct_numpy_bootstrap(self, name):
    images, texts, P, activations = _world()
    expected, expected_labels = _direct_stability(P, activations.astype(np.float64),
                                                  name, 10, 3)
    got = stability.layer_stability(name, images, texts, _top_rows(activations, name),
                                    np.ones(activations.shape[1], bool),
                                    num_resamples=10, seed=3)
    np.testing.assert_array_equal(got.labels, expected_labels)
    np.testing.assert_allclose(got.stability, expected, rtol=0, atol=1e-12)
    # The case is not degenerate: stable and unstable units both occur.
    self.assertGreater(np.max(expected), 0.9)
    self.assertLess(np.min(expected), 0.3)

  @parameterized.parameters("soft_wpmi", "wpmi")
  def test_layers_in_one_pass_equal_a_direct_numpy_bootstrap_of_each(self, name):
    # Three layers of 5, 7 and 6 units, each relabelled with the prior over its own
    # units, in one pass over the concepts.
    images, texts, P, activations = _world()
    layers = [activations[:, :5], activations[:, 5:], activations[:, ::2]]
    got = stability.layers_stability(
        name, images, texts, [_top_rows(a, name) for a in layers],
        [np.ones(a.shape[1], bool) for a in layers], num_resamples=10, seed=3)
    self.assertLen(got, 3)
    for layer, layer_got in zip(layers, got):
      expected, expected_labels = _direct_stability(P, layer.astype(np.float64), name,
                                                    10, 3)
      np.testing.assert_array_equal(layer_got.labels, expected_labels)
      np.testing.assert_allclose(layer_got.stability, expected, rtol=0, atol=1e-12)
    with self.assertRaisesRegex(ValueError, "same number of resamples"):
      rows = [stability.resampled_top_rows(_top_rows(a, name),
                                           stability.poisson_weights(len(images), r, 0),
                                           similarity.default_top_k(name))
              for a, r in zip(layers[:2], (3, 4))]
      streaming.layers_resampled_labels(name, images, texts, rows)

  def test_planted_unit_is_stable_and_noise_unit_is_not(self):
    rng = np.random.default_rng(0)
    num_images, num_concepts = 600, 20
    # Concept c is in an image with probability 0.2; CLIP's image embedding is the sum
    # of its concepts' text embeddings plus noise.
    texts = np.eye(num_concepts, dtype=np.float32)
    present = rng.random((num_images, num_concepts)) < 0.2
    images = (present + 0.3 * rng.normal(size=present.shape)).astype(np.float32)
    planted = present[:, :4] + 0.1 * rng.random((num_images, 4))
    noise = rng.random((num_images, 4))
    activations = np.concatenate([planted, noise], axis=1).astype(np.float32)
    got = stability.layer_stability("soft_wpmi", images, texts,
                                    _top_rows(activations, "soft_wpmi"),
                                    np.ones(8, bool), num_resamples=20)
    np.testing.assert_array_equal(got.stability[:4], 1.0)
    self.assertLess(np.max(got.stability[4:]), 0.5)
    shares = got.shares(np.arange(8)[:, None])[:, 0]
    np.testing.assert_array_equal(shares[:4], 1.0)

  def test_unusable_units_get_nan(self):
    images, texts, _, activations = _world()
    usable = np.ones(activations.shape[1], bool)
    usable[2] = False
    got = stability.layer_stability("soft_wpmi", images, texts,
                                    _top_rows(activations, "soft_wpmi"), usable,
                                    num_resamples=4)
    self.assertTrue(np.isnan(got.stability[2]))
    self.assertTrue(np.isnan(got.shares(np.zeros((12, 2), int))[2]).all())
    self.assertFalse(np.isnan(np.delete(got.stability, 2)).any())

  def test_resampled_top_rows_follow_the_copies(self):
    top_rows = np.array([[5, 3, 9, 1], [0, 1, 2, 3]])
    weights = np.zeros((2, 10), np.int32)
    weights[0, [3, 9, 1]] = [2, 1, 1]  # image 5 drawn 0 times
    weights[1, [5, 2]] = [1, 1]  # too few copies: the last image fills the rest
    rows = stability.resampled_top_rows(top_rows, weights, 3)
    np.testing.assert_array_equal(rows[0], [[3, 3, 9], [1, 3, 3]])
    np.testing.assert_array_equal(rows[1], [[5, 1, 1], [2, 3, 3]])

  def test_pairwise_agreement_counts_distinct_pairs(self):
    labels = np.array([[0, 4], [0, 4], [1, 4]])
    np.testing.assert_allclose(stability.pairwise_agreement(labels), [1 / 3, 1.0])

  def test_weights_depend_on_seed_and_resample_only(self):
    a = stability.poisson_weights(1000, 3, 7)
    np.testing.assert_array_equal(stability.poisson_weights(1000, 5, 7)[:3], a)
    self.assertFalse(np.array_equal(stability.poisson_weights(1000, 3, 8), a))
    self.assertAlmostEqual(float(a.mean()), 1.0, delta=0.1)

  def test_bad_input_is_a_clear_error(self):
    images, texts, _, activations = _world()
    top_rows = _top_rows(activations, "soft_wpmi")
    usable = np.ones(12, bool)
    with self.assertRaisesRegex(ValueError, "not 'cos_similarity'"):
      stability.layer_stability("cos_similarity", images, texts, top_rows, usable)
    with self.assertRaisesRegex(ValueError, "at least 2 resamples"):
      stability.layer_stability("soft_wpmi", images, texts, top_rows, usable,
                                num_resamples=1)
    with self.assertRaisesRegex(ValueError, "top 200 images"):
      stability.layer_stability("soft_wpmi", images, texts, top_rows[:, :50], usable)

  def test_summary_reports_mean_and_stable_share(self):
    class Trust:  # pylint: disable=too-few-public-methods
      auc = np.array([0.5, 0.9, np.nan])
      p_value = np.array([0.5, 0.01, np.nan])
      stability = np.array([0.9, 0.2, np.nan])

    summary = metrics.trust_summary(Trust())
    self.assertAlmostEqual(summary["mean_stability"], 0.55)
    self.assertAlmostEqual(summary["stable_share"], 0.5)


if __name__ == "__main__":
  absltest.main()

"""Label metrics against known truth."""
from absl.testing import absltest
import numpy as np

from jaxdissect import labeling
from jaxdissect import metrics

VECTORS = {"cat": [1.0, 0.0], "dog": [0.6, 0.8], "car": [0.0, 1.0]}


def embed(texts):
  return np.asarray([VECTORS[t] for t in texts])


class EvaluateTest(absltest.TestCase):

  def test_top1_top5_and_cosine(self):
    labels = ["cat", "dog", labeling.DEAD_LABEL, "car"]
    alternatives = [["cat", "dog"], ["dog", "cat"], ["car", "cat"], ["car", "dog"]]
    truth = ["cat", "cat", "cat", "dog"]
    scores = metrics.label_precision(labels, alternatives, truth, embed)
    self.assertAlmostEqual(scores["top1"], 0.25)
    self.assertAlmostEqual(scores["top5"], 1.0)
    # cosines: cat-cat 1, dog-cat 0.6, dead 0, car-dog 0.8
    self.assertAlmostEqual(scores["clip_cos"], (1 + 0.6 + 0 + 0.8) / 4)
    self.assertEqual(scores["num_units"], 4)

  def test_median_rank_and_auc_as_the_authors_notebook(self):
    ranks = np.array([5.0, 1.0, 3.0, 2.0])
    self.assertEqual(metrics.median_rank(ranks), 3.0)  # sorted(ranks)[len // 2]
    self.assertEqual(metrics.median_rank(np.array([4.0, 1.0, 2.0])), 2.0)
    rng = np.random.default_rng(0)
    scores = rng.normal(size=60).round(1)  # rounded: ties between classes occur
    correct = rng.random(60) < 0.4
    # Reference: the fraction of (right, wrong) pairs ordered correctly, ties a half.
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0)
             for p in scores[correct] for n in scores[~correct]]
    self.assertAlmostEqual(metrics.correctness_auc(scores, correct), np.mean(pairs))
    try:
      from sklearn import metrics as sklearn_metrics  # pylint: disable=g-import-not-at-top
      self.assertAlmostEqual(metrics.correctness_auc(scores, correct),
                             sklearn_metrics.roc_auc_score(correct, scores))
    except ImportError:
      pass
    self.assertIsNone(metrics.correctness_auc(scores, np.ones(60, bool)))

  def test_true_concept_ranks_count_strictly_better_concepts(self):
    concepts = ["cat", "dog", "car", "sun"]
    scores = np.array([[0.9, 0.1, 0.5, 0.2],    # cat is best: 1
                       [0.3, 0.3, 0.5, 0.1],    # dog ties cat, car above: 2
                       [0.0, 0.0, 0.0, 0.0],    # dead: last (4)
                       [0.2, 0.4, 0.6, 0.8]])   # truth "zebra" is no concept: NaN
    ranks = metrics.true_concept_ranks(scores, ["cat", "dog", "cat", "zebra"], concepts,
                                        np.array([True, True, False, True]))
    np.testing.assert_array_equal(ranks[:3], [1, 2, 4])
    self.assertTrue(np.isnan(ranks[3]))

  def test_ranks_follow_the_listed_order_where_scores_tie(self):
    concepts = ["cat", "dog", "car", "sun"]
    scores = np.array([[2.0, 2.0, 2.0, 0.1],    # three tied at the top
                       [2.0, 2.0, 2.0, 0.1],
                       [2.0, 1.0, 1.0, 1.0]])
    # The tie-break listed dog, car, cat for unit 0 and cat first for unit 1; unit 2
    # lists two concepts and its truth (sun, tied with dog and car) is not among them.
    listed = np.array([[1, 2], [0, 1], [0, 1]])
    usable = np.ones(3, bool)
    ranks = metrics.true_concept_ranks(scores, ["car", "cat", "sun"], concepts, usable,
                                        listed)
    np.testing.assert_array_equal(ranks, [2, 1, 3])
    # Without the listing, tied concepts share the better rank.
    np.testing.assert_array_equal(
        metrics.true_concept_ranks(scores, ["car", "cat", "sun"], concepts, usable),
        [1, 1, 2])

  def test_label_diversity_against_hand_counts(self):
    labels = ["cat", "cat", "dog", "sun", labeling.DEAD_LABEL]
    diversity = metrics.label_diversity(labels)
    self.assertAlmostEqual(diversity["diversity"], 3 / 4)
    # shares 1/2, 1/4, 1/4: 0.5 + 0.5 + 0.5 bits
    self.assertAlmostEqual(diversity["label_entropy_bits"], 1.5)
    self.assertEqual(metrics.label_diversity([labeling.DEAD_LABEL])["diversity"], 0.0)

  def test_embedder_looks_up_and_embeds_missing(self):
    asked = []

    def embed_new(texts):
      asked.append(list(texts))
      return np.ones((len(texts), 2))

    lookup = metrics.make_embedder(["cat", "dog"], np.eye(2), embed_new)
    out = lookup(["dog", "zebra", "cat", "zebra"])
    np.testing.assert_array_equal(out, [[0, 1], [1, 1], [1, 0], [1, 1]])
    lookup(["zebra"])
    self.assertEqual(asked, [["zebra"]])

  def test_pearson_columns_matches_numpy_and_zeroes_constant_columns(self):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4))
    x[:, 2] = 3.0  # constant
    y = (rng.random((50, 3)) < 0.3).astype(np.float32)
    y[:, 1] = 0.0  # a word no image shows
    got = metrics.pearson_columns(x, y)
    for i in range(4):
      for j in range(3):
        expected = 0.0 if i == 2 or j == 1 else np.corrcoef(x[:, i], y[:, j])[0, 1]
        self.assertAlmostEqual(got[i, j], expected, places=12)

  def test_average_precision_by_hand_with_ties(self):
    # Ranked: 0.9 (pos), 0.8 (neg), then 0.5 twice (pos, neg) entering together, 0.1 (pos).
    scores = np.array([0.9, 0.8, 0.5, 0.5, 0.1])
    positive = np.array([True, False, True, False, True])
    expected = (1 / 3) * 1.0 + (1 / 3) * (2 / 4) + (1 / 3) * (3 / 5)
    self.assertAlmostEqual(metrics.average_precision(scores, positive), expected)
    self.assertTrue(np.isnan(metrics.average_precision(scores, np.zeros(5, bool))))
    self.assertEqual(metrics.average_precision(scores, scores > 0.7), 1.0)

  def test_ground_truth_of_planted_units_and_distractors(self):
    # Unit 0 detects "red", unit 1 half-detects "striped" but is labelled "dog" (not
    # annotated: a distractor), unit 2 is dead, unit 3 detects "blue" and is labelled so.
    rng = np.random.default_rng(1)
    words = ["red", "striped", "blue"]
    annotations = (rng.random((400, 3)) < 0.3).astype(np.float32)
    activations = np.stack([annotations[:, 0] + 0.01 * rng.random(400),
                            annotations[:, 1] + rng.random(400),
                            np.ones(400),
                            annotations[:, 2] * 2.0], axis=1)
    labels = ["red", "dog", "<dead>", "blue"]
    live = np.array([True, True, False, True])
    got = metrics.ground_truth_layer(activations, annotations, words, labels, live)
    corr = metrics.pearson_columns(activations, annotations)
    self.assertEqual(got["gt_units"], 3)
    self.assertAlmostEqual(got["gt_distractor_share"], 1 / 3)
    self.assertAlmostEqual(got["gt_label_corr"], (corr[0, 0] + 0.0 + corr[3, 2]) / 3)
    self.assertAlmostEqual(got["gt_oracle_corr"],
                           (corr[0].max() + corr[1].max() + corr[3].max()) / 3)
    self.assertAlmostEqual(got["gt_explained_share"],
                           got["gt_label_corr"] / got["gt_oracle_corr"])
    self.assertGreater(corr[0, 0], 0.99)
    # Detectors rank every positive first (AP 1); the distractor counts 0.
    self.assertAlmostEqual(got["gt_label_auprc"], 2 / 3)
    none_live = metrics.ground_truth_layer(activations, annotations, words, labels,
                                           np.zeros(4, bool))
    self.assertIsNone(none_live["gt_label_corr"])

  def test_length_mismatch_is_an_error(self):
    with self.assertRaises(ValueError):
      metrics.label_precision(["cat"], [["cat"]], ["cat", "dog"], embed)


if __name__ == "__main__":
  absltest.main()

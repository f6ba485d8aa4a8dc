"""Similarity functions against a NumPy float64 per-neuron reference written from docs/DESIGN.md."""
import math
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from jaxdissect import labeling
from jaxdissect import likelihood
from jaxdissect import similarity
from jaxdissect import store


# ---------------------------------------------------------------- float64 references
def ref_top(activations, k):
  """Per neuron: indices of the k largest, ties to the lower image index."""
  num_images, num_neurons = activations.shape
  out = []
  for n in range(num_neurons):
    order = np.lexsort((np.arange(num_images), -activations[:, n]))
    out.append(order[:k])
  return out


def ref_softmax(x):
  x = x - x.max(axis=1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=1, keepdims=True)


def ref_cos(P, A):
  K, M = A.shape[1], P.shape[1]
  out = np.zeros((K, M))
  for k in range(K):
    for m in range(M):
      out[k, m] = A[:, k] @ P[:, m] / (np.linalg.norm(A[:, k]) * np.linalg.norm(P[:, m]))
  return out


def ref_cos_cubed(P, A, min_norm=1e-3):
  def prep(col):
    c = (col - col.mean()) ** 3
    return c / max(np.linalg.norm(c), min_norm)
  K, M = A.shape[1], P.shape[1]
  out = np.zeros((K, M))
  for k in range(K):
    a = prep(A[:, k])
    for m in range(M):
      out[k, m] = a @ prep(P[:, m])
  return out


def ref_prior_subtract(L, lam):
  K = L.shape[0]
  prior = special.logsumexp(L, axis=0) - math.log(K)
  return L - lam * prior


def ref_wpmi_log_likelihood(P, A, top_k=28, a=2.0, min_prob=1e-7):
  S = ref_softmax(a * P)
  return np.stack([np.log(S[idx] + min_prob).sum(axis=0) for idx in ref_top(A, top_k)])


def ref_soft_log_likelihood(P, A, top_k=100, a=10.0, min_prob=1e-7, p_start=0.998,
                            p_end=0.97):
  S = ref_softmax(a * P)
  p = (p_start - np.arange(top_k) / top_k * (p_start - p_end))[:, None]
  return np.stack([np.log(1 + p * (S[idx] - 1) + min_prob).sum(axis=0)
                   for idx in ref_top(A, top_k)])


def ref_wpmi(P, A, top_k=28, a=2.0, lam=0.6, min_prob=1e-7):
  S = ref_softmax(a * P)
  tops = ref_top(A, top_k)
  L = np.stack([np.log(S[idx] + min_prob).sum(axis=0) for idx in tops])
  return ref_prior_subtract(L, lam)


def ref_soft_wpmi(P, A, top_k=100, a=10.0, lam=1.0, min_prob=1e-7, p_start=0.998,
                  p_end=0.97):
  S = ref_softmax(a * P)
  tops = ref_top(A, top_k)
  L = []
  for idx in tops:
    total = np.zeros(P.shape[1])
    for j, i in enumerate(idx):
      p_j = p_start - (j / top_k) * (p_start - p_end)
      total += np.log(1 + p_j * (S[i] - 1) + min_prob)
    L.append(total)
  return ref_prior_subtract(np.stack(L), lam)


def ref_rank_reorder(P, A, top_fraction=0.05, p=3, scale_p=0.5, seed=0):
  N = P.shape[0]
  n = int(math.floor(N * top_fraction))
  perms = similarity.rank_reorder_baseline_permutations(n, seed)
  scores = []
  for k, idx in enumerate(ref_top(A, n)):
    v = A[idx, k]  # descending
    v_asc = np.sort(v)
    C = P[idx, :]
    row = np.zeros(P.shape[1])
    baseline = np.mean([np.mean(np.abs(v_asc - v_asc[perm]) ** p) for perm in perms])
    for m in range(P.shape[1]):
      ranks = np.empty(n, dtype=int)
      ranks[np.argsort(C[:, m], kind="stable")] = np.arange(n)
      reorg = v_asc[ranks]
      err = np.mean(np.abs(v - reorg) ** p) / baseline
      mean_c = max(C[:, m].mean(), similarity.RANK_REORDER_MIN_MEAN)
      row[m] = -err / mean_c ** scale_p
    scores.append(row)
  return np.stack(scores)


REFERENCES = {
    "cos_similarity": ref_cos,
    "cos_similarity_cubed": ref_cos_cubed,
    "wpmi": ref_wpmi,
    "soft_wpmi": ref_soft_wpmi,
    "rank_reorder": ref_rank_reorder,
}
PRIOR = ("wpmi", "soft_wpmi")


def random_inputs(num_images, num_concepts, num_neurons, seed):
  rng = np.random.default_rng(seed)
  # CLIP cosines sit in a narrow positive band; activations are ReLU-like.
  P = 0.2 + 0.05 * rng.standard_normal((num_images, num_concepts))
  A = np.maximum(rng.standard_normal((num_images, num_neurons)), 0) + 0.01 * rng.random(
      (num_images, num_neurons))
  return P, A


def assert_matches_reference(test, ours, ref):
  ours = np.asarray(ours, np.float64)
  test.assertEqual(ours.shape, ref.shape)
  test.assertTrue(np.all(np.isfinite(ours)))
  rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
  test.assertLessEqual(rel, 1e-4, f"norm-wise relative error {rel}")
  # Same argmax wherever the float64 top-2 gap is clear.
  top2 = np.sort(ref, axis=1)[:, -2:]
  clear = (top2[:, 1] - top2[:, 0]) > 1e-3
  np.testing.assert_array_equal(ours.argmax(1)[clear], ref.argmax(1)[clear])


class SimilarityTest(parameterized.TestCase):

  @parameterized.product(
      name=sorted(REFERENCES),
      shape=[(120, 7, 5), (240, 33, 12), (400, 3, 40)],
  )
  def test_matches_float64_reference(self, name, shape):
    P, A = random_inputs(*shape, seed=hash((name, shape)) % 1000)
    ours = similarity.SIMILARITY_FUNCTIONS[name](P.astype(np.float32), A.astype(np.float32))
    assert_matches_reference(self, ours, REFERENCES[name](P, A))

  def test_rank_reorder_chunked_equals_unchunked(self):
    P, A = random_inputs(300, 20, 13, seed=3)
    whole = np.asarray(similarity.rank_reorder(P, A, chunk_size=13))
    for chunk in (1, 4, 5):
      np.testing.assert_allclose(similarity.rank_reorder(P, A, chunk_size=chunk), whole,
                                 rtol=1e-5, atol=5e-4)

  @parameterized.parameters(*PRIOR)
  def test_concept_blocks_equal_one_block(self, name):
    # 23 concepts in blocks of 5 leave a last block moved back over 2 seen concepts:
    # the row normalisers must not count those twice.
    P, A = random_inputs(300, 23, 13, seed=3)
    fn = similarity.SIMILARITY_FUNCTIONS[name]
    _, whole = fn(P, A, block_size=23, return_log_likelihood=True)
    for block in (1, 5, 7, 22):
      _, blocked = fn(P, A, block_size=block, return_log_likelihood=True)
      # L is a sum of ~100 logs: float32 rounding of the normalisers moves it slightly.
      np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=5e-4)
    ref = (ref_soft_log_likelihood if name == "soft_wpmi" else ref_wpmi_log_likelihood)(P, A)
    np.testing.assert_allclose(whole, ref, rtol=2e-5, atol=1e-3)

  @parameterized.parameters((100, 0.998, 0.97), (97, 0.998, 0.97), (28, 1.0, 1.0))
  def test_rank_groups_and_padding_match_float64(self, top_k, p_start, p_end):
    # 97 ranks: no divisor in the group range, so padded ranks must count as log 1.
    P, A = random_inputs(400, 9, 6, seed=top_k)
    _, L = similarity.soft_wpmi(P, A, top_k=top_k, p_start=p_start, p_end=p_end,
                                return_log_likelihood=True)
    ref = ref_soft_log_likelihood(P, A, top_k=top_k, p_start=p_start, p_end=p_end)
    np.testing.assert_allclose(L, ref, rtol=2e-5, atol=1e-3)

  def test_a_few_neurons_read_only_their_rows(self):
    # 3 neurons x top 100 of 5000 images: the gathered-rows path, not the full slice.
    P, A = random_inputs(5000, 11, 3, seed=8)
    _, L = similarity.soft_wpmi(P, A, block_size=4, return_log_likelihood=True)
    np.testing.assert_allclose(L, ref_soft_log_likelihood(P, A), rtol=2e-5, atol=1e-3)

  def test_softmax_is_never_materialised(self):
    # 10,000 x 20,000 x 256, compiled from shapes alone: XLA's temporaries stay far
    # below one images x concepts float32 matrix (800 MB).
    images, concepts, neurons, top_k = 10_000, 20_000, 256, 100
    block = likelihood.block_size(images, concepts)
    compiled = similarity._blocked_log_likelihood.lower(  # pylint: disable=protected-access
        jax.ShapeDtypeStruct((images, concepts), jnp.float32), None,
        (jax.ShapeDtypeStruct((neurons, top_k), jnp.int32),),
        jax.ShapeDtypeStruct((top_k,), jnp.float32), jnp.float32(10.0),
        jnp.float32(1e-7), block=block,
        group=likelihood.log_group_size(0.002, top_k)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    self.assertLess(temp, images * concepts * 4 // 4)
    self.assertLess(temp, 2 * likelihood.BLOCK_BYTES)

  @parameterized.parameters(*sorted(REFERENCES))
  def test_permuting_images_leaves_scores_unchanged(self, name):
    P, A = random_inputs(300, 15, 9, seed=4)
    perm = np.random.default_rng(5).permutation(300)
    fn = similarity.SIMILARITY_FUNCTIONS[name]
    np.testing.assert_allclose(np.asarray(fn(P[perm], A[perm])), np.asarray(fn(P, A)),
                               rtol=1e-5, atol=1e-5)

  def test_top_activations_ties_go_to_lower_image_index(self):
    A = np.array([[1.0, 0.0], [3.0, 0.0], [3.0, 0.0], [2.0, 0.0], [3.0, 0.0]], np.float32)
    values, idx = similarity.top_activations(A, 4)
    np.testing.assert_array_equal(np.asarray(idx[0]), [1, 2, 4, 3])
    np.testing.assert_array_equal(np.asarray(values[0]), [3, 3, 3, 2])
    np.testing.assert_array_equal(np.asarray(idx[1]), [0, 1, 2, 3])

  @parameterized.parameters(
      ("normal", 3001, 7, 28), ("ties", 2000, 5, 100), ("relu", 997, 3, 9),
      ("rising", 3000, 4, 60), ("negative", 1000, 3, 20), ("special", 1500, 6, 50),
      ("low", 400, 5, 20), ("special", 40, 4, 40), ("normal", 50, 2, 3))
  def test_top_activations_equals_a_total_order_sort(self, kind, num_images, num_neurons,
                                                     k):
    # Independent reference: a stable NumPy sort on the IEEE total order of the bits
    # (NaN above +inf, -NaN below -inf, +0 above -0), the order lax.top_k uses; the
    # shapes take both the two-stage path (chunks that do not divide the images) and
    # the direct one.
    rng = np.random.default_rng(num_images + k)
    if kind == "normal":
      A = rng.standard_normal((num_images, num_neurons))
    elif kind == "ties":
      A = rng.integers(0, 4, (num_images, num_neurons)).astype(float)
    elif kind == "relu":
      A = np.maximum(rng.standard_normal((num_images, num_neurons)), 0)
    elif kind == "rising":  # later images larger, with ties across chunks
      A = np.round(np.arange(num_images)[:, None] / 400
                   + rng.standard_normal((num_images, num_neurons)))
    elif kind == "negative":
      A = -np.exp(rng.standard_normal((num_images, num_neurons)))
    else:
      negative_nan = np.uint32(0xFFC00000).view(np.float32)
      special = np.array([0.0, -0.0, 1.0, -2.0, np.inf, -np.inf, np.nan, negative_nan])
      # Rare large values, so that the top k reach the zeros (or -inf and -NaN).
      weights = ([0.0, 0.0, 0.0, 0.02, 0.0, 0.49, 0.0, 0.49] if kind == "low" else
                 [0.33, 0.33, 0.01, 0.1, 0.005, 0.1, 0.005, 0.12])
      A = rng.choice(special, (num_images, num_neurons), p=weights)
    A = A.astype(np.float32)
    bits = A.view(np.int32).astype(np.int64)
    keys = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    expected = np.argsort(-keys, axis=0, kind="stable")[:k].T
    values, idx = similarity.top_activations(A, k)
    np.testing.assert_array_equal(np.asarray(idx), expected)
    np.testing.assert_array_equal(np.asarray(values).view(np.int32),
                                  np.take_along_axis(A.T, expected, axis=1).view(np.int32))
    two_stage = similarity.top_k_chunk(num_images, k) >= similarity.MIN_TOP_K_CHUNK
    self.assertEqual(two_stage, num_images >= 16 * k)

  @parameterized.parameters("soft_wpmi", "wpmi")
  def test_planted_concepts_are_recovered(self, name):
    # Concept c(k) is present in a random 15% of images; neuron k fires there.
    rng = np.random.default_rng(0)
    num_images, num_concepts, num_neurons = 2000, 40, 25
    present = rng.random((num_images, num_concepts)) < 0.15
    P = 0.18 + 0.02 * rng.standard_normal((num_images, num_concepts)) + 0.08 * present
    planted = rng.permutation(num_concepts)[:num_neurons]
    A = (present[:, planted] * (1.0 + rng.random((num_images, num_neurons)))
         + 0.3 * rng.random((num_images, num_neurons)))
    scores = similarity.SIMILARITY_FUNCTIONS[name](P.astype(np.float32),
                                                   A.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(scores).argmax(axis=1), planted)

  def test_too_few_images_is_a_clear_error(self):
    P, A = random_inputs(50, 4, 3, seed=0)
    with self.assertRaisesRegex(ValueError, "at least 100 probe images"):
      similarity.soft_wpmi(P, A)
    with self.assertRaisesRegex(ValueError, "same images"):
      similarity.cos_similarity(P[:10], A)

  def test_rank_reorder_negative_mean_is_clamped_not_nan(self):
    P, A = random_inputs(200, 6, 4, seed=1)
    scores = similarity.rank_reorder(P - 1.0, A)
    self.assertTrue(np.all(np.isfinite(np.asarray(scores))))


def ref_margin(L):
  """float64: L[k, m] - logsumexp over o != k of L[o, m]."""
  K = L.shape[0]
  return np.stack([L[k] - special.logsumexp(np.delete(L, k, axis=0), axis=0)
                   for k in range(K)])


class PriorSaturationTest(parameterized.TestCase):
  """A concept one neuron owns by a wide margin scores lam log K in float32: such ties
  are exact and are broken by the margin, as exact arithmetic would break them."""

  def test_owned_concepts_score_exactly_log_k(self):
    L = np.array([[-100.0, -50.0, -70.0, -300.0],
                  [-400.0, -400.0, -400.0, -250.0],
                  [-400.0, -390.0, -410.0, -310.0]], np.float32)
    scores = np.asarray(similarity.subtract_prior(L, 1.0))
    log_k = np.float32(math.log(3))
    np.testing.assert_array_equal(scores[0, :3], [log_k] * 3)
    np.testing.assert_array_equal(scores[1, 3], log_k)
    np.testing.assert_allclose(scores, ref_prior_subtract(L.astype(np.float64), 1.0),
                               atol=1e-5)

  @parameterized.parameters(0.0, 5.0, 200.0)
  def test_margin_of_best_neuron_matches_float64(self, spread):
    rng = np.random.default_rng(int(spread))
    L = rng.normal(0, 1 + spread, (6, 9)) - 300.0
    margin = np.asarray(similarity.prior_margin(L.astype(np.float32)))
    best = L.argmax(axis=0)
    expected = ref_margin(L)
    np.testing.assert_allclose(margin[best, np.arange(9)], expected[best, np.arange(9)],
                               rtol=1e-5, atol=2e-3)

  def test_tied_scores_go_to_the_larger_margin(self):
    # Neuron 0 owns concepts 1 and 2 (margins 40 and 60 nats): both score log 3 in
    # float32; exactly, log 3 - softplus(-60) > log 3 - softplus(-40), so concept 2.
    L = np.array([[-500.0, -300.0, -310.0, -200.0],
                  [-200.0, -340.0, -370.0, -200.0],
                  [-200.0, -345.0, -380.0, -200.0]], np.float32)
    scores = np.asarray(similarity.subtract_prior(L, 1.0))
    self.assertEqual(scores[0, 1], scores[0, 2])
    margin = np.asarray(similarity.prior_margin(L))
    activations = np.eye(3, dtype=np.float32)
    dead = np.zeros(3, bool)
    layer = labeling.label_units(scores, activations, ["a", "b", "c", "d"], dead, dead,
                                 num_alternatives=3, tiebreak=margin)
    self.assertEqual(layer.labels[0], "c")
    self.assertEqual(list(layer.alternative_ids[0][:2]), [2, 1])
    # Without the key, equal scores keep the lower concept index.
    plain = labeling.label_units(scores, activations, ["a", "b", "c", "d"], dead, dead)
    self.assertEqual(plain.labels[0], "b")

  def test_tied_at_best_flags_live_units_whose_best_score_is_shared(self):
    scores = np.array([[2.0, 2.0, 1.0], [2.0, 1.0, 0.5], [1.0, 1.0, 1.0],
                       [0.0, 3.0, 3.0]], np.float32)
    live = np.array([True, True, True, False])
    np.testing.assert_array_equal(labeling.tied_at_best(scores, live),
                                  [True, False, True, False])
    np.testing.assert_array_equal(labeling.tied_at_best(scores[:, :1], live), [False] * 4)

  def test_label_probe_warns_when_the_cap_decides_a_label(self):
    # Unit 0 fires on images that show concepts a and b together, unit 1 on images of
    # c: in a 2-unit layer, a and b both score log 2 for unit 0, so the tie-break picks.
    rng = np.random.default_rng(0)
    texts = np.eye(3, dtype=np.float32)
    images = np.concatenate([np.tile([[1.0, 1.0, 0.0]], (200, 1)),
                             np.tile([[0.0, 0.0, 1.0]], (200, 1))]).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    acts = np.zeros((400, 2), np.float32)
    acts[:200, 0] = 1.0 + rng.random(200)
    acts[200:, 1] = 1.0 + rng.random(200)
    probe = store.ProbeActivations(images, {"small": acts},
                                             [str(i) for i in range(400)])
    with self.assertLogs(level="WARNING") as logs:
      result = labeling.label_probe(probe, texts, ["a", "b", "c"], "soft_wpmi")
    self.assertTrue(any("Layer small: 1 of 2 units" in m and "K = 2 units" in m
                        for m in logs.output), logs.output)
    self.assertIn(result.layers["small"].labels[0], ("a", "b"))
    self.assertEqual(result.layers["small"].labels[1], "c")

  @parameterized.parameters("soft_wpmi", "wpmi")
  def test_label_probe_scores_the_layers_with_P_in_one_pass(self, name):
    # Three layers (one with a NaN unit, one with a dead unit) scored together from the
    # running top-k equal each layer scored alone from its activations.
    rng = np.random.default_rng(9)
    images = rng.standard_normal((400, 12)).astype(np.float32)
    texts = rng.standard_normal((17, 12)).astype(np.float32)
    layers = {"a": rng.random((400, 6)), "b": rng.random((400, 3)) ** 3,
              "c": rng.standard_normal((400, 5))}
    layers = {k: v.astype(np.float32) for k, v in layers.items()}
    layers["b"][5, 1] = np.nan
    layers["c"][:, 2] = 0.25
    probe = store.ProbeActivations(images, layers, [str(i) for i in range(400)])
    concepts = [f"c{i}" for i in range(17)]
    with self.assertLogs(level="INFO") as logs:
      result = labeling.label_probe(probe, texts, concepts, name, keep_scores=True)
    self.assertLen([m for m in logs.output if f"Scored {name} of 3 layer(s)" in m], 1)
    P = np.asarray(labeling.concept_activation(images, texts))
    for layer, acts in layers.items():
      alone = labeling.score_layer(name, P, acts)
      np.testing.assert_allclose(result.scores[layer], alone.scores, rtol=1e-5, atol=1e-4)
      expected = labeling.label_units(alone.scores, acts, concepts, alone.dead,
                                      alone.invalid, tiebreak=alone.tiebreak)
      self.assertEqual(result.layers[layer].labels, expected.labels)
    self.assertEqual(result.layers["b"].labels[1], labeling.INVALID_LABEL)
    self.assertEqual(result.layers["c"].labels[2], labeling.DEAD_LABEL)
    with self.assertRaisesRegex(ValueError, "fewer than top_k"):
      similarity.layers_log_likelihood(name, P, [np.zeros((2, 5), np.int64)])
    # A budget of 7 units' scores: a (6 units), then b and c (3 + 5 > 7: apart).
    with mock.patch.object(labeling, "MAX_PASS_SCORES_BYTES", 7 * 17 * 4):
      with self.assertLogs(level="INFO") as logs:
        parts = labeling.label_probe(probe, texts, concepts, name, keep_scores=True)
    passes = [m for m in logs.output if f"Scored {name} of 1 layer(s)" in m]
    self.assertLen(passes, 3)
    for layer in layers:
      self.assertEqual(parts.layers[layer].labels, result.layers[layer].labels)
      np.testing.assert_allclose(parts.scores[layer], result.scores[layer], rtol=1e-5,
                                 atol=1e-4)
    with mock.patch.object(labeling, "MAX_PASS_SCORES_BYTES", 7 * 17 * 4):
      self.assertEqual(labeling._layer_groups({"a": 6, "b": 3, "c": 1, "d": 9}, 17),  # pylint: disable=protected-access
                       [["a"], ["b", "c"], ["d"]])

  @parameterized.parameters(0.6, 1.0)
  def test_prior_labels_equal_the_labels_of_scores_and_margin(self, lam):
    # The tie case above, a single unit, and random layers with and without owned
    # concepts: prior_labels picks what label_units picks from the two keys.
    rng = np.random.default_rng(3)
    cases = [np.array([[-500.0, -300.0, -310.0, -200.0],
                       [-200.0, -340.0, -370.0, -200.0],
                       [-200.0, -345.0, -380.0, -200.0]], np.float32),
             np.array([[-5.0, -1.0, -3.0]], np.float32),
             (rng.normal(0, 1, (7, 11)) - 300.0).astype(np.float32),
             (rng.normal(0, 80, (7, 11)) - 300.0).astype(np.float32)]
    for L in cases:
      scores = np.asarray(similarity.subtract_prior(L, lam))
      margin = np.asarray(similarity.prior_margin(L))
      expected, _ = labeling.order_with_ties(scores, margin, 1)
      np.testing.assert_array_equal(np.asarray(similarity.prior_labels(L, lam)),
                                    expected[:, 0])

  def test_a_single_unit_layer_has_no_tiebreak_preference(self):
    L = np.array([[-5.0, -1.0, -3.0]], np.float32)
    np.testing.assert_array_equal(np.asarray(similarity.subtract_prior(L, 1.0)), 0.0)
    self.assertTrue(np.all(np.isinf(np.asarray(similarity.prior_margin(L)))))

  @parameterized.parameters(0.6, 1.0)
  def test_stacked_layers_label_as_each_layer_alone(self, lam):
    # Layers of 1, 3, 7, 7 and 2 units (the tie case, owned concepts, a lone unit)
    # stacked in one L: each row's label and margin are its layer's alone, bit for bit,
    # and its score to float32 rounding, in one stack or several.
    rng = np.random.default_rng(4)
    layers = [np.array([[-5.0, -1.0, -3.0, -9.0]], np.float32),
              np.array([[-500.0, -300.0, -310.0, -200.0],
                        [-200.0, -340.0, -370.0, -200.0],
                        [-200.0, -345.0, -380.0, -200.0]], np.float32),
              (rng.normal(0, 1, (7, 4)) - 300.0).astype(np.float32),
              (rng.normal(0, 80, (7, 4)) - 300.0).astype(np.float32),
              (rng.normal(0, 5, (2, 4)) - 300.0).astype(np.float32)]
    sizes = tuple(len(layer) for layer in layers)
    alone = [similarity.best_prior_concept(jnp.asarray(layer), lam) for layer in layers]
    expected = [np.concatenate([np.asarray(out[i]) for out in alone]) for i in range(3)]
    stacked = jnp.asarray(np.concatenate(layers))
    for stacks in (similarity.prior_stacks(sizes, 4), ((0, 1, 2, 3, 4),),
                   ((4, 1), (0,), (2, 3))):
      score, margin, label = similarity.stacked_best_prior_concept(stacked, lam, sizes,
                                                                    stacks)
      np.testing.assert_array_equal(np.asarray(label), expected[2])
      np.testing.assert_array_equal(np.asarray(margin), expected[1])
      np.testing.assert_allclose(np.asarray(score), expected[0], rtol=1e-6)

  def test_prior_stacks_cover_every_layer_once_and_bound_padding(self):
    sizes = (16, 16, 32, 64, 128, 8, 8, 5)
    self.assertEqual(similarity.prior_stacks(sizes, 56), ((7, 5, 6, 0, 1, 2, 3, 4),))
    self.assertEqual(similarity.prior_stacks((768,) * 12, 20000), (tuple(range(12)),))
    # ResNet-50's blocks at 4,096 concepts a block: only the two smallest pad together.
    big = (64, 256, 512, 1024, 2048)
    stacks = similarity.prior_stacks(big, 4096)
    self.assertEqual(stacks, ((0, 1), (2,), (3,), (4,)))
    for stack in stacks:
      padded = len(stack) * max(big[i] for i in stack)
      real = sum(big[i] for i in stack)
      self.assertTrue(padded <= 1.25 * real or
                      padded * 4096 <= similarity.SMALL_STACK_ELEMENTS)
    self.assertEqual(sorted(sum(stacks, ())), list(range(5)))

  def test_fold_unrolled_or_not_gives_the_same_bits(self):
    L = jnp.asarray((np.random.default_rng(5).normal(0, 20, (70, 9)) - 300.0)
                    .astype(np.float32))
    with mock.patch.object(similarity, "FOLD_UNROLL_MIN_ELEMENTS", 0):
      unrolled = [np.asarray(x) for x in similarity.best_prior_concept(L, 0.6)]
    rolled = [np.asarray(x) for x in similarity.best_prior_concept(L, 0.6)]
    for a, b in zip(unrolled, rolled):
      np.testing.assert_array_equal(a, b)


class BlockedLogTest(parameterized.TestCase):

  @parameterized.parameters((100, 0.0020001, 10), (28, 1e-7, 4), (97, 0.0020001, 10),
                            (5, 0.5, 5), (100, 1.0, 10))
  def test_group_size_is_safe_and_prefers_divisors(self, top_k, floor, expected):
    group = likelihood.log_group_size(floor, top_k)
    self.assertEqual(group, expected)
    # The smallest product of a group stays a normal float32.
    self.assertGreater(np.float32(floor) ** group, np.finfo(np.float32).tiny)

  def test_soft_wpmi_with_full_membership_stays_finite(self):
    P, A = random_inputs(200, 6, 4, seed=5)
    scores = np.asarray(similarity.soft_wpmi(P, A, p_start=1.0, p_end=1.0))
    np.testing.assert_allclose(scores, ref_soft_wpmi(P, A, p_start=1.0, p_end=1.0),
                               rtol=1e-4, atol=1e-3)


class DeadAndInvalidUnitsTest(parameterized.TestCase):

  @parameterized.parameters("soft_wpmi", "wpmi", "cos_similarity", "rank_reorder")
  def test_flagged_labelled_and_live_scores_unchanged(self, name):
    P, A = random_inputs(300, 7, 5, seed=4)
    A = A.astype(np.float32)
    A[:, 1] = 0.25  # dead: constant
    A[17, 3] = np.nan  # invalid
    A[5, 4] = np.inf  # invalid
    scored = labeling.score_layer(name, P, A)
    np.testing.assert_array_equal(scored.dead, [False, True, False, False, False])
    np.testing.assert_array_equal(scored.invalid, [False, False, False, True, True])
    with self.assertLogs(level="WARNING") as logs:
      layer = labeling.label_units(scored.scores, A, [f"c{i}" for i in range(7)],
                                   scored.dead, scored.invalid, tiebreak=scored.tiebreak)
    self.assertTrue(any("1 dead" in m and "2 unit(s) with NaN/Inf" in m
                        for m in logs.output), logs.output)
    self.assertEqual(layer.labels[1], labeling.DEAD_LABEL)
    self.assertEqual(layer.labels[3:], [labeling.INVALID_LABEL] * 2)
    # Live units score as if the invalid units were 0 and the dead one kept (it stays
    # in the (soft-)WPMI prior, as in the official method).
    cleaned = A.copy()
    cleaned[:, 3:] = 0.0
    expected = np.asarray(similarity.SIMILARITY_FUNCTIONS[name](P, cleaned))
    np.testing.assert_allclose(scored.scores[[0, 2]], expected[[0, 2]], rtol=1e-6)
    self.assertFalse(np.isnan(scored.scores[[0, 2]]).any())


if __name__ == "__main__":
  absltest.main()

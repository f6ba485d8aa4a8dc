"""Streaming similarity (no images x concepts matrix) equals the in-memory functions."""
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import pytest
import jax.numpy as jnp
import numpy as np

from jaxdissect import labeling
from jaxdissect import likelihood
from jaxdissect import registry
from jaxdissect import similarity
from jaxdissect import store
from jaxdissect import streaming


def embeddings(num_images, num_concepts, num_neurons, dim=16, seed=0):
  rng = np.random.default_rng(seed)
  concept_directions = rng.standard_normal((num_concepts, dim)).astype(np.float32)
  # Images mix a few concepts, so that P has structure; neurons follow some concepts.
  weights = np.maximum(rng.standard_normal((num_images, num_concepts)), 0) ** 2
  images = (weights @ concept_directions + 0.5 * rng.standard_normal(
      (num_images, dim))).astype(np.float32)
  follow = rng.integers(0, num_concepts, num_neurons)
  activations = (weights[:, follow] + 0.1 * rng.random((num_images, num_neurons))
                 ).astype(np.float32)
  return images, concept_directions, activations


class StreamingTest(parameterized.TestCase):

  @parameterized.product(name=list(streaming.FUNCTIONS),
                         shape=[(150, 9, 4), (400, 40, 17), (1000, 7, 3)])
  def test_equals_in_memory(self, name, shape):
    images, texts, activations = embeddings(*shape, seed=sum(shape))
    P = np.asarray(labeling.concept_activation(images, texts))
    expected = np.asarray(similarity.SIMILARITY_FUNCTIONS[name](P, activations))
    got = np.asarray(streaming.FUNCTIONS[name](images, texts, activations))
    # float32 rounding of sums of top_k logs: relative to the scale of the scores.
    np.testing.assert_allclose(got, expected, rtol=2e-5,
                               atol=2e-5 * max(1.0, np.abs(expected).max()))
    np.testing.assert_array_equal(got.argmax(axis=1), expected.argmax(axis=1))

  @parameterized.parameters((True, 100), (False, 28), (True, 97))
  def test_both_plans_compute_the_same_log_likelihood(self, soft, top_k):
    # The blocked plan (shared rows) and the rank-group plan (few shared rows) are
    # chosen by cost alone; 97 ranks leave padded ranks in both.
    images, texts, activations = embeddings(900, 13, 6, seed=top_k)
    _, top = similarity.top_activations(activations, top_k)
    rows, top_rows = likelihood.unique_rows(np.asarray(top))
    membership = similarity.soft_wpmi_membership(top_k, 0.998, 0.97)
    floor = likelihood.soft_wpmi_term_floor(0.998, 0.97, 1e-7) if soft else 1e-7
    args = (streaming._normalise(images[rows]), streaming._normalise(texts),  # pylint: disable=protected-access
            (jnp.asarray(top_rows),),
            jnp.asarray(membership if soft else np.ones(top_k), jnp.float32),
            jnp.float32(10.0 if soft else 2.0), jnp.float32(1e-7),
            jnp.asarray(streaming.RowNormalisers(images, texts).at(
                rows, 10.0 if soft else 2.0)))
    statics = {"soft": soft, "block": 5, "group": likelihood.log_group_size(floor, top_k)}
    (blocked,), (blocked_lse,) = streaming._neurons_log_likelihood(*args, chunk=1, **statics)  # pylint: disable=protected-access
    (ranked,), (ranked_lse,) = streaming._rank_groups_log_likelihood(*args, chunk=3, **statics)  # pylint: disable=protected-access
    np.testing.assert_allclose(np.asarray(ranked), np.asarray(blocked), rtol=2e-6,
                               atol=2e-4)
    # The row normalisers at each neuron's top images, which _rescored reads.
    logits = np.asarray(args[4]) * (np.asarray(args[0], np.float64)
                                    @ np.asarray(args[1], np.float64).T)
    lse = np.log(np.exp(logits).sum(axis=1))[top_rows]
    for got in (blocked_lse, ranked_lse):
      self.assertEqual(got.shape, (6, top_k))
      np.testing.assert_allclose(np.asarray(got), lse, rtol=1e-6, atol=1e-5)

  @parameterized.product(name=["soft_wpmi", "wpmi"],
                         case=[("shared rows", False), ("shared rows", True),
                               ("few shared rows", False)])
  def test_layers_in_one_pass_equal_each_layer_alone(self, name, case):
    # Three layers of different widths. Their top images overlap (the blocked plan,
    # over the union of their rows), or, over a wide random probe without the run's
    # normalisers, hardly (the rank-group plan, layer by layer).
    data, reused = case
    if data == "shared rows":
      images, texts, wide = embeddings(700, 23, 12, seed=5)
      narrow = wide[:, :2] * 0.5 + np.random.default_rng(6).random((700, 2))
      layers = [wide, narrow.astype(np.float32), wide[:, ::-1][:, :5]]
    else:
      images, texts, _ = embeddings(3000, 23, 1, seed=5)
      rng = np.random.default_rng(7)
      layers = [rng.random((3000, units)).astype(np.float32) for units in (3, 1, 2)]
    top_k = similarity.default_top_k(name)
    tops = [np.asarray(similarity.top_activations(a, top_k)[1]) for a in layers]
    normalisers = streaming.RowNormalisers(images, texts, reused=reused)
    together = streaming.layers_log_likelihood(name, images, texts, tops,
                                               row_normalisers=normalisers)
    # The blocked plan reads the normalisers of the union of the layers' top images.
    union = np.unique(np.concatenate([t.ravel() for t in tops])).size
    self.assertEqual(normalisers.rows_computed, 0 if data == "few shared rows" else union)
    self.assertLen(together, 3)
    P = np.asarray(labeling.concept_activation(images, texts), np.float64)
    for layer, got in zip(layers, together):
      _, alone = streaming.FUNCTIONS[name](images, texts, layer, return_log_likelihood=True,
                                           row_normalisers=normalisers)
      self.assertEqual(got.shape, (layer.shape[1], 23))
      # Equal to float32 rounding: the blocks' matmuls hold other rows.
      np.testing.assert_allclose(got, np.asarray(alone), rtol=2e-6, atol=2e-5)
      scores = similarity.subtract_prior(got, registry.SIMILARITY[name].defaults["lam"])
      expected = similarity.SIMILARITY_FUNCTIONS[name](P, layer)
      np.testing.assert_array_equal(np.argmax(scores, 1), np.argmax(expected, 1))

  def test_layers_in_one_pass_refuse_bad_input(self):
    images, texts, activations = embeddings(200, 9, 3)
    _, top = similarity.top_activations(activations, 100)
    with self.assertRaisesRegex(ValueError, "fewer than top_k=100"):
      streaming.layers_log_likelihood("soft_wpmi", images, texts, [np.asarray(top)[:, :99]])
    with self.assertRaisesRegex(ValueError, "not 'cos_similarity'"):
      streaming.layers_log_likelihood("cos_similarity", images, texts, [np.asarray(top)])
    with self.assertRaisesRegex(ValueError, "outside 0..199"):
      streaming.layers_log_likelihood("soft_wpmi", images, texts,
                                      [np.asarray(top), np.asarray(top) + 150])

  @parameterized.product(name=["soft_wpmi", "wpmi"], block_size=[None, 3, 5])
  def test_resampled_labels_equal_relabelling_each_resample(self, name, block_size):
    images, texts, activations = embeddings(600, 13, 9, seed=7)
    # Concept 9 is concept 2 again: exact ties in score and margin, across blocks of
    # 3 and 5, which the lower index must win as in prior_labels.
    texts[9] = texts[2]
    top_k = similarity.default_top_k(name)
    _, top = similarity.top_activations(activations, 200)
    rng = np.random.default_rng(3)
    resampled = np.stack([np.sort(rng.choice(np.asarray(top), top_k, axis=1), axis=1)
                          for _ in range(4)])
    got = streaming.resampled_labels(name, images, texts, resampled,
                                     block_size=block_size)
    lam = similarity.registry.SIMILARITY[name].defaults["lam"]
    for r in range(4):
      _, log_likelihood = streaming.FUNCTIONS[name](
          images, texts, None, top_images=resampled[r], return_log_likelihood=True)
      np.testing.assert_array_equal(
          got[r], np.asarray(similarity.prior_labels(jnp.asarray(log_likelihood), lam)))
    self.assertNotIn(9, got)
    with self.assertRaisesRegex(ValueError, "not 'cos_similarity'"):
      streaming.resampled_labels("cos_similarity", images, texts, resampled)
    outside = resampled.copy()
    outside[1, 2, 3] = 600  # one past the last image
    with self.assertRaisesRegex(ValueError, "resampled_rows holds rows outside 0..599"):
      streaming.resampled_labels(name, images, texts, outside)
    with self.assertRaisesRegex(ValueError, "top_images holds rows outside 0..599"):
      streaming.FUNCTIONS[name](images, texts, None, top_images=outside[1])

  def test_resampled_labels_report_each_finished_block(self):
    images, texts, activations = embeddings(300, 13, 4, seed=5)
    _, top = similarity.top_activations(activations, 100)
    resampled = np.stack([np.asarray(top)] * 2)
    reports = []
    with_reports = streaming.layers_resampled_labels(
        "soft_wpmi", images, texts, [resampled], block_size=5,
        on_block=lambda done, total: reports.append((done, total)))
    # Blocks of 5 of 13 concepts: the last moved back to end at 13.
    self.assertEqual(reports, [(5, 13), (10, 13), (13, 13)])
    np.testing.assert_array_equal(
        with_reports[0], streaming.resampled_labels("soft_wpmi", images, texts, resampled,
                                                    block_size=5))

  def test_small_chunks_change_nothing(self):
    images, texts, activations = embeddings(700, 12, 9, seed=3)
    whole = {n: np.asarray(f(images, texts, activations))
             for n, f in streaming.FUNCTIONS.items()}
    budget = streaming.CHUNK_BUDGET_BYTES
    try:
      streaming.CHUNK_BUDGET_BYTES = 20_000  # a few images / neurons per chunk
      for name, f in streaming.FUNCTIONS.items():
        np.testing.assert_allclose(np.asarray(f(images, texts, activations)), whole[name],
                                   rtol=2e-5, atol=2e-5 * max(1.0, np.abs(whole[name]).max()),
                                   err_msg=name)
    finally:
      streaming.CHUNK_BUDGET_BYTES = budget


  @parameterized.parameters(*streaming.STREAMING_FUNCTIONS)
  @pytest.mark.slow
  def test_label_probe_streams_past_the_budget_with_the_same_labels(self, name):
    images, texts, activations = embeddings(500, 30, 12, seed=11)
    probe = store.ProbeActivations(
        images, {"a": activations, "b": activations[:, :5] ** 2},
        [f"im{i}" for i in range(500)])
    concepts = [f"c{i}" for i in range(30)]
    with self.assertLogs(level="INFO") as logs:
      streamed = labeling.label_probe(probe, texts, concepts, name,
                                      concept_matrix_max_gb=0.0)
    self.assertTrue(any("streaming" in m for m in logs.output))
    if name in registry.PRIOR_FUNCTIONS:  # both layers' L in one pass over the concepts
      self.assertLen([m for m in logs.output if f"Streamed {name} of 2 layer(s)" in m], 1)
    held = labeling.label_probe(probe, texts, concepts, name)
    for layer in ("a", "b"):
      self.assertEqual(streamed.layers[layer].labels, held.layers[layer].labels)
      np.testing.assert_array_equal(streamed.layers[layer].alternative_ids[:, :3],
                                    held.layers[layer].alternative_ids[:, :3])


class RowNormalisersTest(parameterized.TestCase):

  def test_each_row_once_and_bit_equal_however_filled(self):
    images, texts, _ = embeddings(700, 23, 1, seed=3)
    # 23 concepts would fit 700 rows in one block: 8-row blocks, 64 rows a call, as at
    # 20,000 concepts a block is 104 rows.
    whole = streaming.RowNormalisers(images, texts, rows_per_block=8)
    self.assertEqual(whole.rows_per_fill, 8 * streaming.MAX_FILL_BLOCKS)
    expected = whole.at(np.arange(700), 10.0)
    logits = 10.0 * (streaming.similarity.l2_normalise(images.astype(np.float64), 1, np)
                     @ streaming.similarity.l2_normalise(texts.astype(np.float64), 1, np).T)
    np.testing.assert_allclose(expected, np.log(np.exp(logits).sum(axis=1)), rtol=1e-6)
    # Asked in an order no layer would ask: other rows in each block, other padding,
    # the same bits.
    pieces = streaming.RowNormalisers(images, texts, rows_per_block=8)
    order = np.random.default_rng(0).permutation(700)
    for start in range(0, 700, 97):
      asked = order[start:start + 97]
      np.testing.assert_array_equal(pieces.at(asked, 10.0), expected[asked])
    np.testing.assert_array_equal(pieces.at(np.arange(700), 10.0), expected)
    self.assertEqual(pieces.rows_computed, 700)
    # Another a is another setting, computed separately.
    self.assertFalse(np.array_equal(pieces.at(np.arange(5), 2.0), expected[:5]))
    self.assertEqual(pieces.rows_computed, 705)

  @parameterized.parameters("soft_wpmi", "wpmi")
  def test_layers_and_stability_share_them_without_changing_a_bit(self, name):
    # 20 units x top_k ranks over 300 images: the blocked plan, which reads normalisers.
    images, texts, activations = embeddings(300, 31, 40, seed=5)
    first_layer, second_layer = activations[:, :20], activations[:, 20:]
    shared = streaming.RowNormalisers(images, texts)
    first = streaming.FUNCTIONS[name](images, texts, first_layer, row_normalisers=shared)
    computed = shared.rows_computed
    second = streaming.FUNCTIONS[name](images, texts, second_layer, row_normalisers=shared)
    rows = np.random.default_rng(1).integers(0, 300, (3, 20, similarity.default_top_k(name)))
    resampled = streaming.resampled_labels(name, images, texts, rows, row_normalisers=shared)
    # The second layer and the resamples read rows the first layer's already held.
    top_k = similarity.default_top_k(name)
    tops = [np.asarray(similarity.top_activations(layer, top_k)[1])
            for layer in (first_layer, second_layer)]
    self.assertEqual(computed, len(np.unique(tops[0])))
    self.assertEqual(shared.rows_computed,
                     len(np.unique(np.concatenate([t.ravel() for t in tops] + [rows.ravel()]))))
    np.testing.assert_array_equal(first, streaming.FUNCTIONS[name](images, texts, first_layer))
    np.testing.assert_array_equal(second,
                                  streaming.FUNCTIONS[name](images, texts, second_layer))
    np.testing.assert_array_equal(
        resampled, streaming.resampled_labels(name, images, texts, rows))

  @parameterized.parameters("soft_wpmi", "wpmi")
  def test_a_run_that_reads_the_normalisers_anyway_takes_the_blocked_plan(self, name):
    # 4 units x top_k ranks over 900 images: few shared rows, so on its own a call takes
    # the rank-group plan, which reads no normalisers; in a run whose stability reads
    # them anyway (reused), the blocked plan, one matmul pass over the rows.
    images, texts, activations = embeddings(900, 17, 4, seed=9)
    alone = streaming.RowNormalisers(images, texts)
    in_a_run = streaming.RowNormalisers(images, texts, reused=True)
    rank_groups = streaming.FUNCTIONS[name](images, texts, activations,
                                            row_normalisers=alone)
    blocked = streaming.FUNCTIONS[name](images, texts, activations,
                                        row_normalisers=in_a_run)
    self.assertEqual(alone.rows_computed, 0)
    top = similarity.top_activations(activations, similarity.default_top_k(name))[1]
    self.assertEqual(in_a_run.rows_computed, len(np.unique(np.asarray(top))))
    np.testing.assert_allclose(blocked, rank_groups, rtol=2e-6, atol=2e-4)
    np.testing.assert_array_equal(np.argmax(blocked, 1), np.argmax(rank_groups, 1))

  def test_normalisers_of_other_embeddings_are_refused(self):
    images, texts, activations = embeddings(300, 9, 4)
    other = streaming.RowNormalisers(images[:200], texts)
    with self.assertRaisesRegex(ValueError, "row_normalisers are of 200 images x 9"):
      streaming.soft_wpmi(images, texts, activations, row_normalisers=other)


class BFloat16Test(absltest.TestCase):

  def test_bfloat16_products_keep_planted_labels(self):
    # Each neuron fires on images near one concept: a known answer for every neuron.
    rng = np.random.default_rng(7)
    # Each of 20 concepts owns ~300 of 6000 images (more than soft_wpmi's top 100) and
    # one neuron: (soft-)WPMI's prior over neurons then has a clear answer everywhere.
    texts = rng.standard_normal((20, 32)).astype(np.float32)
    owner = rng.integers(0, 20, 6000)
    images = texts[owner] + 0.3 * rng.standard_normal((6000, 32)).astype(np.float32)
    planted = rng.permutation(20)
    activations = (owner[:, None] == planted[None, :]).astype(np.float32)
    activations += 0.1 * rng.random((6000, 20)).astype(np.float32)
    for fn in (streaming.soft_wpmi, streaming.wpmi):
      f32 = np.asarray(fn(images, texts, activations))
      bf16 = np.asarray(fn(images, texts, activations, compute_dtype="bfloat16"))
      np.testing.assert_array_equal(f32.argmax(1), planted)
      np.testing.assert_array_equal(bf16.argmax(1), planted)
      # bfloat16 keeps 8 bits of mantissa: the scores move, but little.
      self.assertLess(np.abs(bf16 - f32).max(), 0.05 * np.abs(f32).max())
      self.assertGreater(np.abs(bf16 - f32).max(), 0.0)

  def test_rescoring_repairs_the_labels_bfloat16_flips(self):
    # Random embeddings and ReLU activations: near ties everywhere, where bfloat16's
    # 8-bit products flip some labels (as at the benchmark's sizes).
    rng = np.random.default_rng(5)
    images = rng.standard_normal((3000, 64)).astype(np.float32)
    texts = rng.standard_normal((2000, 64)).astype(np.float32)
    activations = np.maximum(rng.standard_normal((3000, 256)), 0).astype(np.float32)
    for fn in (streaming.soft_wpmi, streaming.wpmi):
      f32 = np.asarray(fn(images, texts, activations)).argmax(1)
      with mock.patch.object(streaming, "RESCORED_CANDIDATES", 0):
        raw = np.asarray(fn(images, texts, activations, compute_dtype="bfloat16"))
      rescored = np.asarray(fn(images, texts, activations, compute_dtype="bfloat16"))
      raw_agreement = np.mean(raw.argmax(1) == f32)
      self.assertLess(raw_agreement, 1.0, fn.__name__)  # there are flips to repair
      self.assertGreater(np.mean(rescored.argmax(1) == f32), raw_agreement, fn.__name__)
      self.assertGreaterEqual(np.mean(rescored.argmax(1) == f32), 0.99, fn.__name__)

  def test_candidate_log_likelihood_equals_float64(self):
    rng = np.random.default_rng(2)
    images = similarity.l2_normalise(rng.standard_normal((50, 8)), xp=np)
    texts = similarity.l2_normalise(rng.standard_normal((30, 8)), xp=np)
    top = rng.integers(0, 50, (5, 7))
    candidates = rng.integers(0, 30, (5, 3))
    logits = 10.0 * images @ texts.T
    lse = np.log(np.exp(logits).sum(axis=1))
    membership = similarity.soft_wpmi_membership(7, 0.998, 0.97)
    probs = np.exp(logits - lse[:, None])
    for soft in (True, False):
      expected = np.empty((5, 3))
      for n in range(5):
        s = probs[top[n]][:, candidates[n]]
        terms = 1 + membership[:, None] * (s - 1) + 1e-7 if soft else s + 1e-7
        expected[n] = np.log(terms).sum(axis=0)
      got = streaming._candidate_log_likelihood(  # pylint: disable=protected-access
          jnp.asarray(images, jnp.float32), jnp.asarray(texts, jnp.float32),
          jnp.asarray(top), jnp.asarray(lse[top], jnp.float32), jnp.asarray(candidates),
          jnp.asarray(membership, jnp.float32), jnp.float32(10.0), jnp.float32(1e-7),
          soft=soft)
      np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-6, atol=1e-4)

  def test_unknown_dtype_is_refused(self):
    with self.assertRaisesRegex(ValueError, "compute_dtype"):
      streaming.soft_wpmi(np.ones((200, 4)), np.ones((3, 4)), np.ones((200, 2)),
                          compute_dtype="float16")


if __name__ == "__main__":
  absltest.main()

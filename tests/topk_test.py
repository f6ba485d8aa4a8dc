"""The running top-k of the probe pass equals the top-k of the whole matrix."""
from absl.testing import absltest
from absl.testing import parameterized
import jax.numpy as jnp
import numpy as np

from jaxdissect import labeling
from jaxdissect import similarity
from jaxdissect import store
from jaxdissect import topk


def _tied_matrix(num_images, num_units, seed):
  """Few distinct values, so most top-k slots are decided by the tie rule."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, 4, (num_images, num_units)).astype(np.float32)


def _run(matrix, batch_size, k, first_index=0):
  """The in-graph update over batches, the last one padded as the probe pass pads."""
  state = topk.empty_state(k, matrix.shape[1])
  for start in range(0, len(matrix), batch_size):
    block = matrix[start:start + batch_size]
    pad = batch_size - len(block)
    values = np.concatenate([block, np.full((pad, matrix.shape[1]), 99.0, np.float32)])
    ids = np.arange(first_index + start, first_index + start + batch_size, dtype=np.int32)
    mask = np.arange(batch_size) < len(block)
    state = topk.update_state(state, jnp.asarray(values), jnp.asarray(ids),
                              jnp.asarray(mask))
  return topk.from_state(state)


class RunningTopKTest(parameterized.TestCase):

  @parameterized.parameters(1, 3, 7, 64)
  def test_any_batch_size_equals_lax_top_k_of_the_matrix(self, batch_size):
    matrix = _tied_matrix(150, 9, seed=batch_size)
    running = _run(matrix, batch_size, k=20)
    values, ids = similarity.top_activations(matrix, 20)
    np.testing.assert_array_equal(running.values, np.asarray(values).T)
    np.testing.assert_array_equal(running.ids, np.asarray(ids).T)
    np.testing.assert_array_equal(running.minimum, matrix.min(axis=0))
    np.testing.assert_array_equal(running.maximum, matrix.max(axis=0))

  def test_rows_out_of_id_order_in_a_batch(self):
    # A multi-process global batch holds process 0's rows, then process 1's.
    matrix = _tied_matrix(64, 6, seed=9)
    state = topk.empty_state(5, 6)
    for start in range(0, 64, 16):
      order = np.concatenate([np.arange(start, start + 16, 2),
                              np.arange(start + 1, start + 16, 2)])
      state = topk.update_state(state, jnp.asarray(matrix[order]),
                                jnp.asarray(order, jnp.int32), jnp.ones(16, bool))
    np.testing.assert_array_equal(
        topk.from_state(state).ids, np.asarray(similarity.top_activations(matrix, 5)[1]).T)

  def test_merge_of_chunks_in_any_order_equals_one_pass(self):
    matrix = _tied_matrix(200, 5, seed=1)
    bounds = [(0, 37), (37, 120), (120, 200)]
    parts = [_run(matrix[a:b], 8, k=30, first_index=a) for a, b in bounds]
    whole = _run(matrix, 16, k=30)
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
      merged = topk.merge([parts[i] for i in order])
      np.testing.assert_array_equal(merged.ids, whole.ids)
      np.testing.assert_array_equal(merged.values, whole.values)

  def test_fewer_images_than_k_leaves_empty_slots_last(self):
    running = _run(_tied_matrix(5, 3, seed=2), 4, k=8)
    self.assertTrue(np.all(running.ids[5:] == topk.EMPTY_ID))
    self.assertTrue(np.all(running.ids[:5] < 5))

  def test_dead_and_non_finite_units_are_flagged(self):
    matrix = _tied_matrix(50, 4, seed=3)
    matrix[:, 1] = 2.5
    matrix[7, 2] = np.nan
    matrix[9, 3] = np.inf
    running = _run(matrix, 8, k=10)
    np.testing.assert_array_equal(running.dead, [False, True, False, False])
    np.testing.assert_array_equal(running.invalid, [False, False, True, True])
    # Non-finite values rank last: the listed top images are finite ones.
    self.assertNotIn(7, running.ids[:, 2])
    self.assertNotIn(9, running.ids[:, 3])

  def test_rows_of_skips_missing_images_keeping_order(self):
    global_ids = np.array([[0, 4], [5, 9]])
    np.testing.assert_array_equal(topk.rows_of(global_ids, [2, 7]), [[0, 3], [4, 7]])

  def test_top_for_recomputes_when_more_are_asked_than_kept(self):
    matrix = _tied_matrix(60, 3, seed=4)
    probe = store.ProbeActivations(
        np.zeros((60, 2), np.float32), {"l": matrix}, [str(i) for i in range(60)],
        top={"l": _run(matrix, 8, k=5)})
    self.assertEqual(probe.top_for("l", 5).k, 5)
    wider = probe.top_for("l", 12)
    np.testing.assert_array_equal(
        wider.ids, np.asarray(similarity.top_activations(matrix, 12)[1]).T)


class ScoringFromRunningTopKTest(parameterized.TestCase):

  @parameterized.parameters("soft_wpmi", "wpmi")
  def test_streaming_scores_from_top_k_equal_scores_from_matrix(self, fn):
    rng = np.random.default_rng(5)
    num_images, dim = 300, 16
    images = rng.standard_normal((num_images, dim)).astype(np.float32)
    texts = rng.standard_normal((40, dim)).astype(np.float32)
    matrix = _tied_matrix(num_images, 12, seed=6)
    matrix[:, 3] = 1.0           # dead
    matrix[10, 4] = np.nan       # invalid
    running = _run(matrix, 32, k=topk.RUNNING_TOP_K)
    from_matrix = labeling.score_layer(fn, None, matrix, embeddings=(images, texts))
    from_top = labeling.score_layer(fn, None, None, embeddings=(images, texts),
                                    top=running)
    np.testing.assert_array_equal(from_top.dead, from_matrix.dead)
    np.testing.assert_array_equal(from_top.invalid, from_matrix.invalid)
    np.testing.assert_allclose(from_top.scores, from_matrix.scores, rtol=1e-6, atol=1e-6)
    labels_top = labeling.label_units(from_top.scores, None, [f"c{i}" for i in range(40)],
                                      from_top.dead, from_top.invalid, top=running,
                                      tiebreak=from_top.tiebreak)
    labels_matrix = labeling.label_units(from_matrix.scores, matrix,
                                         [f"c{i}" for i in range(40)], from_matrix.dead,
                                         from_matrix.invalid, tiebreak=from_matrix.tiebreak)
    self.assertEqual(labels_top.labels, labels_matrix.labels)
    np.testing.assert_array_equal(labels_top.top_image_ids, labels_matrix.top_image_ids)


if __name__ == "__main__":
  absltest.main()

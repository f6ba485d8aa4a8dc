"""Compositional labels: planted AND / OR / prompt units get their expression, and every
score equals an explicit NumPy float64 computation over P."""
from unittest import mock

from absl.testing import absltest
import numpy as np

from jaxdissect import compositional
from jaxdissect import linear

CONCEPTS = [f"c{i}" for i in range(30)]
CONCEPTS[3], CONCEPTS[7], CONCEPTS[1], CONCEPTS[2] = "red", "striped", "dog", "grass"


def _world(num_images=3000, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(num_images, 32))
  texts = rng.normal(size=(len(CONCEPTS), 32))
  P = linear.normalise_rows(images) @ linear.normalise_rows(texts).T
  return rng, images, texts, P


def _standardised(P, fit_rows):
  return (P - P[fit_rows].mean(0)) / P[fit_rows].std(0)


def _candidates(P, z, ids):
  """{expression: (N,) values} of one unit's singles (raw P columns) and the AND / OR
  of each pair of them (min / max of the standardised columns z)."""
  out = {CONCEPTS[c]: P[:, c] for c in ids}
  for i, j in compositional.pairs(len(ids)):
    a, b = z[:, ids[i]], z[:, ids[j]]
    out[f"{CONCEPTS[ids[i]]} AND {CONCEPTS[ids[j]]}"] = np.minimum(a, b)
    out[f"{CONCEPTS[ids[i]]} OR {CONCEPTS[ids[j]]}"] = np.maximum(a, b)
  return out


class ComposeTest(absltest.TestCase):

  def test_planted_and_or_and_single_units(self):
    rng, images, texts, P = _world()
    held = linear.holdout_mask(len(images), 0.25, 0)
    z = _standardised(P, ~held)
    acts = np.stack([np.minimum(z[:, 3], z[:, 7]),  # red AND striped
                     np.maximum(z[:, 1], z[:, 2]),  # dog OR grass
                     z[:, 5],
                     rng.normal(size=len(images))], axis=1)
    acts[:, :3] += 0.1 * rng.normal(size=(len(images), 3))
    got = compositional.compose(acts, images, texts, CONCEPTS, np.ones(4, bool), held,
                                beam=5)
    self.assertIn(got.expression[0], ("red AND striped", "striped AND red"))
    self.assertIn(got.expression[1], ("dog OR grass", "grass OR dog"))
    self.assertEqual(got.expression[2], "c5")
    self.assertGreater(got.score[:3].min(), 0.95)
    self.assertLess(abs(got.score[3]), 0.15)

  def test_scores_equal_explicit_computation_and_chunks_change_nothing(self):
    rng, images, texts, P = _world(num_images=800, seed=1)
    held = linear.holdout_mask(len(images), 0.25, 2)
    acts = P[:, :6] @ rng.normal(size=(6, 5)) + 0.01 * rng.normal(size=(800, 5))
    acts[:, 4] = 0.0  # constant: left out
    usable = np.array([True, True, False, True, True])
    got = compositional.compose(acts, images, texts, CONCEPTS, usable, held, beam=4)
    fit_moments = linear.image_moments(images, acts, held)[0]
    ids, _ = linear.top_correlated(fit_moments, texts, usable, 4)
    z = _standardised(P, ~held)
    for unit in (0, 1, 3):
      candidates = _candidates(P, z, ids[unit])
      fit = {k: np.corrcoef(v[~held], acts[~held, unit])[0, 1]
             for k, v in candidates.items()}
      best = max(fit, key=fit.get)
      self.assertEqual(got.expression[unit], best)
      self.assertAlmostEqual(got.fit_score[unit], fit[best], places=5)
      self.assertAlmostEqual(
          got.score[unit], np.corrcoef(candidates[best][held], acts[held, unit])[0, 1],
          places=5)
    self.assertEqual(got.expression[2], "")
    self.assertEqual(got.expression[4], "")
    self.assertTrue(np.isnan(got.score[[2, 4]]).all())
    with mock.patch.object(compositional, "CHUNK_BYTES", 4 * 5 * 12 * 37):
      chunked = compositional.compose(acts, images, texts, CONCEPTS, usable, held, beam=4)
    self.assertEqual(chunked.expression, got.expression)
    np.testing.assert_allclose(chunked.score, got.score, rtol=1e-5)

  def test_selection_shares_equal_explicit_weighted_choices(self):
    rng, images, texts, P = _world(num_images=900, seed=4)
    held = linear.holdout_mask(len(images), 0.25, 1)
    z = _standardised(P, ~held)
    acts = np.concatenate([
        np.stack([np.minimum(z[:, 3], z[:, 7]) + 0.05 * rng.normal(size=900),
                  P[:, :6] @ rng.normal(size=6) + 0.02 * rng.normal(size=900)], axis=1),
        rng.normal(size=(900, 10))], axis=1)  # 10 units of noise
    weights = rng.poisson(1.0, (7, 900))
    usable = np.ones(12, bool)
    got = compositional.compose(acts, images, texts, CONCEPTS, usable, held, beam=4,
                                weights=weights)
    ids, _ = linear.top_correlated(linear.image_moments(images, acts, held)[0], texts,
                                   usable, 4)

    def weighted_corr(x, y, w):
      x, y = x - np.average(x, weights=w), y - np.average(y, weights=w)
      return np.sum(w * x * y) / np.sqrt(np.sum(w * x * x) * np.sum(w * y * y))

    for unit in range(12):
      candidates = _candidates(P, z, ids[unit])
      kept = 0
      for w in weights:
        fit_w = np.where(held, 0, w).astype(np.float64)
        scores = {k: weighted_corr(v, acts[:, unit], fit_w) for k, v in candidates.items()}
        kept += max(scores, key=scores.get) == got.expression[unit]
      self.assertAlmostEqual(got.selection_share[unit], kept / len(weights), msg=unit)
    self.assertEqual(got.selection_share[0], 1.0)  # planted red AND striped
    self.assertLess(np.mean(got.selection_share[2:]), 0.6)  # noise: 0.30 measured
    without = compositional.compose(acts, images, texts, CONCEPTS, usable, held, beam=4)
    self.assertIsNone(without.selection_share)
    self.assertEqual(without.expression, got.expression)
    # Correlations in float32 batches of another shape (the resamples ride along): equal
    # to float32 rounding in absolute terms; a relative bound fails on scores near 0
    # (1.1e-6 relative at 0.0103 with jax 0.10.2).
    np.testing.assert_allclose(without.score, got.score, rtol=0, atol=1e-6)

  def test_prompt_pairs_are_embedded_and_can_win(self):
    rng, images, texts, _ = _world(seed=3)
    held = linear.holdout_mask(len(images), 0.25, 0)
    prompt = texts[3] + texts[7] + 2 * rng.normal(size=32)  # "red striped"
    column = linear.normalise_rows(images) @ (prompt / np.linalg.norm(prompt))
    acts = (column + 0.001 * rng.normal(size=len(images)))[:, None]
    asked = []

    def embed(prompts):
      asked.extend(prompts)
      return np.stack([prompt if p == "red striped" else texts[0] for p in prompts])

    got = compositional.compose(acts, images, texts, CONCEPTS, np.ones(1, bool), held,
                                beam=4, embed_texts=embed)
    self.assertIn("red striped", asked)
    self.assertEqual(got.expression[0], "red striped")
    self.assertGreater(got.score[0], 0.99)
    with self.assertRaisesRegex(ValueError, "beam must be at least 1"):
      compositional.compose(acts, images, texts, CONCEPTS, np.ones(1, bool), held, beam=0)


if __name__ == "__main__":
  absltest.main()

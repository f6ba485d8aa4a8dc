"""Compositional labels: the best of a unit's single concepts, their pairwise AND / OR, and
(where a text encoder is given) the paper's combined prompts "X Y", by correlation.

Cost is bounded by a beam: each unit's candidates are its `beam` concepts whose P
columns correlate best with it (from the fit images' moments, linear.top_correlated),
so a unit has beam singles, beam (beam - 1) / 2 ANDs and as many ORs, and with an
encoder beam (beam - 1) ordered prompts. AND and OR are the per-image minimum and
maximum of the two concepts' standardised P columns (z-scored over the fit images: raw
columns sit at different levels, and the minimum of two raw columns is mostly the
lower one); a prompt "X Y" is a new concept embedded by CLIP, whose P column is linear
in the image embedding like any other (its correlation comes from the moments).

Every expression is scored by the Pearson correlation with the unit's activations, the
metric that passes the label sanity checks (sanity.py): chosen on the fit images,
reported on the held-out ones (the same split as the linear explanations). AND and OR
are not linear in the embedding, so they take one streaming pass over the images:
P for the candidates' concepts a chunk of images at a time, the (images x units x
expressions) values reduced to sums in the chunk (jitted, units split over the mesh),
the sums accumulated in float64. Memory: chunk x units x expressions, never
images x concepts.

Selection share (with the run's bootstrap weights): the share of the resamples of the
fit images in which the unit's expression is chosen again among the same candidate
expressions (the beam is the run's: re-selecting it per resample would re-run the
beam's correlations, and the shares ask how firmly the choice among these candidates
holds). The resamples' AND / OR sums come from the same pass, one more weighted sum
per resample; singles and prompts from the resamples' moments.
"""
import dataclasses
import functools
import itertools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec

from jaxdissect import linear
from jaxdissect import sharding

DEFAULT_BEAM = 6
# Bytes of one chunk's (images, units, expressions) float32 values.
CHUNK_BYTES = 128 * 1024 * 1024
AND, OR = "AND", "OR"


@dataclasses.dataclass
class Compositions:
  """expression: (K,) the best expression of each unit ("" for units left out);
  fit_score, score: (K,) its correlation on the fit and the held-out images (NaN for
  units left out); selection_share: (K,) the share of the bootstrap resamples of the
  fit images that choose the same expression (NaN for units left out), or None."""
  expression: list
  fit_score: np.ndarray
  score: np.ndarray
  selection_share: np.ndarray | None = None


def pairs(beam: int) -> list[tuple[int, int]]:
  return list(itertools.combinations(range(beam), 2))


def _pair_body(images, acts, split_weights, texts, means, inv_stds, ids, beam):
  """One chunk: per split, sums over its images of each (pair, unit) AND and OR value,
  its square and its product with the unit's activation.

  images: (C, D) normalised, acts: (C, B) the chunk's activations of B units,
  split_weights: (S, C) each image's weight in each sum: 1 where it is in the fit /
  held-out split, then its bootstrap count in each resample of the fit images (0 for
  padding rows), texts: (U, D) the candidates' concepts; means, inv_stds: (U,) of their
  P columns on the fit images; ids: (B, beam) each unit's candidates as rows of texts.
  Returns (3, S, 2E, B) float32: sum x, sum x^2, sum x a per row of split_weights.
  """
  # A matmul per beam position rather than a gather from P's (C, U) columns: gathers
  # are slow on CPU, and U is up to beam x B anyway.
  candidates = [(images @ texts[ids[:, k]].T - means[ids[:, k]][None, :]) *
                inv_stds[ids[:, k]][None, :] for k in range(beam)]  # beam x (C, B)
  pair_list = pairs(beam)
  values = jnp.stack([jnp.minimum(candidates[i], candidates[j]) for i, j in pair_list] +
                     [jnp.maximum(candidates[i], candidates[j]) for i, j in pair_list])
  return jnp.stack([jnp.einsum("ecb,sc->seb", values, split_weights),
                    jnp.einsum("ecb,sc->seb", jnp.square(values), split_weights),
                    jnp.einsum("ecb,sc->seb", values * acts[None], split_weights)])


@functools.lru_cache(maxsize=None)
def _pair_sums(mesh: Mesh | None, beam: int):
  body = functools.partial(_pair_body, beam=beam)
  if mesh is None or mesh.devices.size == 1:
    return jax.jit(body)
  split, replicated = PartitionSpec(sharding.DATA_AXIS), PartitionSpec()
  return jax.jit(jax.shard_map(
      body, mesh=mesh,
      in_specs=(replicated, PartitionSpec(None, sharding.DATA_AXIS), replicated,
                replicated, replicated, replicated, split),
      out_specs=PartitionSpec(None, None, None, sharding.DATA_AXIS)))


def _pair_correlations(image_embeddings, activations, texts, means, inv_stds,
                       ids: np.ndarray, held_out: np.ndarray, mesh, weights=None):
  """Correlations of each unit's ANDs then ORs, (K, 2E) each: on the fit images, on
  the held-out ones, then on each resample of the fit images (weights: (R, N)
  bootstrap counts, or None for none)."""
  num_images, num_units = activations.shape
  beam = ids.shape[1]
  devices = 1 if mesh is None else mesh.devices.size
  padded_units = -(-num_units // devices) * devices
  ids_padded = np.zeros((padded_units, beam), np.int32)
  ids_padded[:num_units] = ids
  width = 2 * len(pairs(beam))
  chunk = max(8, min(num_images, CHUNK_BYTES // (4 * padded_units * (width + beam)
                                                  + 4 * len(texts))))
  fn = _pair_sums(mesh, beam)
  device_args = [jnp.asarray(a) for a in (np.asarray(texts, np.float32),
                                          np.asarray(means, np.float32),
                                          np.asarray(inv_stds, np.float32), ids_padded)]
  num_sums = 2 + (0 if weights is None else len(weights))
  sums = np.zeros((3, num_sums, width, num_units))
  act_sums = np.zeros((num_sums, 2, num_units))
  counts = np.zeros(num_sums)
  for start in range(0, num_images, chunk):
    stop = min(start + chunk, num_images)
    block = np.zeros((chunk, image_embeddings.shape[1]), np.float32)
    block[:stop - start] = linear.normalise_rows(image_embeddings[start:stop])
    acts = np.asarray(activations[start:stop], np.float64)
    act_block = np.zeros((chunk, padded_units), np.float32)
    act_block[:stop - start, :num_units] = acts
    held = np.asarray(held_out[start:stop], bool)
    rows = [~held, held]
    if weights is not None:
      rows += list(np.asarray(weights[:, start:stop], np.float64) * ~held)
    row_weights = np.stack(rows).astype(np.float64)  # (num_sums, stop - start)
    split_weights = np.zeros((num_sums, chunk), np.float32)
    split_weights[:, :stop - start] = row_weights
    out = fn(jnp.asarray(block), jnp.asarray(act_block), jnp.asarray(split_weights),
             *device_args)
    sums += np.asarray(out, np.float64)[..., :num_units]
    act_sums += np.stack([row_weights @ acts, row_weights @ np.square(acts)], axis=1)
    counts += row_weights.sum(axis=1)
  out = []
  for split in range(num_sums):
    n = max(counts[split], 1)
    s_x, s_xx, s_xa = (sums[k, split].T for k in range(3))
    s_a, s_aa = act_sums[split][0][:, None], act_sums[split][1][:, None]
    covariance = s_xa / n - (s_x / n) * (s_a / n)
    variance_x = np.maximum(s_xx / n - np.square(s_x / n), 0.0)
    variance_a = np.maximum(s_aa / n - np.square(s_a / n), 0.0)
    denominator = np.sqrt(variance_x * variance_a)
    with np.errstate(invalid="ignore", divide="ignore"):
      out.append(np.where(denominator > 1e-12, covariance / np.where(
          denominator > 0, denominator, 1.0), np.nan))
  return out


def compose(activations, image_embeddings, text_embeddings, concepts: Sequence[str],
            usable: np.ndarray, held_out: np.ndarray, *, beam: int = DEFAULT_BEAM,
            embed_texts: Callable[[list[str]], np.ndarray] | None = None,
            mesh=None, moments=None, geometry=None, weights=None,
            resampled=None) -> Compositions:
  """The best expression of each usable unit.

  activations: (N, K), image_embeddings: (N, D), either may be a memmap;
  text_embeddings: (M, D) of `concepts`; held_out: (N,) bool, the images the reported
  score is measured on; embed_texts: texts -> (len, D) CLIP text embeddings for the
  "X Y" prompts (None leaves them out); moments: linear.image_moments(...) of the same
  split, and geometry: linear.concept_geometry of the fit moments, if already computed;
  weights: (R, N) bootstrap counts (stability.poisson_weights) for the selection
  shares, or None; resampled: linear.resampled_moments(..., ~held_out, weights) if
  already computed.
  """
  if beam < 1:
    raise ValueError(f"beam must be at least 1, got {beam}.")
  num_units = activations.shape[1]
  if moments is None:
    moments = linear.image_moments(image_embeddings, activations, held_out)
  fit_moments, test_moments, _ = moments
  usable = np.asarray(usable, bool) & (fit_moments.activation_var > 0) & (
      test_moments.activation_var > 0)
  geometry = geometry or linear.concept_geometry(text_embeddings, fit_moments.image_cov)
  texts = geometry.texts
  beam = min(beam, len(texts))
  ids, fit_single = linear.top_correlated(fit_moments, text_embeddings, usable, beam, mesh,
                                          geometry)
  test_single = linear.simulation_matrix(texts, ids, test_moments)
  names = [[concepts[c] for c in row] for row in ids]
  fit_scores, test_scores, expressions = [fit_single], [test_single], [names]
  if weights is None:
    resampled = []
  elif resampled is None:
    resampled = linear.resampled_moments(image_embeddings, activations, ~held_out,
                                         weights)
  # Per resample, the same candidates' fit correlations, in the same order.
  resample_scores = [[linear.simulation_matrix(texts, ids, m)] for m in resampled]
  if beam >= 2:
    means = texts @ fit_moments.image_mean
    # P only for the concepts some unit's beam holds.
    union, local_ids = np.unique(ids, return_inverse=True)
    fit_pairs, test_pairs, *resample_pairs = _pair_correlations(
        image_embeddings, activations, texts[union], means[union],
        geometry.inv_std[union],
        local_ids.reshape(ids.shape), held_out, mesh, weights)
    fit_scores.append(fit_pairs)
    test_scores.append(test_pairs)
    for scores, pair_scores in zip(resample_scores, resample_pairs):
      scores.append(pair_scores)
    expressions.append([[f"{row[i]} {op} {row[j]}" for op in (AND, OR)
                         for i, j in pairs(beam)] for row in names])
    if embed_texts is not None:
      ordered = list(itertools.permutations(range(beam), 2))
      prompts = sorted({f"{row[i]} {row[j]}" for row in np.array(names, object)[usable]
                        for i, j in ordered})
      if prompts:
        prompt_index = {p: k for k, p in enumerate(prompts)}
        prompt_texts = linear.normalise_rows(embed_texts(prompts))
        prompt_ids = np.array([[prompt_index.get(f"{row[i]} {row[j]}", 0)
                                for i, j in ordered] for row in names])
        fit_scores.append(linear.simulation_matrix(prompt_texts, prompt_ids, fit_moments))
        test_scores.append(linear.simulation_matrix(prompt_texts, prompt_ids,
                                                    test_moments))
        for scores, m in zip(resample_scores, resampled):
          scores.append(linear.simulation_matrix(prompt_texts, prompt_ids, m))
        expressions.append([[f"{row[i]} {row[j]}" for i, j in ordered] for row in names])
  fit_all = np.concatenate(fit_scores, axis=1)
  test_all = np.concatenate(test_scores, axis=1)
  labels = [sum((part[u] for part in expressions), []) for u in range(num_units)]
  expression, fit_best, test_best = [""] * num_units, np.full(num_units, np.nan), \
      np.full(num_units, np.nan)
  best = _best(fit_all)
  for unit in np.flatnonzero(usable):
    expression[unit] = labels[unit][best[unit]]
    fit_best[unit], test_best[unit] = fit_all[unit, best[unit]], test_all[unit, best[unit]]
  share = None
  if resample_scores:
    chosen = np.stack([_best(np.concatenate(scores, axis=1)) for scores in resample_scores])
    share = np.where(usable, np.mean(chosen == best[None], axis=0), np.nan)
  return Compositions(expression, fit_best, test_best, share)


def _best(scores: np.ndarray) -> np.ndarray:
  """(K,) each row's best column of (K, E) correlations, NaN as the worst; the first
  of equals."""
  return np.argmax(np.where(np.isnan(scores), -np.inf, scores), axis=1)

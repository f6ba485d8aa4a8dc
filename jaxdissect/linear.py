"""Linear explanations: each unit as a sparse signed sum of concepts' CLIP activations,
fitted on some probe images and scored on the others, from D-dimensional moments.

A unit with pooled activations a (N,) is explained by a set S of at most k concepts and
weights w (one per concept, signed, no intercept reported) with

    a ~ b + sum_{c in S} w_c P[:, c],      P = norm(I) @ norm(T).T  (N x M),

and its simulation score is the Pearson correlation of that prediction with a on
images that took no part in the fit. Because P[:, c] = norm(I) t_c is linear in the
image embedding, every quantity needs only moments of the embeddings and activations:
with Sigma the covariance of norm(I) over the images (D x D) and x_u = cov(norm(I), a_u)
(D,),

    cov(P[:, c], a_u) = t_c . x_u,     cov(P[:, c], P[:, c']) = t_c Sigma t_c',
    corr(sum_c w_c P[:, c], a_u) = v . x_u / sqrt(v Sigma v var(a_u)),  v = sum_c w_c t_c.

So one streaming pass over the images (image_moments: Sigma, X, var(a) per split, in
float64) is all the data the fit and its scores read: memory D x D + K x D, whatever the
number of images and concepts; P is never formed.

The fit is orthogonal matching pursuit: step s adds the concept whose P column
correlates most (in absolute value) with the current residual, a - prediction, then
refits the weights of all chosen concepts by least squares (a relative ridge of RIDGE
keeps near-duplicate concepts solvable). The scoring of all units against all concepts
at each step, (units x D) @ (D x concepts), is the costly part: jitted, in blocks of
units, split over the mesh. The small least-squares solves are batched float64 NumPy.

The correlation label (correlation_labels) is the one-concept case with the sign kept:
the concept whose P column correlates best with the unit. Every selection can be
restricted to some concepts (concept_geometry's `allowed`: the run passes the concepts
the probe images show, visibility.py).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec

from jaxdissect import sharding

DEFAULT_MAX_CONCEPTS = 5
# Ridge added to each least-squares system, relative to the mean variance of its chosen
# P columns: negligible next to a real column, enough to solve two near-equal ones.
RIDGE = 1e-6
# A concept whose P column's variance is below this share of the largest is constant
# over the images (up to rounding): it has no correlation with anything.
FLAT = 1e-9
# Bytes of one (units, concepts) float32 block of selection scores.
BLOCK_BYTES = 256 * 1024 * 1024
# Bytes of activations read per chunk of images by image_moments.
CHUNK_BYTES = 64 * 1024 * 1024


@dataclasses.dataclass
class Moments:
  """Second moments over one set of images, float64.

  count: images. image_cov: (D, D) covariance of the normalised image embeddings.
  cross: (K, D) covariance of each unit's activation with them. activation_var: (K,).
  All divided by count (population covariances: correlations do not care).
  image_mean: (D,) mean of the normalised image embeddings.
  """
  count: int
  image_cov: np.ndarray
  cross: np.ndarray
  activation_var: np.ndarray
  image_mean: np.ndarray


class _Sums:
  """Shifted sums of one split; shifting by a first-chunk mean keeps float64's
  sum-of-squares from cancelling for activations with a large mean."""

  def __init__(self, dim: int, units: int, shift=None):
    self.shift = shift
    self.count = 0
    self.image = np.zeros(dim)
    self.image_square = np.zeros((dim, dim))
    self.act = np.zeros(units)
    self.act_square = np.zeros(units)
    self.cross = np.zeros((units, dim))

  def add(self, images: np.ndarray, acts: np.ndarray,
          weights: np.ndarray | None = None) -> None:
    """weights: (rows,) how many times each row counts (a bootstrap resample), or
    None for once."""
    weighted = images if weights is None else images * weights[:, None]
    self.count += len(images) if weights is None else float(weights.sum())
    self.image += weighted.sum(axis=0)
    self.image_square += weighted.T @ images
    self.act += acts.sum(axis=0) if weights is None else weights @ acts
    self.act_square += (np.square(acts).sum(axis=0) if weights is None
                        else weights @ np.square(acts))
    self.cross += acts.T @ weighted

  def merged(self, other: "_Sums") -> "_Sums":
    out = _Sums(len(self.image), len(self.act), self.shift)
    for name in ("count", "image", "image_square", "act", "act_square", "cross"):
      setattr(out, name, getattr(self, name) + getattr(other, name))
    return out

  def moments(self) -> Moments:
    n = max(self.count, 1)
    image_mean, act_mean = self.image / n, self.act / n
    return Moments(
        self.count, self.image_square / n - np.outer(image_mean, image_mean),
        self.cross / n - np.outer(act_mean, image_mean),
        np.maximum(self.act_square / n - np.square(act_mean), 0.0),
        image_mean + (0.0 if self.shift is None else self.shift))


def normalise_rows(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.where(norms > 0, norms, 1.0)


def holdout_mask(num_images: int, fraction: float, seed: int) -> np.ndarray:
  """(num_images,) bool, True for the held-out images: round(fraction N) of them (at
  least one, and at least one left to fit), drawn with the seed."""
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"the held-out fraction must lie in (0, 1), got {fraction!r}.")
  held = min(max(1, int(round(fraction * num_images))), num_images - 1)
  mask = np.zeros(num_images, bool)
  mask[np.random.default_rng([seed, 16]).permutation(num_images)[:held]] = True
  return mask


def resampled_moments(image_embeddings, activations, rows: np.ndarray,
                      weights: np.ndarray) -> list[Moments]:
  """Moments of the images `rows` ((N,) bool) in each bootstrap resample: weights
  (R, N), image i counted weights[r, i] times in resample r; one pass over the images.
  """
  num_images, num_units = activations.shape
  dim = image_embeddings.shape[1]
  chunk = max(1, CHUNK_BYTES // (8 * max(1, num_units + dim)))
  sums, shift = [], None
  for start in range(0, num_images, chunk):
    images = normalise_rows(image_embeddings[start:start + chunk])
    acts = np.asarray(activations[start:start + chunk], np.float64)
    if shift is None:
      shift = (images.mean(axis=0), acts.mean(axis=0))
      sums = [_Sums(dim, num_units, shift[0]) for _ in range(len(weights))]
    keep = np.asarray(rows[start:start + chunk], bool)
    images, acts = images[keep] - shift[0], acts[keep] - shift[1]
    for resample, total in enumerate(sums):
      total.add(images, acts, weights[resample, start:start + chunk][keep].astype(np.float64))
  return [total.moments() for total in sums]


def image_moments(image_embeddings, activations, held_out: np.ndarray | None = None
                  ) -> tuple[Moments, Moments | None, Moments]:
  """(fit, held-out, all) moments in one pass over the images.

  image_embeddings: (N, D), activations: (N, K), either may be a memmap (read a chunk
  of images at a time). held_out: (N,) bool or None (then fit = all, held-out None).
  """
  num_images, num_units = activations.shape
  if len(image_embeddings) != num_images:
    raise ValueError(f"{len(image_embeddings)} image embeddings but {num_images} rows "
                     "of activations.")
  dim = image_embeddings.shape[1]
  chunk = max(1, CHUNK_BYTES // (8 * max(1, num_units + dim)))
  fit, held = _Sums(dim, num_units), _Sums(dim, num_units)
  shift = None
  for start in range(0, num_images, chunk):
    images = normalise_rows(image_embeddings[start:start + chunk])
    acts = np.asarray(activations[start:start + chunk], np.float64)
    if shift is None:
      shift = (images.mean(axis=0), acts.mean(axis=0))
      fit.shift = held.shift = shift[0]
    images, acts = images - shift[0], acts - shift[1]
    mask = (np.zeros(len(images), bool) if held_out is None
            else np.asarray(held_out[start:start + chunk], bool))
    fit.add(images[~mask], acts[~mask])
    held.add(images[mask], acts[mask])
  return (fit.moments(), held.moments() if held_out is not None else None,
          fit.merged(held).moments())


# ------------------------------------------------------------------- selection (jit)
def _select_body(residual, texts, inv_std, chosen, signed):
  """residual: (B, D) f32, texts: (M, D) f32, inv_std: (M,) 1 / std of each P column
  (0 for flat ones), chosen: (B, s) concept ids already taken (M: none) -> (B,) int32
  argmax over the others of (signed or absolute) t_c . residual / std_c."""
  scores = (residual @ texts.T) * inv_std[None, :]
  scores = scores if signed else jnp.abs(scores)
  scores = jnp.where(inv_std[None, :] > 0, scores, -jnp.inf)
  concept = jnp.arange(scores.shape[1])[None, :]
  for step in range(chosen.shape[1]):  # a compare per chosen concept beats a scatter
    scores = jnp.where(concept == chosen[:, step:step + 1], -jnp.inf, scores)
  return jnp.argmax(scores, axis=1).astype(jnp.int32)


def _top_body(residual, texts, inv_std, chosen, k):
  """As _select_body, signed, but the k best: ((B, k) int32 ids, (B, k) scores)."""
  del chosen
  scores = (residual @ texts.T) * inv_std[None, :]
  scores = jnp.where(inv_std[None, :] > 0, scores, -jnp.inf)
  values, ids = jax.lax.top_k(scores, k)
  return ids.astype(jnp.int32), values


@functools.lru_cache(maxsize=None)
def _selector(mesh: Mesh | None, signed: bool, k: int = 0):
  body = (functools.partial(_top_body, k=k) if k else
          functools.partial(_select_body, signed=signed))
  if mesh is None or mesh.devices.size == 1:
    return jax.jit(body)
  split, replicated = PartitionSpec(sharding.DATA_AXIS), PartitionSpec()
  return jax.jit(jax.shard_map(body, mesh=mesh,
                               in_specs=(split, replicated, replicated, split),
                               out_specs=(split, split) if k else split))


def _block_size(num_units: int, num_concepts: int, devices: int) -> int:
  """Units per selection block: the (block, concepts) scores within BLOCK_BYTES, a
  multiple of the devices, no bigger than the units need."""
  cap = max(1, BLOCK_BYTES // (4 * max(1, num_concepts)))
  block = min(cap, -(-num_units // devices) * devices)
  return max(devices, block // devices * devices)


def _select(residual: np.ndarray, texts: jax.Array, inv_std: jax.Array,
            chosen: np.ndarray, num_concepts: int, mesh: Mesh | None,
            signed: bool, k: int = 0):
  """The selection for every unit, in fixed-size blocks (one compilation): (units,)
  ids, or with k > 0 ((units, k) ids, (units, k) scores) of the k best, signed."""
  num_units = len(residual)
  devices = 1 if mesh is None else mesh.devices.size
  block = _block_size(num_units, num_concepts, devices)
  fn = _selector(mesh, signed, k)
  ids = np.empty((num_units, k) if k else num_units, np.int64)
  values = np.empty((num_units, k), np.float64)
  for start in range(0, num_units, block):
    stop = min(start + block, num_units)
    rows = np.zeros((block, residual.shape[1]), np.float32)
    rows[:stop - start] = residual[start:stop]
    taken = np.full((block, chosen.shape[1]), num_concepts, np.int32)
    taken[:stop - start] = chosen[start:stop]
    out = fn(jnp.asarray(rows), texts, inv_std, jnp.asarray(taken))
    if k:
      ids[start:stop] = np.asarray(out[0])[:stop - start]
      values[start:stop] = np.asarray(out[1])[:stop - start]
    else:
      ids[start:stop] = np.asarray(out)[:stop - start]
  return (ids, values) if k else ids


@dataclasses.dataclass
class ConceptGeometry:
  """The concepts' P columns seen through one set of images' moments: texts (M, D)
  normalised float64, texts_cov (M, D) = texts @ Sigma, inv_std (M,) 1/std of each P
  column, 0 where the column is flat; texts_device, inv_std_device: float32 copies on
  the device for the selection. Computed once per moments (M x D x D) and shared by
  the fit, the correlation labels and the compositional candidates."""
  texts: np.ndarray
  texts_cov: np.ndarray
  inv_std: np.ndarray

  @functools.cached_property
  def texts_device(self) -> jax.Array:
    return jnp.asarray(self.texts, jnp.float32)

  @functools.cached_property
  def inv_std_device(self) -> jax.Array:
    return jnp.asarray(self.inv_std, jnp.float32)


def concept_geometry(text_embeddings, image_cov: np.ndarray,
                     allowed: np.ndarray | None = None) -> ConceptGeometry:
  """allowed: (M,) bool, the concepts a selection may choose (visibility.py's visible
  concepts), or None for all; the others get inv_std 0, as flat columns do."""
  texts = normalise_rows(text_embeddings)
  texts_cov = texts @ image_cov
  column_var = np.sum(texts_cov * texts, axis=1)
  varies = column_var > FLAT * max(float(column_var.max(initial=0.0)), 1e-300)
  if allowed is not None:
    allowed = np.asarray(allowed, bool)
    if allowed.shape != varies.shape:
      raise ValueError(f"allowed has shape {allowed.shape}, the concepts "
                       f"{varies.shape}.")
    varies &= allowed
  inv_std = np.where(varies, 1.0 / np.sqrt(np.where(varies, column_var, 1.0)), 0.0)
  return ConceptGeometry(texts, texts_cov, inv_std)


def correlation_labels(moments: Moments, text_embeddings, usable: np.ndarray,
                       mesh: Mesh | None = None,
                       geometry: ConceptGeometry | None = None) -> np.ndarray:
  """(K,) int64: for each unit the concept whose P column correlates best (signed) with
  its activations over the moments' images; -1 for unusable or constant units.
  geometry: concept_geometry(text_embeddings, moments.image_cov) if already computed."""
  geometry = geometry or concept_geometry(text_embeddings, moments.image_cov)
  live = np.asarray(usable, bool) & (moments.activation_var > 0)
  out = np.full(len(live), -1, np.int64)
  if live.any() and (geometry.inv_std > 0).any():
    out[live] = _select(moments.cross[live], geometry.texts_device,
                        geometry.inv_std_device, np.zeros((int(live.sum()), 0), np.int32),
                        len(geometry.texts), mesh, signed=True)
  return out


def top_correlated(moments: Moments, text_embeddings, usable: np.ndarray, k: int,
                   mesh: Mesh | None = None, geometry: ConceptGeometry | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Each unit's k concepts whose P columns correlate best (signed) with it over the
  moments' images: ((K, k) int64 ids, best first, (K, k) correlations); rows of
  unusable or constant units are 0 and NaN. k may not exceed the concepts.
  geometry: concept_geometry(text_embeddings, moments.image_cov) if already computed."""
  geometry = geometry or concept_geometry(text_embeddings, moments.image_cov)
  live = np.asarray(usable, bool) & (moments.activation_var > 0)
  ids = np.zeros((len(live), k), np.int64)
  correlations = np.full((len(live), k), np.nan)
  if live.any():
    ids[live], _ = _select(moments.cross[live], geometry.texts_device,
                           geometry.inv_std_device, np.zeros((int(live.sum()), 0), np.int32),
                           len(geometry.texts), mesh, signed=True, k=k)
    correlations[live] = simulation_matrix(geometry.texts, ids[live],
                                           _rows(moments, np.flatnonzero(live)))
  return ids, correlations


def _rows(moments: Moments, units: np.ndarray) -> Moments:
  return dataclasses.replace(moments, cross=moments.cross[units],
                             activation_var=moments.activation_var[units])


def simulation_matrix(text_embeddings, concept_ids: np.ndarray,
                      moments: Moments) -> np.ndarray:
  """(K, k) the correlation over the moments' images of each unit with the P column of
  each of its concepts concept_ids: (K, k); NaN where either is constant."""
  texts = normalise_rows(text_embeddings)[np.asarray(concept_ids)]  # (K, k, D)
  numerator = np.einsum("ukd,ud->uk", texts, moments.cross)
  column_var = np.sum((texts @ moments.image_cov) * texts, axis=-1)
  denominator = np.sqrt(np.maximum(column_var, 0.0) * moments.activation_var[:, None])
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0),
                    np.nan)


@dataclasses.dataclass
class LinearExplanations:
  """concept_ids: (K, k) int64 chosen concepts, largest |weight| first, -1 past the
  last (and for units left out); weights: (K, k) float64 multiplying the raw P columns,
  0 past the last; directions: (K, D) v = sum_c w_c t_c, the prediction's direction in
  embedding space (norm(I) @ v = the prediction minus its mean)."""
  concept_ids: np.ndarray
  weights: np.ndarray
  directions: np.ndarray


def fit(moments: Moments, text_embeddings, usable: np.ndarray,
        max_concepts: int = DEFAULT_MAX_CONCEPTS, mesh: Mesh | None = None,
        geometry: ConceptGeometry | None = None) -> LinearExplanations:
  """Orthogonal matching pursuit of every usable, non-constant unit on `moments` (the
  fit images). text_embeddings: (M, D). usable: (K,) bool. geometry:
  concept_geometry(text_embeddings, moments.image_cov) if already computed."""
  if max_concepts < 1:
    raise ValueError(f"max_concepts must be at least 1, got {max_concepts}.")
  geometry = geometry or concept_geometry(text_embeddings, moments.image_cov)
  texts, texts_cov, inv_std = geometry.texts, geometry.texts_cov, geometry.inv_std
  num_units = len(usable)
  steps = min(max_concepts, int(np.sum(inv_std > 0)))
  ids = np.full((num_units, max_concepts), -1, np.int64)
  weights = np.zeros((num_units, max_concepts))
  directions = np.zeros((num_units, texts.shape[1]))
  live = np.flatnonzero(np.asarray(usable, bool) & (moments.activation_var > 0))
  if not live.size or not steps:
    return LinearExplanations(ids, weights, directions)
  cross = moments.cross[live]
  chosen = np.zeros((len(live), 0), np.int64)
  direction = np.zeros_like(cross)
  w = np.zeros((len(live), 0))
  for _ in range(steps):
    residual = cross - direction @ moments.image_cov
    new = _select(residual, geometry.texts_device, geometry.inv_std_device,
                  chosen.astype(np.int32), len(texts), mesh, signed=False)
    chosen = np.concatenate([chosen, new[:, None]], axis=1)
    w = least_squares(texts[chosen], texts_cov[chosen], cross)
    direction = np.einsum("us,usd->ud", w, texts[chosen])
  order = np.argsort(-np.abs(w), axis=1, kind="stable")
  ids[live, :steps] = np.take_along_axis(chosen, order, axis=1)
  weights[live, :steps] = np.take_along_axis(w, order, axis=1)
  directions[live] = direction
  return LinearExplanations(ids, weights, directions)


def least_squares(chosen_texts: np.ndarray, chosen_texts_cov: np.ndarray,
                  cross: np.ndarray) -> np.ndarray:
  """Per unit, the weights of its chosen P columns that best predict its activations.

  chosen_texts: (U, s, D) t_c of each unit's chosen concepts; chosen_texts_cov:
  (U, s, D) t_c Sigma; cross: (U, D) -> (U, s) w solving
  (G + RIDGE mean(diag G) I) w = T_S x, G = T_S Sigma T_S^T."""
  gram = np.einsum("usd,utd->ust", chosen_texts_cov, chosen_texts)
  gram = 0.5 * (gram + np.swapaxes(gram, 1, 2))
  size = gram.shape[1]
  ridge = RIDGE * np.trace(gram, axis1=1, axis2=2) / size
  target = np.einsum("usd,ud->us", chosen_texts, cross)
  return np.linalg.solve(gram + ridge[:, None, None] * np.eye(size)[None],
                         target[..., None])[..., 0]


def simulation(directions: np.ndarray, moments: Moments) -> np.ndarray:
  """(K,) Pearson correlation over the moments' images between norm(I) @ v (each row of
  directions: (K, D)) and the unit's activations; NaN where either is constant."""
  numerator = np.sum(directions * moments.cross, axis=1)
  predicted_var = np.sum((directions @ moments.image_cov) * directions, axis=1)
  denominator = np.sqrt(np.maximum(predicted_var, 0.0) * moments.activation_var)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0),
                    np.nan)


def concept_directions(text_embeddings, concept_ids: np.ndarray) -> np.ndarray:
  """(K, D) the normalised text embedding of each unit's concept (zeros for -1): the
  direction of a one-concept explanation."""
  texts = normalise_rows(text_embeddings)
  ids = np.asarray(concept_ids, np.int64)
  return np.where((ids >= 0)[:, None], texts[np.maximum(ids, 0)], 0.0)


# ------------------------------------------------------------------ significance
def correlation_p_values(correlations: np.ndarray, num_images: int) -> np.ndarray:
  """One-sided p-values of Pearson correlations measured on `num_images` images against
  the permutation null (the activations shuffled over the images): (K,), NaN where the
  correlation is.

  Under any shuffle of one variable the correlation has mean 0 and variance exactly
  1 / (n - 1) whatever the two marginals; the p-value is the Student t tail with n - 2
  degrees of freedom at t = r sqrt((n - 2) / (1 - r^2)), which matches that
  distribution's moments and is what a large permutation test converges to (tests
  compare it with explicit shuffles). A fitted explanation scored on held-out images
  is a fixed predictor there, so the test is valid for it; on the fit images it is not.
  """
  from scipy import special  # pylint: disable=g-import-not-at-top
  r = np.asarray(correlations, np.float64)
  if num_images < 3:
    return np.full(r.shape, np.nan)
  dof = num_images - 2
  with np.errstate(divide="ignore", invalid="ignore"):
    t = r * np.sqrt(dof / np.maximum(1.0 - np.square(r), 1e-300))
  return np.where(np.isnan(r), np.nan, special.stdtr(dof, -t))


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
  """Benjamini-Hochberg adjusted p-values (q-values) of the finite entries, NaN kept:
  q_(i) = min_{j >= i} p_(j) m / j over the m finite p-values in ascending order."""
  p = np.asarray(p_values, np.float64)
  out = np.full(p.shape, np.nan)
  finite = np.flatnonzero(~np.isnan(p))
  if not finite.size:
    return out
  order = finite[np.argsort(p[finite], kind="stable")]
  m = len(order)
  scaled = p[order] * m / np.arange(1, m + 1)
  out[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
  return out

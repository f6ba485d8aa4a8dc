"""From embeddings and activations to labels: similarity scores, argmax, alternatives."""
import dataclasses
import functools
import inspect
import time
from typing import Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect import errors
from jaxdissect import registry
from jaxdissect import results as results_lib
from jaxdissect import similarity
from jaxdissect import store
from jaxdissect import streaming
from jaxdissect import topk as topk_lib

DEAD_LABEL = "<dead>"
INVALID_LABEL = "<invalid>"


@dataclasses.dataclass
class LayerLabels:
  """The labels of one layer's units.

  labels: (num_units,) the best concept (or <dead> / <invalid>).
  label_scores: (num_units,) its similarity.
  alternative_ids: (num_units, num_alternatives) concept indices, best first.
  alternative_scores: (num_units, num_alternatives).
  top_image_ids: (num_units, num_top_images) global image indices, highest activation first.
  top_image_activations: (num_units, num_top_images).
  dead: (num_units,) bool, constant activation over the probe set.
  invalid: (num_units,) bool, NaN or Inf activations.
  """
  labels: list[str]
  label_scores: np.ndarray
  alternative_ids: np.ndarray
  alternative_scores: np.ndarray
  top_image_ids: np.ndarray
  top_image_activations: np.ndarray
  dead: np.ndarray
  invalid: np.ndarray

  @property
  def num_units(self) -> int:
    return len(self.labels)


def concept_activation(image_embeddings: np.ndarray, text_embeddings: np.ndarray):
  """P = norm(I) @ norm(T).T: (num_images, num_concepts)."""
  images = jnp.asarray(image_embeddings, jnp.float32)
  texts = jnp.asarray(text_embeddings, jnp.float32)
  images = similarity.l2_normalise(images, axis=1)
  texts = similarity.l2_normalise(texts, axis=1)
  return jnp.matmul(images, texts.T, precision=jax.lax.Precision.HIGHEST)


@dataclasses.dataclass
class LayerScores:
  """scores: (num_units, num_concepts). tiebreak: (num_units, num_concepts) or None, the
  key that orders exactly tied scores (similarity.prior_margin for (soft-)WPMI).
  dead, invalid: (num_units,) bool."""
  scores: np.ndarray
  dead: np.ndarray
  invalid: np.ndarray
  tiebreak: np.ndarray | None = None


PRIOR_FUNCTIONS = registry.PRIOR_FUNCTIONS
# Below this many units, a layer's (soft-)WPMI prior is estimated from too few neurons.
MIN_UNITS_FOR_PRIOR = 2


def top_images_of_zeroed(top: topk_lib.RunningTopK, top_k: int) -> np.ndarray:
  """(num_units, top_k) rows: the running top-k, with invalid units given the top-k of
  an all-zero column (the first rows), as scoring the zeroed matrix would."""
  ids = top.ids[:top_k].T.copy()
  ids[top.invalid] = np.arange(top_k, dtype=ids.dtype)
  return ids


def score_layer(similarity_fn: str, concept_activations, activations: np.ndarray | None,
                chunk_size: int | None = None, *,
                embeddings: tuple[np.ndarray, np.ndarray] | None = None,
                top: topk_lib.RunningTopK | None = None, mesh=None,
                kernel: str = "auto", compute_dtype: str = "float32",
                block_size: int | None = None, row_normalisers=None,
                log_likelihood: np.ndarray | None = None) -> LayerScores:
  """Scores (num_units, num_concepts), with dead and invalid units flagged.

  concept_activations: P (num_images, num_concepts); or None with embeddings = (image
  embeddings (num_images, dim), text embeddings (num_concepts, dim)), for the streaming
  functions that never hold P.
  top: the layer's running top-k with ids as rows (ProbeActivations.top_for). With it
  and embeddings, (soft-)WPMI never reads `activations` (which may then be None or a
  memmap that stays on disk).
  mesh: with embeddings, the neurons are split over its devices.
  kernel, compute_dtype: with embeddings, (soft-)WPMI's kernel and matmul dtype
  (streaming._top_k_log_likelihood).
  block_size: (soft-)WPMI's concepts per block (likelihood.py); None: from a budget.
  row_normalisers: with embeddings, the run's streaming.RowNormalisers (shared by its
  layers and the label stability), or None.
  log_likelihood: with top and a (soft-)WPMI function, the layer's L (num_units,
  num_concepts), already computed with the run's other layers (layers_log_likelihood);
  the scores are then computed from it.
  Non-finite units are zeroed before scoring so they cannot poison the (soft-)WPMI
  prior; dead units stay in it, as in the official method, so live scores are
  unchanged by flagging them.
  """
  kwargs = {}
  if (top is not None and (embeddings is not None or log_likelihood is not None)
      and similarity_fn in PRIOR_FUNCTIONS
      and top.k >= similarity.default_top_k(similarity_fn)):
    invalid, dead = top.invalid, top.dead
    kwargs["top_images"] = top_images_of_zeroed(
        top, similarity.default_top_k(similarity_fn))
    num_units = len(invalid)
    activations = None
  else:
    activations = np.asarray(activations, np.float32)
    invalid = ~np.all(np.isfinite(activations), axis=0)
    if invalid.any():
      activations = activations.copy()
      activations[:, invalid] = 0.0
    dead = ~invalid & (activations.max(axis=0) == activations.min(axis=0))
    num_units = activations.shape[1]
  if embeddings is not None:
    fn = functools.partial(streaming.FUNCTIONS[similarity_fn], *embeddings, mesh=mesh)
    if similarity_fn in PRIOR_FUNCTIONS:
      kwargs["kernel"] = kernel
      kwargs["compute_dtype"] = compute_dtype
      kwargs["row_normalisers"] = row_normalisers
  else:
    fn = functools.partial(similarity.SIMILARITY_FUNCTIONS[similarity_fn],
                           concept_activations)
    if "chunk_size" in inspect.signature(fn.func).parameters and chunk_size:
      kwargs["chunk_size"] = chunk_size
  if similarity_fn in PRIOR_FUNCTIONS and block_size:
    kwargs["block_size"] = block_size
  if log_likelihood is not None and "top_images" not in kwargs:
    raise ValueError("score_layer: log_likelihood needs a (soft-)WPMI function and the "
                     "layer's running top-k.")
  if similarity_fn not in PRIOR_FUNCTIONS:
    return LayerScores(np.asarray(fn(activations, **kwargs)), dead, invalid)
  if num_units < MIN_UNITS_FOR_PRIOR:
    logging.warning("%s estimates each concept's prior from the other units of the layer; "
                    "this layer has %d unit(s), so every score is %s and the label "
                    "means little. Dissect it together with other units, or use "
                    "cos_similarity.", similarity_fn, num_units,
                    "0" if similarity_fn == "soft_wpmi" else "(1 - lam) L")
  if log_likelihood is None:
    scores, log_likelihood = fn(activations, return_log_likelihood=True, **kwargs)
  else:
    scores = similarity.subtract_prior(log_likelihood,
                                       registry.SIMILARITY[similarity_fn].defaults["lam"])
  return LayerScores(np.asarray(scores), dead, invalid,
                     np.asarray(similarity.prior_margin(log_likelihood)))


def order_with_ties(scores: np.ndarray, tiebreak: np.ndarray | None,
                     count: int) -> tuple[np.ndarray, np.ndarray]:
  """The `count` best concepts per unit: by score, then by tiebreak among equal scores,
  then by lower concept index. Returns (ids, scores), each (num_units, count)."""
  width = min(count + 1, scores.shape[1])
  top_scores, top_ids = (np.asarray(x) for x in jax.lax.top_k(jnp.asarray(scores), width))
  ids = top_ids[:, :count].copy()
  if tiebreak is None:
    return ids, top_scores[:, :count].copy()
  tied = np.flatnonzero(np.any(top_scores[:, 1:] == top_scores[:, :-1], axis=1))
  for unit in tied:
    # lexsort: the last key is the primary one; it is stable, so equal keys keep index order.
    ids[unit] = np.lexsort((-tiebreak[unit], -scores[unit]))[:count]
  return ids, np.take_along_axis(scores, ids, axis=1)


def tied_at_best(scores: np.ndarray, live: np.ndarray) -> np.ndarray:
  """(num_units,) bool: live units whose best score two or more concepts share exactly.

  Why: a (soft-)WPMI score is capped at lam log K (K units in the layer), and in a small
  layer many concepts reach the cap to float32 precision; the label is then chosen by
  the tie-break, not by the score, and a user should know.
  """
  scores = np.asarray(scores)
  if scores.shape[1] < 2:
    return np.zeros(scores.shape[0], bool)
  best = np.max(scores, axis=1, keepdims=True)
  return (np.sum(scores == best, axis=1) >= 2) & np.asarray(live, bool)


def label_units(scores: np.ndarray, activations: np.ndarray | None,
                concepts: Sequence[str], dead: np.ndarray, invalid: np.ndarray,
                num_alternatives: int = 5, num_top_images: int = 10,
                tiebreak: np.ndarray | None = None,
                top: topk_lib.RunningTopK | None = None) -> LayerLabels:
  """Labels from scores (num_units, num_concepts) and activations (num_images, num_units)
  or, instead of activations, the running top-k `top` (ids as rows, k >= the number of
  top images listed).

  Equal scores are ordered by tiebreak (larger first) where given, then by the lower
  concept index; equal activations by the lower image index.
  """
  scores = np.asarray(scores)
  num_alternatives = min(num_alternatives, scores.shape[1])
  alt_ids, alt_scores = order_with_ties(scores, tiebreak, num_alternatives)
  if top is not None:
    seen = int(np.sum(top.ids[:, 0] != topk_lib.EMPTY_ID)) if top.ids.size else 0
    num_top_images = min(num_top_images, top.k, seen)
    top_values, top_ids = top.values[:num_top_images].T, top.ids[:num_top_images].T
  else:
    num_top_images = min(num_top_images, activations.shape[0])
    clean = np.where(np.isfinite(activations), activations, -np.inf).astype(np.float32)
    top_values, top_ids = similarity.top_activations(clean, num_top_images)
  labels = [concepts[i] for i in alt_ids[:, 0]]
  for unit in np.flatnonzero(dead):
    labels[unit] = DEAD_LABEL
  for unit in np.flatnonzero(invalid):
    labels[unit] = INVALID_LABEL
  if dead.any() or invalid.any():
    logging.warning("%d dead unit(s) labelled %s and %d unit(s) with NaN/Inf activations "
                    "labelled %s.", int(dead.sum()), DEAD_LABEL, int(invalid.sum()),
                    INVALID_LABEL)
  return LayerLabels(labels=labels, label_scores=alt_scores[:, 0].copy(),
                     alternative_ids=alt_ids, alternative_scores=alt_scores,
                     top_image_ids=np.asarray(top_ids),
                     top_image_activations=np.asarray(top_values), dead=dead,
                     invalid=invalid)


# ------------------------------------------ a whole probe pass, stream or hold P
def check_enough_images(num_images: int, similarity_fn: str, field: str = "d_probe",
                        skipped: str = ""):
  """num_images: the usable ones; skipped: what became of the others, if any."""
  needed = similarity.min_images(similarity_fn)
  if num_images < needed:
    also = f" ({skipped})" if skipped else ""
    raise errors.UserError(
        field, f"{num_images} usable probe images{also}, but {similarity_fn} needs at "
        f"least {needed} (its top-k).", f"give at least {needed} probe images.")


def float32_matrix_gb(num_rows: int, num_columns: int) -> float:
  """Size of a float32 (num_rows, num_columns) matrix in GB of 2**30 bytes, the unit of
  every *_max_gb setting (P: images x concepts; activations: images x units)."""
  return num_rows * num_columns * 4 / 2**30


def _matrix_out_of_memory(err: Exception, doing: str, num_images: int, num_concepts: int,
                          similarity_fn: str) -> Exception:
  """The one-line error for an in-memory P that did not fit; other errors unchanged."""
  if isinstance(err, jax.errors.JaxRuntimeError) and not any(
      s in str(err) for s in ("RESOURCE_EXHAUSTED", "Out of memory")):
    return err
  gb = float32_matrix_gb(num_images, num_concepts)
  how = (f"so that {similarity_fn} streams P" if similarity_fn in
         registry.STREAMING_FUNCTIONS else "and use a similarity_fn that streams P "
         f"({', '.join(registry.STREAMING_FUNCTIONS)})")
  return errors.UserError(
      "concept_matrix_max_gb", f"{doing} held in memory ({num_images} images x "
      f"{num_concepts} concepts, {gb:.2f} GB) ran out of memory.",
      f"set --config.concept_matrix_max_gb below {gb:.2f} {how}.")


def streams(similarity_fn: str, num_images: int, num_concepts: int,
            concept_matrix_max_gb: float) -> bool:
  """Whether label_probe streams P from the embeddings instead of holding it."""
  return (similarity_fn in registry.STREAMING_FUNCTIONS
          and float32_matrix_gb(num_images, num_concepts) > concept_matrix_max_gb)


def label_probe(probe: store.ProbeActivations, text_embeddings: np.ndarray,
                concepts: Sequence[str], similarity_fn: str = registry.DEFAULT_SIMILARITY,
                num_alternatives: int = 5, num_top_images: int = 10,
                neuron_chunk_size: int | None = None,
                keep_scores: bool | Sequence[str] = False,
                concept_matrix_max_gb: float = registry.DEFAULT_CONCEPT_MATRIX_MAX_GB,
                mesh=None, kernel: str = "auto",
                compute_dtype: str = "float32",
                concept_block_size: int | None = None,
                row_normalisers=None) -> results_lib.DissectionResult:
  """Similarity and labels for every layer of a probe pass.

  P (num_images x num_concepts) is held in memory only while it takes at most
  concept_matrix_max_gb; beyond that the streaming functions compute what they need of
  it from the embeddings (rank_reorder has no streaming form and always holds P), with
  the neurons split over the devices of `mesh`. Which path is taken depends on the sizes
  only, never on the device count, so the labels are the same on any number of devices.
  keep_scores: True for every layer, or the names of the layers whose (units, concepts)
  scores go into the result's .scores. row_normalisers: a streaming.RowNormalisers of
  the probe's and the concepts' embeddings that the streamed layers share (and that the
  run's label stability reuses), or None for one of this call's own.
  """
  num_images, num_concepts = len(probe.image_embeddings), len(text_embeddings)
  matrix_gb = float32_matrix_gb(num_images, num_concepts)
  stream = streams(similarity_fn, num_images, num_concepts, concept_matrix_max_gb)
  if stream:
    logging.info("P (%d images x %d concepts, %.2f GB) exceeds concept_matrix_max_gb=%g: "
                 "streaming %s from the embeddings.", num_images, num_concepts, matrix_gb,
                 concept_matrix_max_gb, similarity_fn)
    concept_activations = None
    embeddings = (probe.image_embeddings, text_embeddings)
    if row_normalisers is None:
      row_normalisers = streaming.RowNormalisers(*embeddings)
  else:
    try:
      concept_activations = concept_activation(probe.image_embeddings,
                                                        text_embeddings)
    except (MemoryError, jax.errors.JaxRuntimeError) as err:
      raise _matrix_out_of_memory(err, "computing P", num_images, num_concepts,
                                  similarity_fn) from None
    embeddings = None
  layers, scores = {}, {}
  top_k = max(num_top_images, similarity.default_top_k(similarity_fn)
              if similarity_fn in PRIOR_FUNCTIONS else 0)
  # The probe pass's running top-k: (soft-)WPMI and the listed top images need nothing
  # else of the (num_images, num_units) matrix.
  tops = {name: probe.top_for(name, min(top_k, num_images)) for name in probe.activations}
  log_likelihoods = {}
  if similarity_fn in PRIOR_FUNCTIONS:
    try:
      log_likelihoods = layers_log_likelihood(
          similarity_fn, tops, embeddings=embeddings,
          concept_activations=concept_activations, mesh=mesh, kernel=kernel,
          compute_dtype=compute_dtype, block_size=concept_block_size,
          row_normalisers=row_normalisers)
    except (MemoryError, jax.errors.JaxRuntimeError) as err:
      if stream:
        raise
      raise _matrix_out_of_memory(err, "scoring the layers with P", num_images,
                                  num_concepts, similarity_fn) from None
  for name, acts in probe.activations.items():
    top = tops[name]
    try:
      scored = score_layer(similarity_fn, concept_activations, acts,
                                    neuron_chunk_size, embeddings=embeddings, top=top,
                                    mesh=mesh if stream else None, kernel=kernel,
                                    compute_dtype=compute_dtype,
                                    block_size=concept_block_size,
                                    row_normalisers=row_normalisers,
                                    log_likelihood=log_likelihoods.get(name))
    except (MemoryError, jax.errors.JaxRuntimeError) as err:
      raise _matrix_out_of_memory(err, f"scoring layer {name} with P", num_images,
                                  num_concepts, similarity_fn) from None
    layers[name] = label_units(scored.scores, None, concepts, scored.dead,
                                        scored.invalid, num_alternatives, num_top_images,
                                        tiebreak=scored.tiebreak, top=top)
    if similarity_fn in PRIOR_FUNCTIONS:
      _warn_of_ties_at_the_cap(name, similarity_fn, scored)
    if keep_scores is True or (keep_scores and name in keep_scores):
      scores[name] = scored.scores
    logging.info("Layer %s: %d units labelled with %s (%d distinct labels).", name,
                 layers[name].num_units, similarity_fn, len(set(layers[name].labels)))
  return results_lib.DissectionResult(list(concepts), list(probe.image_ids), layers, scores)


def layers_log_likelihood(similarity_fn: str, tops: dict, *, embeddings=None,
                          concept_activations=None, mesh=None, kernel: str = "auto",
                          compute_dtype: str = "float32", block_size: int | None = None,
                          row_normalisers=None) -> dict[str, np.ndarray]:
  """{layer: L (num_units, num_concepts)} of (soft-)WPMI for every layer whose running
  top-k in `tops` holds the function's top_k, all in one pass over blocks of concepts:
  from embeddings = (image embeddings (num_images, dim), text embeddings
  (num_concepts, dim)) (streaming.layers_log_likelihood: each block's P rows recomputed
  once for the run, not once per layer), or from P, concept_activations (num_images,
  num_concepts) (similarity.layers_log_likelihood: one compiled program and one read of
  P's blocks for all layers). Layers whose L together exceeds MAX_PASS_SCORES_BYTES
  take several passes. The other arguments as score_layer's (streamed only)."""
  top_k = similarity.default_top_k(similarity_fn)
  num_concepts = (len(embeddings[1]) if embeddings is not None
                  else concept_activations.shape[1])
  out = {}
  for names in _layer_groups({name: top.ids.shape[1] for name, top in tops.items()
                              if top.k >= top_k}, num_concepts):
    started = time.time()
    top_images = [top_images_of_zeroed(tops[name], top_k) for name in names]
    if embeddings is not None:
      values = streaming.layers_log_likelihood(
          similarity_fn, *embeddings, top_images, mesh=mesh, kernel=kernel,
          compute_dtype=compute_dtype, block_size=block_size,
          row_normalisers=row_normalisers)
    else:
      values = similarity.layers_log_likelihood(similarity_fn, concept_activations,
                                                top_images, block_size=block_size)
    logging.info("%s %s of %d layer(s) (%d units, %d distinct top images) in one pass "
                 "over the concepts: %.1f s.",
                 "Streamed" if embeddings is not None else "Scored", similarity_fn,
                 len(names), sum(len(t) for t in top_images),
                 np.unique(np.concatenate([t.ravel() for t in top_images])).size,
                 time.time() - started)
    out.update(zip(names, (np.asarray(v) for v in values)))
  return out


# The (units, concepts) float32 L that one pass over the concepts returns at most, for
# all its layers together: a run's layers go in as few passes as keep within it (a
# layer wider than that, alone).
MAX_PASS_SCORES_BYTES = 2 * 2**30


def _layer_groups(units: dict[str, int], num_concepts: int) -> list[list[str]]:
  """The layers (name -> units), in order, cut into consecutive groups whose L
  (units x num_concepts float32) together stays within MAX_PASS_SCORES_BYTES."""
  groups, size = [], 0
  for name, num_units in units.items():
    layer_bytes = 4 * num_units * num_concepts
    if not groups or size + layer_bytes > MAX_PASS_SCORES_BYTES:
      groups.append([])
      size = 0
    groups[-1].append(name)
    size += layer_bytes
  return groups


def _warn_of_ties_at_the_cap(name: str, similarity_fn: str, scored) -> None:
  tied = tied_at_best(scored.scores, ~(scored.dead | scored.invalid))
  if tied.any():
    num_units = len(tied)
    logging.warning(
        "Layer %s: %d of %d units have two or more concepts with exactly the same best "
        "score, so a tie-break, not the score, chose their label among those concepts. "
        "%s caps a unit's score at the level of a concept no other unit responds to "
        "(K = %d units: lam x log K = lam x %.4f), and on a layer this small several "
        "concepts can reach the cap%s. The tied concepts are in descriptions_topk.csv.",
        name, int(tied.sum()), num_units, similarity_fn, num_units, np.log(num_units),
        "; similarity_fn=wpmi (lam 0.6) separates them" if similarity_fn == "soft_wpmi"
        else "")


def label_with_config(config, probe: store.ProbeActivations,
                      text_embeddings: np.ndarray, concepts: Sequence[str],
                      keep_scores: Sequence[str], mesh=None,
                      row_normalisers=None) -> results_lib.DissectionResult:
  """label_probe with the similarity settings of `config` (main.py and the evaluate
  CLI label the same way)."""
  return label_probe(probe, text_embeddings, concepts, config.similarity_fn,
                     config.num_alternatives, config.num_top_images,
                     config.neuron_chunk_size or None, keep_scores=keep_scores,
                     concept_matrix_max_gb=config.concept_matrix_max_gb, mesh=mesh,
                     kernel=config.similarity_kernel, compute_dtype=config.similarity_dtype,
                     concept_block_size=config.concept_block_size or None,
                     row_normalisers=row_normalisers)

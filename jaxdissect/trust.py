"""Per-unit trust measures: how well a unit's activation tracks its label, and whether
its score could come from chance.

AUC: positives are the images whose CLIP similarity to the unit's label is in the top
`top_fraction` of the probe set (at least one image); the AUC is the probability that
the unit activates more on a random positive than on a random negative (ties count
half), the Mann-Whitney statistic. 0.5 is chance, 1 a perfect detector of the concept.

Permutation p-value: the unit's activations are shuffled over the images (seeded, per
unit, so the value does not depend on chunking or which layers run together), the
similarity of the shuffled unit to the same label is recomputed, and
p = (1 + #{shuffled score >= observed}) / (1 + num_permutations). For (soft-)WPMI only
the unit's top images matter, and the top images of a shuffled column are a uniformly
random ordered set of distinct images; the prior is recomputed with the shuffled unit in
place of the original, as the score it is compared with includes it. The other
functions score each (unit, concept) pair on its own and are simply called on the
shuffled columns (cost: num_permutations x num_images per unit).

Dead and invalid units get NaN for both.
"""
import dataclasses
import inspect
import time
import zlib
from typing import Any

from absl import logging
import numpy as np

from jaxdissect import explanations as explanations_lib
from jaxdissect import labeling
from jaxdissect import likelihood
from jaxdissect import registry
from jaxdissect import results as results_lib
from jaxdissect import similarity
from jaxdissect import stability as stability_lib
from jaxdissect import store
from jaxdissect import streaming
from jaxdissect import visibility as visibility_lib

DEFAULT_TOP_FRACTION = 0.05
DEFAULT_NUM_PERMUTATIONS = 100
# Bytes of one (image chunk x concepts) float64 block: the log-softmax over all
# concepts is taken in image chunks of this size, so memory stays bounded with any
# number of images and concepts (a few such blocks live at once).
_BLOCK_BYTES = 64 * 1024 * 1024


def _image_chunk(num_columns: int) -> int:
  return max(1, _BLOCK_BYTES // (8 * max(1, num_columns)))


@dataclasses.dataclass
class UnitTrust:
  """auc, p_value: (num_units,) float64, NaN for dead or invalid units.

  stability: (num_units,) the bootstrap's pairwise label agreement (stability.py), NaN
  where not computed; alternative_shares: (num_units, num_alternatives) the share of
  resamples labelling the unit with each alternative, or None.
  explanations: the layer's explanations.LayerExplanations (linear explanations,
  held-out simulations, explained, the correlation label), or None where not computed
  (config.explain_concepts = 0, or activations not gathered)."""
  auc: np.ndarray
  p_value: np.ndarray
  stability: np.ndarray | None = None
  alternative_shares: np.ndarray | None = None
  explanations: Any = None

  @property
  def correlation_label(self) -> np.ndarray | None:
    """(num_units,) the concept whose column of P correlates best with the unit over
    all probe images, -1 where undefined; None where not computed."""
    return None if self.explanations is None else self.explanations.correlation_label

  def stability_or_nan(self) -> np.ndarray:
    return (np.full(len(self.auc), np.nan) if self.stability is None
            else self.stability)


def function_defaults(similarity_fn: str) -> dict:
  """The keyword defaults of a similarity function (top_k, a, lam, ...)."""
  params = inspect.signature(similarity.SIMILARITY_FUNCTIONS[similarity_fn]).parameters
  return {name: p.default for name, p in params.items()
          if p.default is not inspect.Parameter.empty}


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
  """scores: (num_images,); positive: (num_images,) bool -> P(score_pos > score_neg)
  + 0.5 P(equal); NaN without positives or negatives."""
  scores = np.asarray(scores, np.float64)
  positive = np.asarray(positive, bool)
  pos, neg = scores[positive], np.sort(scores[~positive])
  if not len(pos) or not len(neg):
    return float("nan")
  below = np.searchsorted(neg, pos, side="left")
  at_or_below = np.searchsorted(neg, pos, side="right")
  return float(np.mean(below + 0.5 * (at_or_below - below)) / len(neg))


def concept_columns(image_embeddings: np.ndarray, text_embeddings: np.ndarray,
                    concept_ids: np.ndarray) -> np.ndarray:
  """P[:, concept_ids]: (num_images, len(concept_ids)) float32, read in image chunks (the
  embeddings may be memory-mapped)."""
  texts = _normalised(np.asarray(text_embeddings, np.float32)[concept_ids])
  out = np.empty((len(image_embeddings), len(concept_ids)), np.float32)
  chunk = _image_chunk(len(concept_ids))
  for start in range(0, len(image_embeddings), chunk):
    images = _normalised(np.asarray(image_embeddings[start:start + chunk], np.float32))
    out[start:start + len(images)] = images @ texts.T
  return out


def image_log_normalisers(image_embeddings: np.ndarray, text_embeddings: np.ndarray,
                          a: float) -> np.ndarray:
  """Each image's log-normaliser of softmax(a P) over all concepts, logsumexp_m a P[i, m]:
  (num_images,) float64, without holding P (image chunks; the embeddings may be
  memory-mapped).

  The one pass over images x concepts that the (soft-)WPMI p-values need: it depends on
  the images, the concepts and `a` only, so layer_trust computes it once for all layers
  (at 20,000 images x 20,000 concepts x 512-d it was 12.3 of 16.5 s of one layer's
  unit_trust, on 2 CPU cores).
  """
  texts = _normalised(np.asarray(text_embeddings, np.float32))
  out = np.empty(len(image_embeddings), np.float64)
  chunk = _image_chunk(len(texts))
  for start in range(0, len(image_embeddings), chunk):
    images = _normalised(np.asarray(image_embeddings[start:start + chunk], np.float32))
    logits = a * (images @ texts.T).astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    out[start:start + len(images)] = top[:, 0] + np.log(np.sum(np.exp(logits - top),
                                                               axis=1))
  return out


def log_softmax_columns(image_embeddings: np.ndarray, text_embeddings: np.ndarray,
                        concept_ids: np.ndarray, a: float,
                        log_normalisers: np.ndarray | None = None,
                        columns: np.ndarray | None = None) -> np.ndarray:
  """log softmax(a P) over all concepts, at columns concept_ids: (num_images, C)
  float64, without holding P.

  log_normalisers: image_log_normalisers(image_embeddings, text_embeddings, a), or None
  to compute it here; columns: concept_columns(image_embeddings, text_embeddings,
  concept_ids) where already computed.
  """
  if log_normalisers is None:
    log_normalisers = image_log_normalisers(image_embeddings, text_embeddings, a)
  if columns is None:
    columns = concept_columns(image_embeddings, text_embeddings, concept_ids)
  return a * columns.astype(np.float64) - log_normalisers[:, None]


def _normalised(x: np.ndarray) -> np.ndarray:
  return similarity.l2_normalise(x, axis=1, xp=np)


def _unit_columns(activations, units: np.ndarray):
  """Yields (unit, its (num_images,) float32 column), reading blocks of contiguous
  units: one column at a time from a memory-mapped (images, units) file would touch
  every page of it once per unit."""
  per_block = max(1, _BLOCK_BYTES // (4 * max(1, activations.shape[0])))
  for start in range(0, len(units), per_block):
    chosen = units[start:start + per_block]
    block = np.asarray(activations[:, chosen.min():chosen.max() + 1], np.float32)
    for unit in chosen:
      yield int(unit), block[:, unit - chosen.min()]


def _unit_rng(seed: int, layer: str, unit: int) -> np.random.Generator:
  return np.random.default_rng([seed, zlib.crc32(layer.encode("utf-8")), unit])


def _top_k_terms(log_probs: np.ndarray, similarity_fn: str, params: dict,
                 top_k: int) -> np.ndarray:
  """log_probs: (..., top_k) log S at a unit's top images, best first -> (...) L."""
  membership = None if similarity_fn == "wpmi" else similarity.soft_wpmi_membership(
      top_k, params["p_start"], params["p_end"])
  return np.sum(np.log(likelihood.likelihood_terms(np.exp(log_probs), membership,
                                                   params["min_prob"])), axis=-1)


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
  top = np.max(x, axis=axis, keepdims=True)
  return np.squeeze(top, axis) + np.log(np.sum(np.exp(x - top), axis=axis))


def prior_null_scores(log_probs: np.ndarray, layer_log_likelihood: np.ndarray, unit: int,
                      samples: np.ndarray, similarity_fn: str, params: dict):
  """(Soft-)WPMI score of `unit` at one concept, and the scores it would have with other
  top images.

  log_probs: (num_images,) log softmax(a P) at the concept. layer_log_likelihood:
  (num_units,) L of every unit of the layer at the concept. samples: (R, top_k) image
  ids, best first, standing in for the unit's top images. Returns (observed score,
  (R,) null scores), each with the prior recomputed over the layer with that unit's L.
  """
  top_k = samples.shape[1]
  num_units = len(layer_log_likelihood)
  others = _logsumexp(np.delete(layer_log_likelihood, unit))

  def score(log_likelihood):
    gap = np.logaddexp(0.0, others - log_likelihood)  # softplus: no cancellation
    return similarity.prior_score(log_likelihood, gap, params["lam"], num_units)

  null_l = _top_k_terms(log_probs[samples], similarity_fn, params, top_k)
  return score(layer_log_likelihood[unit]), score(null_l)


def unit_trust(layer: str, similarity_fn: str, activations, image_embeddings,
               text_embeddings, label_ids: np.ndarray, usable: np.ndarray,
               top_image_ids: np.ndarray | None = None, *,
               top_fraction: float = DEFAULT_TOP_FRACTION,
               num_permutations: int = DEFAULT_NUM_PERMUTATIONS,
               seed: int = 0, log_normalisers: np.ndarray | None = None) -> UnitTrust:
  """AUC and permutation p-value of each unit's label.

  layer: its name (seeds the per-unit shuffles). activations: (num_images, num_units),
  may be a memmap, or None (then AUCs and non-(soft-)WPMI p-values are left out).
  image_embeddings: (num_images, dim); text_embeddings: (num_concepts, dim).
  label_ids: (num_units,) concept index of each label. usable: (num_units,) False for
  dead or invalid units. top_image_ids: (num_units, >= top_k) each unit's top images,
  best first, as the labelling used them (needed by (soft-)WPMI).
  log_normalisers: (num_images,) image_log_normalisers at the function's `a`, shared by
  the layers of a run; None: computed here ((soft-)WPMI p-values only).
  """
  num_units = len(label_ids)
  num_images = len(image_embeddings)
  usable = np.asarray(usable, bool)
  label_ids = np.asarray(label_ids, np.int64)
  aucs = np.full(num_units, np.nan)
  p_values = np.full(num_units, np.nan)
  distinct, column_of = np.unique(label_ids, return_inverse=True)
  columns = None
  if activations is not None:
    columns = concept_columns(image_embeddings, text_embeddings, distinct)
    num_positive = max(1, int(np.floor(num_images * top_fraction)))
    thresholds = -np.partition(-columns, num_positive - 1, axis=0)[num_positive - 1]
    for unit, values in _unit_columns(activations, np.flatnonzero(usable)):
      c = column_of[unit]
      aucs[unit] = auc(values, columns[:, c] >= thresholds[c])
  if num_permutations <= 0:
    return UnitTrust(aucs, p_values)
  params = function_defaults(similarity_fn)
  if similarity_fn in registry.PRIOR_FUNCTIONS:
    if top_image_ids is None:
      raise ValueError(f"{similarity_fn} p-values need each unit's top images.")
    top_k = params["top_k"]
    log_probs = log_softmax_columns(image_embeddings, text_embeddings, distinct,
                                    params["a"], log_normalisers, columns)
    # L[j, c] of every unit j (dead ones too: the prior includes them) at every label:
    # (num_units, C), in unit chunks to bound the (chunk, C, top_k) gather.
    top_ids = np.asarray(top_image_ids)[:, :top_k]
    observed = np.concatenate([
        _top_k_terms(np.moveaxis(log_probs[top_ids[start:start + 64]], 1, 2),
                     similarity_fn, params, top_k)
        for start in range(0, num_units, 64)])
    for unit in np.flatnonzero(usable):
      c = column_of[unit]
      rng = _unit_rng(seed, layer, unit)
      samples = np.stack([rng.choice(num_images, size=top_k, replace=False)
                          for _ in range(num_permutations)])
      score, null_scores = prior_null_scores(log_probs[:, c], observed[:, c], unit,
                                             samples, similarity_fn, params)
      p_values[unit] = (1 + np.sum(null_scores >= score)) / (1 + num_permutations)
    return UnitTrust(aucs, p_values)
  if activations is None:
    return UnitTrust(aucs, p_values)
  fn = similarity.SIMILARITY_FUNCTIONS[similarity_fn]
  for unit, values in _unit_columns(activations, np.flatnonzero(usable)):
    c = column_of[unit]
    rng = _unit_rng(seed, layer, unit)
    shuffled = np.stack([values] + [rng.permutation(values)
                                    for _ in range(num_permutations)], axis=1)
    scores = np.asarray(fn(columns[:, c:c + 1], shuffled))[:, 0].astype(np.float64)
    p_values[unit] = (1 + np.sum(scores[1:] >= scores[0])) / (1 + num_permutations)
  return UnitTrust(aucs, p_values)


def run_visibility(config, image_embeddings, text_embeddings, mesh=None
                   ) -> visibility_lib.ConceptVisibility | None:
  """The concepts the probe images show (visibility.py) with the run's settings
  (config.visible_top_share, config.visible_min_images; 0 images: every concept), or
  None where the run has no explanations (config.explain_concepts 0) to restrict;
  mesh: the devices the images are split over, or None."""
  if int(config.get("explain_concepts", 0)) <= 0:
    return None
  return visibility_lib.concept_visibility(
      image_embeddings, text_embeddings,
      float(config.get("visible_top_share", visibility_lib.DEFAULT_TOP_SHARE)),
      int(config.get("visible_min_images", visibility_lib.DEFAULT_MIN_IMAGES)), mesh)


def _resamples(config) -> int:
  # Runs written before trust_bootstrap existed (the evaluate CLI reads their config).
  return int(config.get("trust_bootstrap", 0))


def computes_stability(config) -> bool:
  """Whether layer_trust resamples the labels (label stability) under `config`."""
  return config.similarity_fn in registry.PRIOR_FUNCTIONS and _resamples(config) > 0


def layer_trust(config, probe: store.ProbeActivations,
                result: results_lib.DissectionResult, text_embeddings: np.ndarray,
                mesh=None, embed_texts=None, simulator=None,
                visibility=None, row_normalisers=None,
                stage_seconds: dict | None = None) -> dict[str, UnitTrust]:
  """Per-unit AUC, permutation p-value, explanations (where the activations are held;
  with config.trust_bootstrap resamples, their concepts' selection shares) and
  ((soft-)WPMI only) label stability of every layer's labels; mesh: the devices of
  the stability and the explanations' fits; embed_texts: texts -> CLIP text
  embeddings, for the compositional labels' prompts; simulator: (image embeddings,
  text embeddings) of config.simulator_model, or None; visibility: the concepts the
  probe shows (run_visibility), which the explanations choose among, or None for all;
  the simulator's own are computed here from its embeddings; row_normalisers: the run's
  streaming.RowNormalisers, which the layers' stability shares (None: one here);
  stage_seconds: where given, "label_stability" is set to the stability's wall time."""
  if simulator is not None:
    shown = run_visibility(config, *simulator, mesh)
    simulator = (*simulator, None if shown is None else shown.visible)
  out = {}
  resamples = _resamples(config)
  bootstrap = resamples if computes_stability(config) else 0
  if bootstrap and row_normalisers is None:
    row_normalisers = streaming.RowNormalisers(probe.image_embeddings, text_embeddings)
  # The same resamples for every layer, the labels and the linear explanations.
  weights = (stability_lib.poisson_weights(len(probe.image_embeddings), resamples,
                                           config.trust_seed) if resamples else None)
  log_normalisers = None
  if config.similarity_fn in registry.PRIOR_FUNCTIONS and config.trust_permutations > 0:
    started = time.time()
    log_normalisers = image_log_normalisers(
        probe.image_embeddings, text_embeddings,
        function_defaults(config.similarity_fn)["a"])
    logging.info("Softmax normalisers of %d images over %d concepts (shared by the "
                 "layers' p-values) in %.1f s.", len(probe.image_embeddings),
                 len(text_embeddings), time.time() - started)
  top_ids_by_layer = {}
  for name, layer in result.layers.items():
    top_ids = None
    if config.similarity_fn in labeling.PRIOR_FUNCTIONS:
      # One read of the top images serves the p-values (top_k) and the resamples.
      depth = (stability_lib.depth(config.similarity_fn) if bootstrap
               else similarity.default_top_k(config.similarity_fn))
      top = probe.top_for(name, min(depth, len(probe.image_ids)))
      top_ids = labeling.top_images_of_zeroed(top, top.k)
    activations = probe.activations.get(name)
    if activations is not None and activations.shape[1] != layer.num_units:
      activations = None  # not gathered (multi-process, top-k only): no AUC
    started = time.time()
    out[name] = unit_trust(
        name, config.similarity_fn, activations, probe.image_embeddings, text_embeddings,
        layer.alternative_ids[:, 0], ~(layer.dead | layer.invalid), top_ids,
        top_fraction=config.trust_top_fraction,
        num_permutations=config.trust_permutations, seed=config.trust_seed,
        log_normalisers=log_normalisers)
    logging.info("Layer %s: unit trust (AUC, %d permutations) in %.1f s.", name,
                 config.trust_permutations, time.time() - started)
    if activations is not None:
      out[name].explanations = explanations_lib.run_explanations(
          name, activations, probe.image_embeddings, text_embeddings,
          layer.alternative_ids[:, 0], ~(layer.dead | layer.invalid), config, mesh,
          result.concepts, embed_texts, weights, simulator,
          None if visibility is None else visibility.visible)
    if bootstrap:
      top_ids_by_layer[name] = top_ids
  if top_ids_by_layer:
    # Every layer's resamples in one pass over the concepts (each block's P rows once).
    started = time.time()
    names = list(top_ids_by_layer)
    stabilities = stability_lib.layers_stability(
        config.similarity_fn, probe.image_embeddings, text_embeddings,
        [top_ids_by_layer[name] for name in names],
        [~(result.layers[name].dead | result.layers[name].invalid) for name in names],
        num_resamples=bootstrap, weights=weights, mesh=mesh,
        compute_dtype=config.similarity_dtype,
        block_size=config.concept_block_size or None, row_normalisers=row_normalisers,
        log_every_s=config.log_every_s)
    seconds = time.time() - started
    logging.info("Label stability (%d resamples) of %d layer(s) in %.1f s.", bootstrap,
                 len(names), seconds)
    if stage_seconds is not None:
      stage_seconds["label_stability"] = round(seconds, 3)
    for name, unit_stability in zip(names, stabilities):
      out[name].stability = unit_stability.stability
      out[name].alternative_shares = unit_stability.shares(
          result.layers[name].alternative_ids)
      logging.info("Layer %s: label stability mean %.3f.", name,
                   float(np.nanmean(unit_stability.stability))
                   if np.isfinite(unit_stability.stability).any() else float("nan"))
  return out

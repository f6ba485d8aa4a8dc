"""How reproducible each unit's label is: the chance that two independent probe draws of
the same size give it the same label, estimated by the bootstrap.

Resample r (r = 0..R-1) gives probe row i the weight w[r, i] ~ Poisson(1) (the Poisson
bootstrap: a resample of about N images, each image drawn w times; seeded by (seed, r),
the same for every layer). A unit's top-k in the resample is its images in descending
activation order, image i repeated w[r, i] times, cut at k: only the unit's top
T = max(2 top_k, top_k + 64) images can get there (fewer than k copies among them has
probability below 1e-9 at either default top_k; then the last of them fills the
remaining ranks). Every unit of the layer is
relabelled exactly as the run labels it ((soft-)WPMI over all concepts, the prior over
the layer's units in that resample, the same tie rule), and

  stability = share of pairs of distinct resamples that give the unit the same label
            = (sum_c n_c^2 - R) / (R (R - 1)),  n_c = resamples labelling it c,

the bootstrap's image of "two independent runs agree". Why pairs and not "the share of
resamples that keep the run's label": the run's label is itself one draw, and in the
run's own resamples it wins more often than it does on fresh images (the argmax's
winner's curse). Measured on the synthetic world (benchmarks/label_quality.py
--stability, BENCHMARKS.md): the share that keeps the label is over-confident
(calibration error 0.17), the pairwise agreement is calibrated against the share of
units whose label a fresh draw reproduces. `shares` gives, per concept listed, the
share of resamples that label the unit with it.

Cost: R relabellings of the layer, each the similarity's (top_k x concepts) terms for
every unit, in one pass over blocks of concepts (streaming.resampled_labels: from the
embeddings, S never held; the rows' normalisers and each block's softmax rows once for
all resamples; the resamples split over the mesh). layers_stability relabels all the
layers of a run in that one pass, so each block's P rows are computed once per run, and
in one program: one gather for all layers' units side by side and each layer's prior
over its own units, layers of like width padded into one vmapped prior
(similarity.prior_stacks), so compiling does not grow with the number of layers. That
program runs once per block of concepts, the running labels kept on the device(s), so
the pass logs its rate and ETA: at ResNet-50's widths with 20,000 concepts it is about
156 G terms, a minute or more on a CPU (BENCHMARKS.md).
"""
import dataclasses

from absl import logging
import numpy as np

from jaxdissect import activations as activations_lib
from jaxdissect import registry
from jaxdissect import similarity
from jaxdissect import streaming

DEFAULT_NUM_RESAMPLES = 20
# Top images per unit the resamples draw from: max(DEPTH x top_k, top_k + MIN_EXTRA).
DEPTH = 2
MIN_EXTRA = 64


@dataclasses.dataclass
class UnitStability:
  """stability: (num_units,) pairwise label agreement over resamples, NaN for unusable
  units. labels: (num_resamples, num_units) int32, each resample's label (concept index).
  """
  stability: np.ndarray
  labels: np.ndarray

  def shares(self, concept_ids: np.ndarray) -> np.ndarray:
    """concept_ids: (num_units, C) -> (num_units, C) share of resamples labelling the
    unit with each (NaN where the unit's stability is)."""
    concept_ids = np.asarray(concept_ids)
    out = np.mean(self.labels[:, :, None] == concept_ids[None], axis=0)
    return np.where(np.isnan(self.stability)[:, None], np.nan, out)


def depth(similarity_fn: str) -> int:
  """T: the top images per unit the resamples need."""
  top_k = similarity.default_top_k(similarity_fn)
  return max(DEPTH * top_k, top_k + MIN_EXTRA)


def poisson_weights(num_rows: int, num_resamples: int, seed: int) -> np.ndarray:
  """(num_resamples, num_rows) int32 ~ Poisson(1), resample r from the seed (seed, r)."""
  return np.stack([np.random.default_rng([seed, r]).poisson(1.0, num_rows)
                   for r in range(num_resamples)]).astype(np.int32)


def resampled_top_rows(top_rows: np.ndarray, weights: np.ndarray, top_k: int) -> np.ndarray:
  """Each unit's top_k in each resample.

  top_rows: (num_units, T) probe rows, highest activation first. weights: (R, num_rows).
  Returns (R, num_units, top_k) rows: rank j holds the image whose run of copies covers
  j; ranks beyond all T images' copies hold the T-th image.
  """
  num_units, num_top = top_rows.shape
  counts = weights[:, top_rows].astype(np.int64)  # (R, units, T)
  ends = np.cumsum(counts, axis=2)
  # One searchsorted over all (resample, unit) sequences: offset each by more than its
  # total so they sort one after another.
  span = int(ends[..., -1].max()) + top_k + 1
  offsets = np.arange(ends.shape[0] * num_units, dtype=np.int64).reshape(
      ends.shape[:2]) * span
  flat = (ends + offsets[..., None]).ravel()
  wanted = np.arange(top_k, dtype=np.int64)[None, None, :] + offsets[..., None]
  position = np.searchsorted(flat, wanted.ravel(), side="right").reshape(
      *ends.shape[:2], top_k)
  position -= (np.arange(ends.shape[0] * num_units).reshape(ends.shape[:2]) *
               num_top)[..., None]
  position = np.minimum(position, num_top - 1)
  return np.take_along_axis(np.broadcast_to(top_rows, (ends.shape[0], *top_rows.shape)),
                            position, axis=2).astype(np.int32)


def pairwise_agreement(labels: np.ndarray) -> np.ndarray:
  """labels: (R, num_units), R >= 2 -> (num_units,) share of pairs of distinct resamples
  with equal labels."""
  num_resamples = labels.shape[0]
  same = np.zeros(labels.shape[1], np.int64)
  for r in range(num_resamples):
    same += np.sum(labels == labels[r][None], axis=0) - 1
  return same / (num_resamples * (num_resamples - 1))


def layer_stability(similarity_fn: str, image_embeddings, text_embeddings,
                    top_rows: np.ndarray, usable: np.ndarray, **kwargs) -> UnitStability:
  """Stability of one layer's labels: layers_stability of this layer alone.

  top_rows: (num_units, >= depth(similarity_fn)) every unit's top rows, highest
  activation first; usable: (num_units,) False for dead or invalid units; kwargs:
  layers_stability's.
  """
  return layers_stability(similarity_fn, image_embeddings, text_embeddings, [top_rows],
                          [usable], **kwargs)[0]


def layers_stability(similarity_fn: str, image_embeddings, text_embeddings,
                     top_rows_by_layer, usable_by_layer, *,
                     num_resamples: int = DEFAULT_NUM_RESAMPLES, seed: int = 0,
                     weights: np.ndarray | None = None, mesh=None,
                     compute_dtype: str = "float32", block_size: int | None = None,
                     row_normalisers=None, log_every_s: float = 10.0
                     ) -> list[UnitStability]:
  """Stability of the labels of several layers, each relabelled with the prior over its
  own units, in one pass over blocks of concepts (streaming.layers_resampled_labels:
  each block's P rows computed once for all the layers, not once per layer).

  image_embeddings: (num_images, dim), may be a memmap; text_embeddings:
  (num_concepts, dim). top_rows_by_layer: [(num_units_l, >= depth(similarity_fn))]
  every unit's top rows, highest activation first (dead and invalid units too: the
  prior includes them). usable_by_layer: [(num_units_l,)] False for dead or invalid
  units (stability NaN).
  weights: (num_resamples, num_images) from poisson_weights, shared by the layers of a
  run; computed from (num_resamples, seed) when None. row_normalisers: the run's
  streaming.RowNormalisers (shared with its layers' similarity), or None. log_every_s:
  seconds between rate logs of the pass over the concepts (absl INFO).
  """
  if similarity_fn not in registry.PRIOR_FUNCTIONS:
    raise ValueError(f"stability is defined for {registry.PRIOR_FUNCTIONS}, not "
                     f"{similarity_fn!r}.")
  if num_resamples < 2:
    raise ValueError(f"stability needs at least 2 resamples, got {num_resamples}.")
  if not top_rows_by_layer:
    return []
  top_k = similarity.default_top_k(similarity_fn)
  num_top = min(depth(similarity_fn), len(image_embeddings))
  for top_rows in top_rows_by_layer:
    if top_rows.shape[1] < num_top:
      raise ValueError(f"stability needs each unit's top {num_top} images, got "
                       f"{top_rows.shape[1]}.")
  if weights is None:
    weights = poisson_weights(len(image_embeddings), num_resamples, seed)
  num_units = sum(len(top_rows) for top_rows in top_rows_by_layer)
  num_concepts = len(text_embeddings)
  # What the pass costs is its terms: every resample relabels every unit over every
  # concept from its top_k images (BENCHMARKS.md: about 3 G terms/s on 2 CPU cores).
  logging.info("Label stability: %d resamples x %d units x %d ranks x %d concepts = "
               "%.3g terms (trust_bootstrap sets the resamples; 0 skips this).",
               num_resamples, num_units, top_k, num_concepts,
               float(num_resamples) * num_units * top_k * num_concepts)
  progress = activations_lib.RateLogger(num_concepts, "Label stability", log_every_s,
                                        unit="concepts")
  rows = [resampled_top_rows(np.asarray(top_rows[:, :num_top]), weights[:num_resamples],
                             top_k) for top_rows in top_rows_by_layer]
  labels = streaming.layers_resampled_labels(
      similarity_fn, image_embeddings, text_embeddings, rows, mesh=mesh,
      compute_dtype=compute_dtype, block_size=block_size, row_normalisers=row_normalisers,
      on_block=lambda done, _: progress.update(done - progress.done))
  return [UnitStability(np.where(np.asarray(usable, bool), pairwise_agreement(layer_labels),
                                 np.nan), layer_labels)
          for usable, layer_labels in zip(usable_by_layer, labels)]

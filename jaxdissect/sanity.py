"""Sanity checks of the metrics the tool reports about a label (Neuron_Eval's missing- and
extra-label tests, Oikarinen, Yan & Weng, ICML 2025, their "theoretical" setting).

An ideal unit fires (1) exactly on the images that show its concept and is 0 elsewhere;
its concept vector c is that same 0/1 vector, present on a share gamma of the images.
A metric m(activations, c) that measures how well c explains the unit must score the
true concept above corrupted versions of it:
- missing labels: each positive of c is dropped with probability 1/2 (the explanation
  is too narrow);
- extra labels: negatives become positive at random until the positives double in
  expectation (the explanation is too broad).
For each gamma in FREQUENCIES and each seed, the corrupted score minus the true score,
divided by the metric's range, counts as a decrease when below -EPSILON; a test's result
is the share of (gamma, seed) pairs that decrease, and a metric passes a test at
PASS_SHARE or more (the published table passes metrics at 93.6% and fails one at
89.5%).

The metrics, oriented as the tool computes them (activations score, the concept's
presence is the target, where a metric has roles):
- correlation: Pearson; the simulation score of unit_trust.csv and explanations;
- cosine: of the raw vectors;
- auprc: average precision of the activations for the concept (metrics.
  average_precision; evaluation.json's gt_label_auprc). Neuron_Eval calls this
  orientation "inverse AUPRC";
- f1, iou: of the unit binarised at the midpoint of its range against the concept;
- auc: the unit's AUC for the concept's images (trust.auc; unit_trust.csv's auc),
  Neuron_Eval's "inverse AUC";
- significance: 1 - the p-value of the correlation against shuffles (linear.
  correlation_p_values; the test behind unit_trust.csv's explained), a detection test.
"""
import dataclasses
from typing import Callable

import numpy as np

from jaxdissect import linear
from jaxdissect import metrics
from jaxdissect import trust

FREQUENCIES = (0.499, 0.1, 0.01, 0.001, 0.0001)
EPSILON = 1e-3
PASS_SHARE = 0.93


def _binary(activations: np.ndarray) -> np.ndarray:
  low, high = activations.min(), activations.max()
  return activations > low + 0.5 * (high - low)


def _f1(activations, concept):
  fired, shown = _binary(activations), concept > 0
  both = np.sum(fired & shown)
  total = fired.sum() + shown.sum()
  return 2.0 * both / total if total else 0.0


def _iou(activations, concept):
  fired, shown = _binary(activations), concept > 0
  union = np.sum(fired | shown)
  return np.sum(fired & shown) / union if union else 0.0


def _cosine(activations, concept):
  norms = np.linalg.norm(activations) * np.linalg.norm(concept)
  return float(activations @ concept / norms) if norms else 0.0


def _correlation(activations, concept):
  return float(metrics.pearson_columns(activations[:, None], concept[:, None])[0, 0])


def _significance(activations, concept):
  r = _correlation(activations, concept)
  return 1.0 - float(linear.correlation_p_values(np.array([r]), len(activations))[0])


# name -> (metric(activations (N,), concept (N,) 0/1) -> float, (lowest, highest)).
METRICS: dict[str, tuple[Callable, tuple[float, float]]] = {
    "correlation": (_correlation, (-1.0, 1.0)),
    "cosine": (_cosine, (-1.0, 1.0)),
    "auprc": (lambda a, c: metrics.average_precision(a, c > 0), (0.0, 1.0)),
    "f1": (_f1, (0.0, 1.0)),
    "iou": (_iou, (0.0, 1.0)),
    "auc": (lambda a, c: trust.auc(a, c > 0), (0.0, 1.0)),
    "significance": (_significance, (0.0, 1.0)),
}

# What the published checks report for the same metric in the same orientation
# (Neuron_Eval, Table 2, theoretical column: share decreasing under missing / extra
# labels); None where the paper has no such metric.
PUBLISHED = {"correlation": (1.0, 1.0), "cosine": (1.0, 1.0), "auprc": (1.0, 0.8954),
             "f1": (1.0, 1.0), "iou": (1.0, 1.0), "auc": (0.60, 1.0),
             "significance": None}


@dataclasses.dataclass
class CheckResult:
  """missing, extra: share of (frequency, seed) pairs whose score decreased; per
  frequency in by_frequency {gamma: (missing, extra)}."""
  missing: float
  extra: float
  by_frequency: dict

  @property
  def passes(self) -> bool:
    return self.missing >= PASS_SHARE and self.extra >= PASS_SHARE


def missing_labels(concept: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  return concept * (rng.random(concept.shape) > 0.5)


def extra_labels(concept: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  positives = concept.sum()
  rate = positives / max(len(concept) - positives, 1)
  return np.minimum(concept + (rng.random(concept.shape) < rate), 1.0)


def check(name: str, num_images: int = 100_000, num_seeds: int = 20,
          seed: int = 0) -> CheckResult:
  """Both tests of METRICS[name] on ideal units over FREQUENCIES."""
  metric, (lowest, highest) = METRICS[name]
  rng = np.random.default_rng(seed)
  by_frequency, all_missing, all_extra = {}, [], []
  for gamma in FREQUENCIES:
    concept = np.zeros(num_images)
    concept[:max(1, int(gamma * num_images))] = 1.0
    activations = concept.copy()
    truth = metric(activations, concept)
    missing = [(metric(activations, missing_labels(concept, rng)) - truth) /
               (highest - lowest) < -EPSILON for _ in range(num_seeds)]
    extra = [(metric(activations, extra_labels(concept, rng)) - truth) /
             (highest - lowest) < -EPSILON for _ in range(num_seeds)]
    by_frequency[gamma] = (float(np.mean(missing)), float(np.mean(extra)))
    all_missing += missing
    all_extra += extra
  return CheckResult(float(np.mean(all_missing)), float(np.mean(all_extra)), by_frequency)

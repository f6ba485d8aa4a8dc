"""Label metrics, pure functions of labels, scores and truth: precision against known
truth (top-1, top-5, mean and median rank, the label score's AUC, cosine in CLIP text
space and in a sentence-embedding space), per-unit trust summaries, label diversity.
evaluate.py applies them to a run and writes evaluation.json.

For a layer whose units' true labels are known (a classifier's class names, planted
units), precision is the fraction of units whose label is the truth (top-1) or whose
top-5 alternatives contain it (top-5); clip_cos is the mean cosine between the CLIP text
embeddings of predicted and true labels (the paper's similarity measure). Dead or
invalid units count as wrong with cosine 0. mean_rank is the mean over units of the true
concept's rank among all concepts by score (1 = best; within the listed alternatives
the order the labels were given, ties broken as they were, so a unit whose label is not
the truth never ranks it first; beyond them equal scores share the better rank; a dead
or invalid unit ranks last), over the units whose truth is in the concept set.
Diversity: distinct labels / live units, and the entropy (bits) of the labels.
"""
from typing import Callable, Mapping, Sequence

import numpy as np

from jaxdissect import labeling


def label_precision(labels: Sequence[str], alternatives: Sequence[Sequence[str]],
                    truth: Sequence[str],
                    embed: Callable[[Sequence[str]], np.ndarray],
                    sentence_embed: Callable[[Sequence[str]], np.ndarray] | None = None
                    ) -> dict[str, float]:
  """labels: (num_units,); alternatives: (num_units, >=5) best first; truth: (num_units,);
  embed: texts -> L2-normalised CLIP text embeddings (len(texts), dim); sentence_embed:
  the same in a sentence model's space, or None to leave sentence_cos out."""
  if len(labels) != len(truth):
    raise ValueError(f"{len(labels)} labels but {len(truth)} true labels.")
  labels, truth = list(labels), list(truth)
  top1 = np.mean([p == t for p, t in zip(labels, truth)])
  top5 = np.mean([t in list(alts)[:5] for alts, t in zip(alternatives, truth)])
  live = [i for i, p in enumerate(labels)
          if p not in (labeling.DEAD_LABEL, labeling.INVALID_LABEL)]
  out = {"top1": float(top1), "top5": float(top5), "num_units": len(labels)}
  for key, embedder in (("clip_cos", embed), ("sentence_cos", sentence_embed)):
    if embedder is None:
      continue
    cosines = np.zeros(len(labels))
    if live:
      predicted = embedder([labels[i] for i in live])
      true = embedder([truth[i] for i in live])
      cosines[live] = np.sum(predicted * true, axis=1)
    out[key] = float(cosines.mean())
  return out


def true_concept_ranks(scores: np.ndarray, truth: Sequence[str],
                       concepts: Sequence[str], usable: np.ndarray,
                       listed: np.ndarray | None = None) -> np.ndarray:
  """(units,) rank of each unit's true concept, 1 = best; NaN where the truth is not a
  concept. scores: (units, concepts); usable: (units,) bool, False for dead/invalid
  units, which rank last. listed: (units, n) concept ids in the order the labelling
  gave them (its alternatives, ties broken by its tie-break): a truth among them ranks
  where it is listed, one not among them below all n."""
  index = {c: i for i, c in enumerate(concepts)}
  ranks = np.full(len(truth), np.nan)
  for unit, true in enumerate(truth):
    if true not in index:
      continue
    if not usable[unit]:
      ranks[unit] = len(concepts)
      continue
    row = np.asarray(scores[unit])
    rank = 1 + int(np.sum(row > row[index[true]]))
    if listed is not None:
      position = np.flatnonzero(np.asarray(listed[unit]) == index[true])
      rank = int(position[0]) + 1 if position.size else max(rank, len(listed[unit]) + 1)
    ranks[unit] = rank
  return ranks


def median_rank(ranks: np.ndarray) -> float:
  """The authors' median (Table 3 notebook): the element at index n // 2 of the sorted
  ranks (the upper median for an even count)."""
  return float(np.sort(ranks)[len(ranks) // 2])


def correctness_auc(label_scores: np.ndarray, correct: np.ndarray) -> float | None:
  """ROC AUC of each unit's label score as a predictor of the label being right (the
  Table 3 notebook's get_auc); ties count a half. None when every label is right or
  every label is wrong."""
  correct = np.asarray(correct, bool)
  scores = np.asarray(label_scores, np.float64)
  if correct.all() or not correct.any():
    return None
  positive, negative = scores[correct], scores[~correct]
  greater = (positive[:, None] > negative[None, :]).sum()
  ties = (positive[:, None] == negative[None, :]).sum()
  return float((greater + 0.5 * ties) / (positive.size * negative.size))


def label_diversity(labels: Sequence[str]) -> dict[str, float]:
  """distinct labels / live units and the entropy (bits) of the live labels; dead and
  invalid units are left out."""
  live = [l for l in labels if l not in (labeling.DEAD_LABEL, labeling.INVALID_LABEL)]
  if not live:
    return {"diversity": 0.0, "label_entropy_bits": 0.0}
  _, counts = np.unique(live, return_counts=True)
  shares = counts / counts.sum()
  return {"diversity": float(len(counts) / len(live)),
          "label_entropy_bits": float(-np.sum(shares * np.log2(shares)))}


def make_embedder(concepts: Sequence[str], text_embeddings: np.ndarray,
                  embed_new: Callable[[list[str]], np.ndarray]):
  """Looks texts up among the concept embeddings; embeds the others with embed_new."""
  index = {c: i for i, c in enumerate(concepts)}
  cache: dict[str, np.ndarray] = {}

  def embed(texts: Sequence[str]) -> np.ndarray:
    missing = sorted({t for t in texts if t not in index and t not in cache})
    if missing:
      for text, vector in zip(missing, embed_new(missing)):
        cache[text] = vector
    return np.stack([text_embeddings[index[t]] if t in index else cache[t] for t in texts])

  return embed


def trust_summary(unit_trust) -> dict[str, float | None]:
  """Mean AUC, the share of units with p < 0.05, the mean label stability and the share
  of units with stability >= STABLE, over units that have them (stability keys only
  when it was computed), and the explanations' summary (mean held-out simulations, the
  recommended label, the share explained) where they were computed."""
  out = {}
  measures = [("mean_auc", unit_trust.auc, np.mean),
              ("significant_share", unit_trust.p_value,
               lambda v: np.mean(v < SIGNIFICANCE))]
  if getattr(unit_trust, "stability", None) is not None:
    measures += [("mean_stability", unit_trust.stability, np.mean),
                 ("stable_share", unit_trust.stability, lambda v: np.mean(v >= STABLE))]
  for key, values, fn in measures:
    values = values[~np.isnan(values)]
    out[key] = float(fn(values)) if values.size else None
  if getattr(unit_trust, "explanations", None) is not None:
    out.update(unit_trust.explanations.summary())
  return out


SIGNIFICANCE = 0.05
# A label counts as stable at this bootstrap agreement (stability.py): on the synthetic
# world such labels are reproduced by a fresh probe draw about 80% of the time.
STABLE = 0.8


def evaluate_result(result, truths: Mapping[str, Sequence[str]], embed,
                    sentence_embed=None) -> dict[str, dict]:
  """{layer: {num_units, num_concepts, diversity, label_entropy_bits[, mean_auc,
  significant_share][, top1, top5, clip_cos[, sentence_cos], label_auc[, mean_rank,
  median_rank, ranked_units]]}} for every layer (every metric the paper's Table 1-3
  notebooks print: CLIP and sentence-model cosine, top-1/top-5, mean and median rank
  of the true concept, and the AUC of the label score for telling right from wrong); precision only where the truth is known, ranks
  only where the layer's scores are kept in result.scores, trust where
  result.trust has the layer."""
  report = {}
  for name, layer in result.layers.items():
    scores = {"num_units": layer.num_units, "num_concepts": len(result.concepts)}
    truth = truths.get(name)
    if truth is not None:
      alternatives = [[result.concepts[c] for c in row] for row in layer.alternative_ids]
      scores.update(label_precision(layer.labels, alternatives, truth, embed,
                                    sentence_embed))
      usable = ~(layer.dead | layer.invalid)
      scores["label_auc"] = correctness_auc(
          np.where(usable, layer.label_scores, -np.inf),
          [p == t for p, t in zip(layer.labels, truth)])
      if name in result.scores:
        ranks = true_concept_ranks(result.scores[name], truth, result.concepts,
                                   ~(layer.dead | layer.invalid), layer.alternative_ids)
        ranked = ranks[~np.isnan(ranks)]
        scores["mean_rank"] = float(ranked.mean()) if ranked.size else None
        scores["median_rank"] = median_rank(ranked) if ranked.size else None
        scores["ranked_units"] = int(ranked.size)
    if name in result.trust:
      scores.update(trust_summary(result.trust[name]))
    scores.update(label_diversity(layer.labels))
    report[name] = scores
  return report


# ------------------------------------------ ground truth from per-image annotations
def pearson_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Pearson correlation over rows of every column of x (N, K) with every column of y
  (N, W): (K, W) float64; 0 where either column is constant."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  x = x - x.mean(axis=0)
  y = y - y.mean(axis=0)
  x_norm = np.linalg.norm(x, axis=0)
  y_norm = np.linalg.norm(y, axis=0)
  # A column constant up to float64 rounding of its mean has no direction.
  x_flat = x_norm <= 1e-12 * np.maximum(1.0, np.abs(x).max(axis=0, initial=0.0)) * len(x)
  y_flat = y_norm == 0
  corr = (x.T @ y) / np.outer(np.where(x_flat, 1.0, x_norm), np.where(y_flat, 1.0, y_norm))
  corr[x_flat] = 0.0
  corr[:, y_flat] = 0.0
  return corr


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
  """Area under the precision-recall curve as average precision: sum over thresholds
  (each distinct score, highest first) of the recall gained times the precision there;
  tied scores enter together. NaN without positives."""
  scores = np.asarray(scores, np.float64)
  positive = np.asarray(positive, bool)
  num_positive = int(positive.sum())
  if num_positive == 0:
    return float("nan")
  order = np.argsort(-scores, kind="stable")
  sorted_scores, hits = scores[order], positive[order]
  ends = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])
  true_positives = np.cumsum(hits)[ends]
  precision = true_positives / (ends + 1)
  recall_gain = np.diff(np.r_[0, true_positives]) / num_positive
  return float(np.sum(recall_gain * precision))


def ground_truth_layer(activations: np.ndarray, annotations: np.ndarray,
                       words: Sequence[str], labels: Sequence[str],
                       live: np.ndarray) -> dict[str, float | int | None]:
  """How well a layer's labels describe its units, by what the images show.

  activations: (N, K) the units' pooled activations over the probe images;
  annotations: (N, W) 1 where image i shows word w (the synthetic world's annotations);
  labels: (K,) each unit's label; live: (K,) False for dead or invalid units.
  Per live unit: the Pearson correlation over the images between its activation and the
  presence of its label's concept (0 for a label that names nothing annotated: a
  distractor), the oracle's (the best-correlated annotated concept), and the average
  precision of the activation for the label's concept (0 for a distractor). Returns
  their means over live units, explained_share = mean label / mean oracle correlation,
  and the share of live units whose label is a distractor ("gt_" keys; None without
  live units)."""
  live = np.asarray(live, bool)
  index = {word: i for i, word in enumerate(words)}
  units = np.flatnonzero(live)
  if not units.size:
    return {"gt_units": 0, "gt_label_corr": None, "gt_oracle_corr": None,
            "gt_explained_share": None, "gt_distractor_share": None,
            "gt_label_auprc": None}
  block = np.asarray(activations[:, units], np.float64)
  corr = pearson_columns(block, annotations)
  label_corr, label_ap = np.zeros(len(units)), np.zeros(len(units))
  distractor = np.zeros(len(units), bool)
  for i, unit in enumerate(units):
    word = index.get(labels[unit])
    if word is None:
      distractor[i] = True
      continue
    label_corr[i] = corr[i, word]
    ap = average_precision(block[:, i], annotations[:, word] > 0)
    label_ap[i] = 0.0 if np.isnan(ap) else ap
  oracle = corr.max(axis=1)
  mean_oracle = float(oracle.mean())
  return {"gt_units": int(len(units)), "gt_label_corr": float(label_corr.mean()),
          "gt_oracle_corr": mean_oracle,
          "gt_explained_share": (float(label_corr.mean()) / mean_oracle
                                 if mean_oracle > 0 else None),
          "gt_distractor_share": float(distractor.mean()),
          "gt_label_auprc": float(label_ap.mean())}


# A unit whose best annotated concept correlates at least this much with it has
# something to explain (issue 16's target: few such units marked unexplained).
STRONG_ORACLE = 0.3


def ground_truth_explained(activations: np.ndarray, annotations: np.ndarray,
                           words: Sequence[str], labels: Sequence[str], live: np.ndarray,
                           explained: np.ndarray) -> dict[str, float | None]:
  """Whether the `explained` verdicts agree with what the images show.

  activations, annotations, words, live: as ground_truth_layer; labels: (K,) the label
  to judge (the layer's recommended one); explained: (K,) bool. Returns the share of
  explained live units whose label names nothing annotated (a distractor), and the
  share of live units whose oracle correlation is >= STRONG_ORACLE marked unexplained
  (None where no unit qualifies)."""
  live = np.asarray(live, bool)
  explained = np.asarray(explained, bool) & live
  known = set(words)
  distractor = np.array([label not in known for label in labels])
  units = np.flatnonzero(live)
  oracle = np.zeros(len(live))
  if units.size:
    oracle[units] = pearson_columns(np.asarray(activations[:, units], np.float64),
                                    annotations).max(axis=1)
  strong = live & (oracle >= STRONG_ORACLE)
  return {"gt_explained_distractor_share": (float(distractor[explained].mean())
                                            if explained.any() else None),
          "gt_strong_unexplained_share": (float(np.mean(~explained[strong]))
                                          if strong.any() else None)}

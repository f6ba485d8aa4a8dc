"""Label evaluation against known truth: top-1, top-5, mean rank, cosine in CLIP text
space, and label diversity.

For a layer whose units' true labels are known (a classifier's class names, planted
units), precision is the fraction of units whose label is the truth (top-1) or whose
top-5 alternatives contain it (top-5); clip_cos is the mean cosine between the CLIP text
embeddings of predicted and true labels (the paper's similarity measure). Dead or
invalid units count as wrong with cosine 0. mean_rank is the mean over units of the true
concept's rank among all concepts by score (1 = best; equal scores share the better
rank; a dead or invalid unit ranks last), over the units whose truth is in the concept
set. Diversity: distinct labels / live units, and the entropy (bits) of the labels.
"""
import json
import os
from typing import Callable, Mapping, Sequence

import numpy as np

from jaxdissect import labeling


def label_precision(labels: Sequence[str], alternatives: Sequence[Sequence[str]],
                    truth: Sequence[str],
                    embed: Callable[[Sequence[str]], np.ndarray]) -> dict[str, float]:
  """labels: (num_units,); alternatives: (num_units, >=5) best first; truth: (num_units,);
  embed: texts -> L2-normalised (len(texts), dim)."""
  if len(labels) != len(truth):
    raise ValueError(f"{len(labels)} labels but {len(truth)} true labels.")
  labels, truth = list(labels), list(truth)
  top1 = np.mean([p == t for p, t in zip(labels, truth)])
  top5 = np.mean([t in list(alts)[:5] for alts, t in zip(alternatives, truth)])
  live = [i for i, p in enumerate(labels)
          if p not in (labeling.DEAD_LABEL, labeling.INVALID_LABEL)]
  cosines = np.zeros(len(labels))
  if live:
    predicted = embed([labels[i] for i in live])
    true = embed([truth[i] for i in live])
    cosines[live] = np.sum(predicted * true, axis=1)
  return {"top1": float(top1), "top5": float(top5), "clip_cos": float(cosines.mean()),
          "num_units": len(labels)}


def true_concept_ranks(scores: np.ndarray, truth: Sequence[str],
                       concepts: Sequence[str], usable: np.ndarray) -> np.ndarray:
  """(units,) rank of each unit's true concept, 1 = best; NaN where the truth is not a
  concept. scores: (units, concepts); usable: (units,) bool, False for dead/invalid
  units, which rank last."""
  index = {c: i for i, c in enumerate(concepts)}
  ranks = np.full(len(truth), np.nan)
  for unit, true in enumerate(truth):
    if true not in index:
      continue
    if not usable[unit]:
      ranks[unit] = len(concepts)
      continue
    row = np.asarray(scores[unit])
    ranks[unit] = 1 + int(np.sum(row > row[index[true]]))
  return ranks


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


def evaluate_result(result, truths: Mapping[str, Sequence[str]], embed) -> dict[str, dict]:
  """{layer: {top1, top5, clip_cos, num_units, num_concepts, diversity,
  label_entropy_bits[, mean_rank, ranked_units]}} for layers with truth; the ranks need
  the layer's scores kept in result.scores."""
  report = {}
  for name, truth in truths.items():
    layer = result.layers[name]
    alternatives = [[result.concepts[c] for c in row] for row in layer.alternative_ids]
    scores = label_precision(layer.labels, alternatives, truth, embed)
    scores["num_concepts"] = len(result.concepts)
    if name in result.scores:
      ranks = true_concept_ranks(result.scores[name], truth, result.concepts,
                                 ~(layer.dead | layer.invalid))
      ranked = ranks[~np.isnan(ranks)]
      scores["mean_rank"] = float(ranked.mean()) if ranked.size else None
      scores["ranked_units"] = int(ranked.size)
    scores.update(label_diversity(layer.labels))
    report[name] = scores
  return report


def write_json(path: str, evaluation: Mapping[str, dict]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(evaluation, f, indent=2, sort_keys=True)


def format_table(evaluation: Mapping[str, dict]) -> str:
  lines = [f"{'layer':<20} {'units':>6} {'top1':>7} {'top5':>7} {'clip_cos':>9} "
           f"{'mean_rank':>9} {'diversity':>9}"]
  for name, row in evaluation.items():
    rank = row.get("mean_rank")
    lines.append(f"{name:<20} {row['num_units']:>6} {row['top1']:>7.3f} {row['top5']:>7.3f} "
                 f"{row['clip_cos']:>9.3f} {'-' if rank is None else f'{rank:.2f}':>9} "
                 f"{row.get('diversity', 0.0):>9.3f}")
  return "\n".join(lines)


def evaluation_path(result_dir: str) -> str:
  return os.path.join(result_dir, "evaluation.json")

"""Label evaluation: precision against known truth (top-1, top-5, mean rank, cosine in
CLIP text space and in a sentence-embedding space), per-unit trust summaries, and label
diversity.

    python -m jaxdissect.evaluate --results DIR [--truth FILE.csv] [--sentence_model M]

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
import argparse
import csv
import json
import os
import sys
from typing import Callable, Mapping, Sequence

import numpy as np

from jaxdissect import errors

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
  """Mean AUC and the share of units with p < 0.05, over units that have them."""
  out = {}
  for key, values, fn in (("mean_auc", unit_trust.auc, np.mean),
                          ("significant_share",
                           unit_trust.p_value, lambda v: np.mean(v < SIGNIFICANCE))):
    values = values[~np.isnan(values)]
    out[key] = float(fn(values)) if values.size else None
  return out


SIGNIFICANCE = 0.05


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


def write_json(path: str, evaluation: Mapping[str, dict]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(evaluation, f, indent=2)  # layers in the order they were dissected


def format_table(evaluation: Mapping[str, dict]) -> str:
  columns = (("top1", 7, ".3f"), ("top5", 7, ".3f"), ("clip_cos", 9, ".3f"),
             ("sentence_cos", 12, ".3f"), ("mean_rank", 9, ".2f"), ("median_rank", 6, ".0f"),
             ("label_auc", 9, ".3f"), ("mean_auc", 8, ".3f"),
             ("significant_share", 8, ".3f"), ("diversity", 9, ".3f"))
  shown = [c for c in columns if any(c[0] in row for row in evaluation.values())]
  titles = {"significant_share": "p<0.05", "median_rank": "median"}
  lines = [f"{'layer':<20} {'units':>6} " + " ".join(
      f"{titles.get(key, key):>{width}}" for key, width, _ in shown)]
  for name, row in evaluation.items():
    cells = []
    for key, width, fmt in shown:
      value = row.get(key)
      cells.append(f"{'-' if value is None else format(value, fmt):>{width}}")
    lines.append(f"{name:<20} {row['num_units']:>6} " + " ".join(cells))
  return "\n".join(lines)


def evaluation_path(result_dir: str) -> str:
  return os.path.join(result_dir, "evaluation.json")


def write_json_atomic(path: str, evaluation: Mapping[str, dict]) -> None:
  temporary = f"{path}.tmp-{os.getpid()}"
  write_json(temporary, evaluation)
  os.replace(temporary, path)


def read_truth_file(path: str, layers: Mapping[str, int]) -> dict[str, list[str]]:
  """CSV with header layer,unit,label -> {layer: the true label of each unit}; layers:
  {layer: num_units} of the run. A listed layer must give every unit."""
  if not os.path.isfile(path):
    raise errors.UserError("truth", f"{path!r} does not exist.",
                           "give a CSV with header layer,unit,label.")
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f)
    if not {"layer", "unit", "label"} <= set(reader.fieldnames or ()):
      raise errors.UserError("truth", f"{path!r} has columns {reader.fieldnames}.",
                             "its header must be layer,unit,label.")
    rows = list(reader)
  truths: dict[str, dict[int, str]] = {}
  for row in rows:
    if row["layer"] not in layers:
      raise errors.UserError("truth", f"layer {row['layer']!r} of {path!r} was not "
                             "dissected in this run.",
                             f"use one of {', '.join(layers)}.")
    truths.setdefault(row["layer"], {})[int(row["unit"])] = row["label"]
  out = {}
  for layer, units in truths.items():
    if sorted(units) != list(range(layers[layer])):
      raise errors.UserError("truth", f"{path!r} gives {len(units)} of the "
                             f"{layers[layer]} units of {layer}.",
                             "give one row per unit of each listed layer.")
    out[layer] = [units[u] for u in range(layers[layer])]
  return out


def evaluate_directory(result_dir: str, truth_file: str | None = None,
                       sentence_model: str | None = None,
                       permutations: int | None = None) -> dict[str, dict]:
  """Re-scores a finished run from its stored activations, checks that the labels are
  the ones in result_dir, and writes evaluation.json and unit_trust.csv there."""
  # Imported here: pipeline imports this module.
  from jaxdissect import pipeline  # pylint: disable=g-import-not-at-top
  from jaxdissect import rundir  # pylint: disable=g-import-not-at-top
  run = rundir.load_run(result_dir)
  config = run.config
  if sentence_model is not None:
    config.sentence_model = sentence_model
  if permutations is not None:
    config.trust_permutations = permutations
  probe = run.probe()
  probe.activations = {name: probe.activations[name] for name in run.layers}
  probe.top = {name: top for name, top in probe.top.items() if name in run.layers}
  text_embeddings, concepts = run.text()
  if truth_file:
    truths = read_truth_file(truth_file, {n: len(l.labels) for n, l in run.layers.items()})
  else:
    truths = {name: truth for name, info in run.layer_infos.items()
              if (truth := run.target.truth_for(info)) is not None}
  result = pipeline.label_with_config(config, probe, text_embeddings, concepts,
                                     list(truths))
  for name, layer in result.layers.items():
    if layer.labels != run.layers[name].labels:
      raise errors.UserError(
          "results", f"the stored activations give other labels for {name} than "
          f"{result_dir}/descriptions.csv holds.",
          "the CSVs were edited or come from another run; rerun main.py.")
  result.trust = pipeline.layer_trust(config, probe, result, text_embeddings)
  evaluation = pipeline.evaluate_run(config, result, truths, concepts, text_embeddings,
                                     lambda: run.clip)
  write_json_atomic(evaluation_path(result_dir), evaluation)
  temporary = os.path.join(result_dir, f"unit_trust.csv.tmp-{os.getpid()}")
  with open(temporary, "w", encoding="utf-8", newline="") as f:
    f.write(result.trust_csv())
  os.replace(temporary, os.path.join(result_dir, "unit_trust.csv"))
  return evaluation


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m jaxdissect.evaluate",
      description="Evaluate the labels of a finished run: precision against known truth "
      "(the target's class names for its classifier layer, or --truth), per-unit AUC "
      "and permutation p-values, label diversity. Writes evaluation.json and "
      "unit_trust.csv into the result directory and prints a table.")
  parser.add_argument("--results", required=True, help="a result directory of main.py")
  parser.add_argument("--truth", default=None,
                      help="CSV layer,unit,label of true labels (default: the target's "
                      "class names, where it has them)")
  parser.add_argument("--sentence_model", default=None,
                      help="sentence-embedding model for sentence_cos (default: the "
                      "run's config.sentence_model; '' leaves it out)")
  parser.add_argument("--permutations", type=int, default=None,
                      help="permutations per unit for the p-values (default: the run's "
                      "config.trust_permutations)")
  args = parser.parse_args(argv)
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  try:
    evaluation = evaluate_directory(args.results, args.truth, args.sentence_model,
                                    args.permutations)
  except errors.UserError as err:
    print(f"error: {err.one_line()}", file=sys.stderr)
    return 2
  print(format_table(evaluation))
  return 0


if __name__ == "__main__":
  sys.exit(main())

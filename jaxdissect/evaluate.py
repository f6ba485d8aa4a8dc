"""Label evaluation of a run: applies jaxdissect.metrics to its labels and writes
evaluation.json; the CLI re-scores a finished run from its stored activations.

    python -m jaxdissect.evaluate --results DIR [--truth FILE.csv] [--sentence_model M]

The metrics and their definitions are in jaxdissect/metrics.py.
"""
import argparse
import csv
import json
import os
import sys
from typing import Mapping, Sequence

from absl import logging
import numpy as np

from jaxdissect import entry
from jaxdissect import errors
from jaxdissect import labeling
from jaxdissect import metrics
from jaxdissect import probe_pass
from jaxdissect import sharding
from jaxdissect import streaming
from jaxdissect import trust
from jaxdissect.models import clip as clip_lib
from jaxdissect.models import sentence as sentence_lib


def write_json(path: str, evaluation: Mapping[str, dict]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(evaluation, f, indent=2)  # layers in the order they were dissected


def format_table(evaluation: Mapping[str, dict]) -> str:
  columns = (("top1", 7, ".3f"), ("top5", 7, ".3f"), ("clip_cos", 9, ".3f"),
             ("sentence_cos", 12, ".3f"), ("mean_rank", 9, ".2f"), ("median_rank", 6, ".0f"),
             ("label_auc", 9, ".3f"), ("mean_auc", 8, ".3f"),
             ("significant_share", 8, ".3f"), ("mean_stability", 9, ".3f"),
             ("stable_share", 8, ".3f"), ("gt_explained_share", 9, ".3f"),
             ("gt_distractor_share", 9, ".3f"), ("diversity", 9, ".3f"))
  shown = [c for c in columns if any(c[0] in row for row in evaluation.values())]
  titles = {"significant_share": "p<0.05", "median_rank": "median",
            "mean_stability": "stability", "stable_share": "st>=0.8",
            "gt_explained_share": "explained", "gt_distractor_share": "distract"}
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
  _write_atomic(path, json.dumps(evaluation, indent=2))


def _write_atomic(path: str, text: str) -> None:
  """Writes a temporary file beside `path`, then renames it over `path`."""
  temporary = f"{path}.tmp-{os.getpid()}"
  with open(temporary, "w", encoding="utf-8", newline="") as f:
    f.write(text)
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


def layer_truths(target, layer_infos) -> dict[str, list[str]]:
  """{layer name: true label of each unit} for the layers whose truth the target knows;
  a classifier layer without real class names is named in a warning."""
  truths = {info.name: truth for info in layer_infos
            if (truth := target.truth_for(info)) is not None}
  _warn_of_missing_truth(target, layer_infos, truths)
  return truths


def _warn_of_missing_truth(target, layer_infos, truths) -> None:
  for info in layer_infos:
    if info.path == target.layer_aliases.get("fc") and info.name not in truths:
      logging.warning(
          "Layer %s has no accuracy in evaluation.json: %s has no real class names "
          "(placeholders such as class_0 or LABEL_0 are not truth). Set "
          "--config.class_names to its class-name list (e.g. clip_dissect:imagenet_labels "
          "for ImageNet models).", info.name, target.name)


def evaluate_run(config, result, truths, concepts, text_embeddings, clip,
                 log_table: bool = True, probe=None, annotations=None) -> dict:
  """evaluation.json's contents, logged as a table. clip: a ClipModel, or a callable
  returning one (loaded only if a true label is not in the concept set). probe,
  annotations: the run's store.ProbeActivations and its probe set's annotations
  (ProbeSet.annotations()), for the ground truth of every layer (add_ground_truth)."""
  sentence_embed = None
  if truths:
    encoder = sentence_lib.load_optional(config.sentence_model)
    sentence_embed = encoder.embed if encoder is not None else None
  embed = metrics.make_embedder(
      concepts, text_embeddings,
      lambda texts: clip_lib.embed_texts(clip() if callable(clip) else clip, texts))
  evaluation = metrics.evaluate_result(result, truths, embed, sentence_embed)
  if probe is not None and annotations is not None:
    add_ground_truth(evaluation, result, probe, annotations)
  if log_table:  # the evaluate CLI prints it instead
    logging.info("Label evaluation%s:\n%s",
                 " (precision against known truth)" if truths else "",
                 format_table(evaluation))
  return evaluation


def add_ground_truth(evaluation: dict, result, probe, annotations) -> dict:
  """Adds metrics.ground_truth_layer's "gt_" keys to every layer whose activation matrix
  the probe holds, from annotations = (words, (num_probe_images, len(words))) over the
  probe set's images (skipped images are dropped to match the activations' rows)."""
  words, matrix = annotations
  kept = np.setdiff1d(np.arange(len(matrix)), np.asarray(probe.skipped, np.int64))
  matrix = np.asarray(matrix)[kept]
  for name, layer in result.layers.items():
    activations = probe.activations.get(name)
    if activations is None or activations.shape != (len(matrix), layer.num_units):
      continue  # multi-process runs that gathered only the top-k
    live = ~(layer.dead | layer.invalid)
    evaluation[name].update(metrics.ground_truth_layer(
        activations, matrix, words, layer.labels, live))
    unit_trust = result.trust.get(name)
    correlation = None if unit_trust is None else unit_trust.correlation_label
    if correlation is not None:
      # The same measures for the correlation label, "gt_correlation_" keys.
      labels = [result.concepts[c] if c >= 0 else "" for c in correlation]
      scores = metrics.ground_truth_layer(activations, matrix, words, labels,
                                          live & (correlation >= 0))
      evaluation[name].update({f"gt_correlation_{key[3:]}": value
                               for key, value in scores.items()
                               if key != "gt_units"})
    explained = None if unit_trust is None else unit_trust.explanations
    if explained is not None:
      # The layer's recommended single label, and the explained verdicts.
      ids = explained.recommended_labels(layer.alternative_ids[:, 0])
      labels = [result.concepts[c] if c >= 0 else "" for c in ids]
      scores = metrics.ground_truth_layer(activations, matrix, words, labels,
                                          live & (ids >= 0))
      evaluation[name].update({f"gt_recommended_{key[3:]}": value
                               for key, value in scores.items() if key != "gt_units"})
      evaluation[name].update(metrics.ground_truth_explained(
          activations, matrix, words, labels, live, explained.explained))
  return evaluation


def _annotations(run):
  """The run's probe-set annotations, or None where its sources have none or cannot be
  listed any more (a moved image folder: the labels are still evaluated)."""
  try:
    return run.probe_set.annotations()
  except errors.UserError as err:
    logging.info("No per-image annotations for the ground truth: %s", err.one_line())
    return None


def evaluate_directory(result_dir: str, truth_file: str | None = None,
                       sentence_model: str | None = None,
                       permutations: int | None = None) -> dict[str, dict]:
  """Re-scores a finished run from its stored activations, checks that the labels are
  the ones in result_dir, and writes evaluation.json, unit_trust.csv and (where the
  run's config asks for them) explanations.csv and compositional.csv there."""
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
  row_normalisers = streaming.RowNormalisers(probe.image_embeddings, text_embeddings,
                                             reused=trust.computes_stability(config))
  result = labeling.label_with_config(config, probe, text_embeddings, concepts,
                                     list(truths), row_normalisers=row_normalisers)
  for name, layer in result.layers.items():
    if layer.labels != run.layers[name].labels:
      raise errors.UserError(
          "results", f"the stored activations give other labels for {name} than "
          f"{result_dir}/descriptions.csv holds.",
          "the CSVs were edited or come from another run; rerun main.py.")
  result.visibility = trust.run_visibility(config, probe.image_embeddings, text_embeddings)
  result.trust = trust.layer_trust(
      config, probe, result, text_embeddings, visibility=result.visibility,
      embed_texts=lambda texts: np.asarray(clip_lib.embed_texts(
          run.clip, texts, config.text_batch_size)),
      simulator=probe_pass.simulator_embeddings(config, run.probe_set, run.target,
                                                sharding.make_mesh(), concepts),
      row_normalisers=row_normalisers)
  evaluation = evaluate_run(config, result, truths, concepts, text_embeddings,
                            lambda: run.clip, log_table=False, probe=probe,
                            annotations=_annotations(run))
  write_json_atomic(evaluation_path(result_dir), evaluation)
  _write_atomic(os.path.join(result_dir, "unit_trust.csv"), result.trust_csv())
  for name, text in result.extra_files().items():
    _write_atomic(os.path.join(result_dir, name), text)
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
  entry.run(main)

"""A finished run's labels against another labelling of the same network, unit by unit.

    python -m jaxdissect.compare RUN_DIR CSV --out FILE.json

CSV is a descriptions.csv in the official tool's format (`layer,unit,description,...`):
the labels the authors published (`clip_dissect:resnet50_imagenet_broden`,
`clip_dissect:resnet18_places_imagenet_broden`, fetched from their repository at a
pinned commit), another run's, or NetDissect/MILAN results converted to that format.
Per layer present in both: the share of units whose label is identical, and the mean
cosine between our label and theirs in the run's CLIP text space and in its sentence
model's space (config.sentence_model; left out when it cannot be loaded).
For the authors' ResNet-50 file, run their setup: `d_probe=imagenet_broden`,
`concept_set=clip_dissect:20k`, `target_layers=conv1,layer1,layer2,layer3,layer4`.
"""
import argparse
import csv
import os
import sys
from typing import Callable, Mapping, Sequence

from absl import logging
import numpy as np

from jaxdissect import entry
from jaxdissect import errors
from jaxdissect import resources


def read_labels(path: str, field: str = "CSV") -> dict[str, list[str]]:
  """{layer: labels by unit} from a layer,unit,description CSV (units 0..n-1)."""
  if resources.is_resource(path):
    path = resources.local_path(path, field)
  if not os.path.isfile(path):
    raise errors.UserError(field, f"no file {path!r}.",
                           "give a descriptions.csv (layer,unit,description,...) or "
                           "clip_dissect:resnet50_imagenet_broden.")
  with open(path, encoding="utf-8-sig", newline="") as f:
    rows = list(csv.DictReader(f))
  if not rows or not {"layer", "unit", "description"} <= set(rows[0]):
    raise errors.UserError(field, f"{path} has no layer,unit,description columns.",
                           "give a CSV in the official descriptions.csv format.")
  by_layer: dict[str, dict[int, str]] = {}
  for row in rows:
    by_layer.setdefault(row["layer"], {})[int(row["unit"])] = row["description"]
  labels = {}
  for layer, units in by_layer.items():
    if sorted(units) != list(range(len(units))):
      raise errors.UserError(field, f"{path}: layer {layer} does not list units "
                             f"0..{len(units) - 1} once each.", "give a complete CSV.")
    labels[layer] = [units[u] for u in range(len(units))]
  return labels


def compare_labels(ours: Mapping[str, Sequence[str]], theirs: Mapping[str, Sequence[str]],
                   embed: Callable[[Sequence[str]], np.ndarray],
                   sentence_embed: Callable[[Sequence[str]], np.ndarray] | None = None
                   ) -> dict[str, dict]:
  """{layer: {num_units, identical, clip_cos[, sentence_cos]}} over the layers both
  label; embed maps texts to L2-normalised vectors (len(texts), dim)."""
  report = {}
  for layer, mine in ours.items():
    if layer not in theirs:
      continue
    other = list(theirs[layer])
    if len(other) != len(mine):
      raise errors.UserError("CSV", f"layer {layer} has {len(mine)} units in the run but "
                             f"{len(other)} in the CSV.", "compare runs of the same network.")
    scores = {"num_units": len(mine),
              "identical": float(np.mean([a == b for a, b in zip(mine, other)]))}
    for key, embedder in (("clip_cos", embed), ("sentence_cos", sentence_embed)):
      if embedder is not None:
        scores[key] = float(np.mean(np.sum(embedder(list(mine)) * embedder(other), axis=1)))
    report[layer] = scores
  if not report:
    raise errors.UserError("CSV", f"no layer in common (run: {sorted(ours)}, CSV: "
                           f"{sorted(theirs)}).", "compare runs of the same layers.")
  return report


def compare_run(result_dir: str, csv_path: str) -> dict:
  """Our labels in result_dir against csv_path's, embedded with the run's CLIP."""
  from jaxdissect import rundir  # pylint: disable=g-import-not-at-top
  from jaxdissect.metrics import make_embedder  # pylint: disable=g-import-not-at-top
  from jaxdissect.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  from jaxdissect.models import sentence as sentence_lib  # pylint: disable=g-import-not-at-top
  run = rundir.load_run(result_dir)
  theirs = read_labels(csv_path)
  text_embeddings, concepts = run.text()
  embed = make_embedder(concepts, text_embeddings,
                        lambda texts: clip_lib.embed_texts(run.clip, texts))
  encoder = sentence_lib.load_optional(run.config.get("sentence_model", ""))
  layers = compare_labels({n: l.labels for n, l in run.layers.items()}, theirs, embed,
                          encoder.embed if encoder is not None else None)
  return {"run": run.result_dir, "csv": csv_path, "clip_model": run.config.clip_model,
          "sentence_model": run.config.get("sentence_model", "") if encoder else None,
          "layers": layers}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxdissect.compare",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("run_dir", help="a result directory of main.py")
  parser.add_argument("csv", help="a descriptions.csv, or clip_dissect:resnet50_imagenet_"
                      "broden / clip_dissect:resnet18_places_imagenet_broden")
  parser.add_argument("--out", default=None, help="write the comparison here as JSON")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  try:
    report = compare_run(args.run_dir, args.csv)
  except errors.UserError as err:
    print(f"error: {err.one_line()}", file=sys.stderr)
    return 2
  print(f"{'layer':<12} {'units':>6} {'identical':>10} {'clip_cos':>9} {'sentence_cos':>13}")
  for layer, row in report["layers"].items():
    sentence = row.get("sentence_cos")
    print(f"{layer:<12} {row['num_units']:>6} {row['identical']:>10.3f} "
          f"{row['clip_cos']:>9.3f} {'-' if sentence is None else f'{sentence:.3f}':>13}")
  if args.out:
    from jaxdissect import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.write_json_atomic(args.out, report)
  return 0


if __name__ == "__main__":
  entry.run(main)

"""Do the labels say what the units do? Causal and pruning checks on the synthetic world.

    python benchmarks/applications_bench.py --out FILE.json [--num_images 2000]

1. Editing: for every concept that labels at least --min_units units of a layer,
   ablate those units and compare the accuracy drop of the class that depends on the
   concept (shape classes for the shape ResNet; colour classes for the planted colour
   classifier) with --random_draws random sets of as many of the layer's other units.
   A label passes when its drop beats every random draw.
2. Pruning: probe accuracy of the shape ResNet with its layer3 / layer4 units removed
   by each criterion, beside random removal.
Prints tables and writes JSON.
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "configs"))

import numpy as np  # noqa: E402

COLOUR_TARGET = "python:jaxdissect.synthetic.planted:make_colour_classifier"


def dissect(workdir: str, name: str, num_images: int, **overrides) -> str:
  import synthetic as synthetic_config  # pylint: disable=g-import-not-at-top  (configs/)
  from jaxdissect import dissect as dissect_lib  # pylint: disable=g-import-not-at-top
  config = synthetic_config.get_config()
  config.d_probe = f"synthetic:in_dist:{num_images}"
  config.result_dir = os.path.join(workdir, name)
  config.report_top_images = 0
  config.trust_permutations = 0
  config.sentence_model = ""
  for key, value in overrides.items():
    config[key] = value
  return dissect_lib.run(config, workdir)


def causal_checks(result_dir: str, layers, concepts, min_units: int, draws: int,
                  seed: int = 0) -> list[dict]:
  """Per (layer, concept labelling >= min_units units): the accuracy drop of the
  concept's class when those units are ablated, beside `draws` random unit sets of the
  same size; every mask of a layer is evaluated in one vmapped pass."""
  from jaxdissect import rundir  # pylint: disable=g-import-not-at-top
  from jaxdissect.applications import pruning  # pylint: disable=g-import-not-at-top
  run = rundir.load_run(result_dir)
  id2label = run.target.id2label
  label2id = {name: i for i, name in id2label.items()}
  rng = np.random.default_rng(seed)
  rows = []
  for layer in layers:
    labels = run.layers[layer].labels
    chosen = [(c, np.array([u for u, label in enumerate(labels) if label == c]))
              for c in concepts if c in label2id]
    chosen = [(c, units) for c, units in chosen if len(units) >= min_units]
    if not chosen:
      continue
    masks = [np.ones(len(labels), np.float32)]
    for _, units in chosen:
      for draw in range(draws + 1):
        mask = np.ones(len(labels), np.float32)
        others = np.setdiff1d(np.arange(len(labels)), units)
        pool = others if len(others) >= len(units) else np.arange(len(labels))
        mask[units if draw == 0 else rng.choice(pool, len(units), replace=False)] = 0
        masks.append(mask)
    predicted, class_ids, _ = pruning.masked_predictions(run, layer, np.stack(masks))
    for i, (concept, units) in enumerate(chosen):
      of_class = class_ids == label2id[concept]
      accuracy = np.mean(predicted[:, of_class] == label2id[concept], axis=1)
      base = accuracy[0]
      block = accuracy[1 + i * (draws + 1):1 + (i + 1) * (draws + 1)]
      drop, random_drops = base - block[0], base - block[1:]
      rows.append({
          "layer": layer, "concept": concept, "units": int(len(units)),
          "class_images": int(of_class.sum()), "accuracy_drop": float(drop),
          "random_drop_mean": float(random_drops.mean()),
          "random_drop_max": float(random_drops.max()),
          "beats_every_random_draw": bool(drop > random_drops.max()),
      })
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True)
  parser.add_argument("--num_images", type=int, default=2000)
  parser.add_argument("--min_units", type=int, default=2)
  parser.add_argument("--random_draws", type=int, default=10)
  args = parser.parse_args(argv)
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  from jaxdissect import rundir  # pylint: disable=g-import-not-at-top
  from jaxdissect.applications import pruning  # pylint: disable=g-import-not-at-top
  from jaxdissect.synthetic import planted, world  # pylint: disable=g-import-not-at-top
  workdir = tempfile.mkdtemp(prefix="applications-bench-")
  started = time.time()
  shapes = dissect(workdir, "shapes", args.num_images,
                   target_layers="layer2,layer3,layer4,fc")
  colours = dissect(workdir, "colours", args.num_images, target_model=COLOUR_TARGET,
                    target_layers="colour")
  causal = (causal_checks(shapes, ["layer2", "layer3", "layer4"], world.SHAPES,
                          args.min_units, args.random_draws)
            + causal_checks(colours, ["colour"], planted.COLOUR_NAMES, 1,
                            args.random_draws))
  print(f"{'layer':<8} {'concept':<9} {'units':>5} {'images':>6} {'acc drop':>8} "
        f"{'random mean':>11} {'random max':>10} {'passes':>6}")
  for r in causal:
    print(f"{r['layer']:<8} {r['concept']:<9} {r['units']:>5} {r['class_images']:>6} "
          f"{r['accuracy_drop']:>8.3f} {r['random_drop_mean']:>11.3f} "
          f"{r['random_drop_max']:>10.3f} {str(r['beats_every_random_draw']):>6}")
  run = rundir.load_run(shapes)
  curves = []
  for layer in ("layer3", "layer4"):
    for criterion in pruning.CRITERIA:
      curve = pruning.prune(run, layer, criterion)
      curves.append({"layer": layer, "criterion": criterion, "sparsity": curve.sparsities,
                     "accuracy": curve.accuracy.tolist(),
                     "random_accuracy_mean": curve.random_accuracy.mean(0).tolist()})
  print(f"\n{'layer':<7} {'criterion':<16} " + " ".join(f"{s:>5.1f}" for s in
                                                      curves[0]["sparsity"]))
  for c in curves:
    print(f"{c['layer']:<7} {c['criterion']:<16} " + " ".join(f"{a:>5.3f}"
                                                             for a in c["accuracy"]))
    print(f"{'':<7} {'random':<16} " + " ".join(f"{a:>5.3f}"
                                              for a in c["random_accuracy_mean"]))
  summary = {
      "num_images": args.num_images, "seconds": round(time.time() - started, 1),
      "causal": causal, "pruning": curves,
      "causal_pass_rate": {
          group: float(np.mean([r["beats_every_random_draw"] for r in causal
                                if (r["layer"] == "colour") == (group == "planted colour")]))
          for group in ("shape resnet", "planted colour")},
  }
  print(f"\nLabels whose ablation beats every random draw: {summary['causal_pass_rate']}")
  temporary = f"{args.out}.tmp-{os.getpid()}"
  with open(temporary, "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  os.replace(temporary, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())

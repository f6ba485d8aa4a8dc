"""Label quality on the synthetic world (the paper's Table 3 layout), with oracle and
NetDissect reference rows.

    python benchmarks/label_quality.py --out label_quality.json [--num_images 2000]
        [--num_draws 5]

Prints a table (rows: method x probe set; columns: final-layer top-1 / top-5 / CLIP
cosine to the truth, planted-unit top-1 / cosine) and writes one JSON record per
(method, probe, layer): {"method", "probe", "layer", "top1", "top5", "clip_cos",
"num_units"}. With --num_draws N the probe sets are drawn N times (seeds 0..N-1) and
top1 / top5 / clip_cos are means over the draws, with each draw's value in
"top1_per_draw" etc.: on 8 units one label is 0.125 of top-1, so one draw says little.

    python benchmarks/label_quality.py --stability --num_draws 5 --out stability.json

measures instead whether the label stability (jaxdissect/stability.py) predicts that a
fresh probe draw of the same size reproduces a unit's label: for each draw, every unit's
stability against the share of the other draws that give it the same label, binned in
fifths (calibration error), per layer and pooled over the hidden layers, beside the
naive estimator (the share of resamples that keep the run's label); and the labels'
ground truth on every layer (metrics.ground_truth_layer: distractor share, correlation
of the label's concept with the unit, the oracle's, their ratio, AUPRC), and the
explanations' (explanations.py: held-out simulation of the label, the correlation
label, the linear and the compositional explanation, the recommended label's ground
truth, the explained verdicts), means over the draws. --probe shifted draws the probe
sets from the shifted distribution instead.
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxdissect.synthetic import benchmark  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="JSON file to write")
  parser.add_argument("--num_images", type=int, default=2000)
  parser.add_argument("--num_draws", type=int, default=1,
                      help="probe sets drawn (seeds 0..N-1); metrics are means over them")
  parser.add_argument("--checkpoints", default=None,
                      help="checkpoint dir (default: the committed ones)")
  parser.add_argument("--stability", action="store_true",
                      help="measure the label stability's calibration (needs 2+ draws)")
  parser.add_argument("--resamples", type=int, default=20,
                      help="bootstrap resamples per draw with --stability")
  parser.add_argument("--probe", default="in_dist", choices=("in_dist", "shifted"),
                      help="the probe distribution with --stability")
  args = parser.parse_args()
  start = time.monotonic()
  if args.num_draws < 1:
    parser.error(f"--num_draws must be at least 1, got {args.num_draws}")
  if args.stability:
    if args.num_draws < 2:
      parser.error("--stability compares draws: give --num_draws 2 or more")
    stability_draws = []
    for seed in range(args.num_draws):
      stability_draws.append(benchmark.stability_draw(
          args.num_images, seed, args.resamples, args.checkpoints,
          probe_name=args.probe))
      print(f"draw {seed + 1}/{args.num_draws} done ({time.monotonic() - start:.0f}s)",
            flush=True)
    report = benchmark.stability_report(stability_draws)
    report.update(num_images=args.num_images, resamples=args.resamples, probe=args.probe,
                  ground_truth=benchmark.ground_truth_report(stability_draws))
    print(benchmark.format_stability(report))
    print("\nGround truth of the soft-WPMI labels (world annotations), mean over draws:")
    print(benchmark.format_ground_truth(report["ground_truth"]))
    print(f"({args.num_images} {args.probe} probe images per draw, {args.num_draws} "
          f"draws, {args.resamples} resamples, {time.monotonic() - start:.0f}s)")
    _write_json(args.out, report)
    return
  draws = []
  for seed in range(args.num_draws):
    draws.append(benchmark.run(num_images=args.num_images,
                               checkpoint_dir=args.checkpoints, seed=seed))
    print(f"draw {seed + 1}/{args.num_draws} done ({time.monotonic() - start:.0f}s)",
          flush=True)
  records = benchmark.mean_over_draws(draws)
  print(benchmark.format_table(records))
  print(f"({args.num_images} probe images per set, mean of {args.num_draws} draw(s), "
        f"{time.monotonic() - start:.0f}s)")
  _write_json(args.out, records)


def _write_json(path: str, data) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=1)
  os.replace(tmp, path)


if __name__ == "__main__":
  main()

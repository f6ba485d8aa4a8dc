"""soft-WPMI's prior weight lam on a small layer: labels of a finished run's layer
re-scored with several lam, against the layer's known truth.

    python main.py --config configs/synthetic.py --workdir W
    python benchmarks/soft_wpmi_lam.py --results W/results --layer fc --out FILE.json

With lam = 1 a score cannot exceed log K (K units); on a small layer the best scores
crowd at that cap. Prints CLIP cos to the truth, top-1 and mean rank of the true concept
for each lam, and writes JSON.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from jaxdissect import labeling  # noqa: E402
from jaxdissect import metrics  # noqa: E402
from jaxdissect import rundir  # noqa: E402
from jaxdissect import similarity  # noqa: E402


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--results", required=True)
  parser.add_argument("--layer", default="fc")
  parser.add_argument("--lams", default="1.0,0.9,0.8,0.6,0.3,0.0")
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  run = rundir.load_run(args.results)
  probe = run.probe()
  text, concepts = run.text()
  truth = run.target.truth_for(run.layer_infos[args.layer])
  p = np.asarray(labeling.concept_activation(probe.image_embeddings, text))
  unit_text = text / np.linalg.norm(text, axis=1, keepdims=True)
  index = {c: i for i, c in enumerate(concepts)}
  activations = np.asarray(probe.activations[args.layer])
  rows = []
  print(f"{'lam':>5} {'clip_cos':>8} {'top1':>6} {'mean_rank':>9} {'best score range':>20}")
  for lam in [float(x) for x in args.lams.split(",")]:
    scores, log_likelihood = similarity.soft_wpmi(p, activations, lam=lam,
                                                  return_log_likelihood=True)
    scores = np.asarray(scores)
    # Rank as the pipeline does: by score, exact ties (saturated at lam log K) by the
    # margin over the other units.
    order, _ = labeling.order_with_ties(
        scores, np.asarray(similarity.prior_margin(log_likelihood)), len(concepts))
    best = order[:, 0]
    ranks = metrics.true_concept_ranks(scores, truth, concepts,
                                        np.ones(len(truth), bool), order)
    row = {"lam": lam, "num_units": activations.shape[1],
           "log_num_units": float(np.log(activations.shape[1])),
           "clip_cos": float(np.mean([unit_text[b] @ unit_text[index[t]]
                                      for b, t in zip(best, truth)])),
           "top1": float(np.mean([concepts[b] == t for b, t in zip(best, truth)])),
           "mean_rank": float(np.mean(ranks)),
           "best_scores": scores.max(1).tolist()}
    rows.append(row)
    print(f"{lam:>5.2f} {row['clip_cos']:>8.3f} {row['top1']:>6.3f} {row['mean_rank']:>9.2f} "
          f"{min(row['best_scores']):>9.3f}..{max(row['best_scores']):<9.3f}")
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump({"results": args.results, "layer": args.layer, "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())

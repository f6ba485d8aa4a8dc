"""Label quality on the synthetic world (the paper's Table 3 layout), with oracle and
NetDissect reference rows.

    python benchmarks/label_quality.py --out label_quality.json [--num_images 2000]

Prints a table (rows: method x probe set; columns: final-layer top-1 / top-5 / CLIP
cosine to the truth, planted-unit top-1 / cosine) and writes one JSON record per
(method, probe, layer): {"method", "probe", "layer", "top1", "top5", "clip_cos",
"num_units"}.
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
  parser.add_argument("--checkpoints", default=None,
                      help="checkpoint dir (default: the committed ones)")
  args = parser.parse_args()
  start = time.monotonic()
  records = benchmark.run(num_images=args.num_images, checkpoint_dir=args.checkpoints)
  print(benchmark.format_table(records))
  print(f"({args.num_images} probe images per set, {time.monotonic() - start:.0f}s)")
  tmp = args.out + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(records, f, indent=1)
  os.replace(tmp, args.out)


if __name__ == "__main__":
  main()

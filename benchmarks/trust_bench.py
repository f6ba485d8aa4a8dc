"""The p-values of several layers: the softmax normalisers once per run, or per layer.

    python benchmarks/trust_bench.py --out benchmarks/results/trust_bench.json \
        [--size 20000x20000x256] [--layers 5] [--dim 512]

trust.unit_trust's (soft-)WPMI permutation p-values read log softmax(a P) at each
unit's label, which needs every image's normaliser over all concepts: one pass over
images x concepts x dim (NumPy, float64 sums). main.py computes it once per run
(trust.layer_trust) and hands it to every layer; before, every layer computed its own.
Both variants in this process, one run each, on the same random embeddings and ReLU
activations (seeded), 100 permutations per unit; the p-values must be equal.
"""
import argparse
import os
import sys
import time

import numpy as np

import common

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="20000x20000x256",
                      help="images x concepts x units per layer")
  parser.add_argument("--layers", type=int, default=5)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "trust_bench.json"))
  args = parser.parse_args()
  from jaxdissect import trust  # pylint: disable=g-import-not-at-top
  num_images, num_concepts, num_units = (int(v) for v in args.size.split("x"))
  rng = np.random.default_rng(0)
  images = rng.standard_normal((num_images, args.dim)).astype(np.float32)
  texts = rng.standard_normal((num_concepts, args.dim)).astype(np.float32)
  layers = []
  for _ in range(args.layers):
    activations = np.maximum(rng.standard_normal((num_images, num_units)), 0).astype(
        np.float32)
    layers.append((activations, rng.integers(0, num_concepts, num_units),
                   np.argsort(-activations, axis=0, kind="stable")[:128].T))
  a = trust.function_defaults("soft_wpmi")["a"]

  def run(shared):
    started = time.perf_counter()
    normalisers = trust.image_log_normalisers(images, texts, a) if shared else None
    out = []
    for index, (activations, labels, top) in enumerate(layers):
      out.append(trust.unit_trust(f"layer{index}", "soft_wpmi", activations, images, texts,
                                  labels, np.ones(num_units, bool), top,
                                  log_normalisers=normalisers))
      print(f"  {'shared' if shared else 'per layer'}: layer {index + 1}/{args.layers} "
            f"at {time.perf_counter() - started:.1f} s", flush=True)
    return time.perf_counter() - started, out

  per_layer_s, per_layer = run(False)
  shared_s, shared = run(True)
  equal = all(np.array_equal(x.p_value, y.p_value, equal_nan=True)
              for x, y in zip(per_layer, shared))
  print(f"{args.size} x {args.dim}-d x {args.layers} layers: per layer {per_layer_s:.1f} s, "
        f"shared {shared_s:.1f} s ({per_layer_s / shared_s:.2f}x); p-values equal: {equal}")
  common.write_json(args.out, {"size": args.size, "dim": args.dim, "layers": args.layers,
                               "per_layer_s": per_layer_s, "shared_s": shared_s,
                               "speed_up": per_layer_s / shared_s,
                               "p_values_equal": equal, "device": common.device_info()})


if __name__ == "__main__":
  main()

"""Several layers of one streamed run: the row normalisers shared, or computed per call.

    python benchmarks/layers_bench.py --out benchmarks/results/layers_bench.json \
        [--size 10000x20000x256] [--layers 3] [--dims 64,512] [--resamples 20]

What a streamed main.py run does after the probe pass, for each layer: the (soft-)WPMI
labels from the embeddings (streaming.soft_wpmi) and the label stability over bootstrap
resamples (stability.layer_stability). Both read every top image's softmax normaliser
over all concepts, a matmul over those images x concepts x dim:
  - shared: one streaming.RowNormalisers for the run, reused=True (what main.py does
    when it computes the stability), so each image's normaliser is computed once for
    all layers and the stability;
  - per call: each call computes its own (what main.py did before), twice per layer.
Each variant in its own process after a compiling run on other embeddings of the same
shapes, wall time of the whole loop over layers, one run. Labels and stabilities must be
equal between the variants (the normalisers are a function of the row alone); the table
says whether they are. Inputs: random embeddings and ReLU activations, seeded, as in
similarity_bench.py.
"""
import argparse
import multiprocessing
import os
import sys
import time

import numpy as np

import common

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_inputs(num_images, num_concepts, num_units, num_layers, dim, seed):
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((num_images, dim)).astype(np.float32)
  texts = rng.standard_normal((num_concepts, dim)).astype(np.float32)
  layers = [np.maximum(rng.standard_normal((num_images, num_units)), 0).astype(np.float32)
            for _ in range(num_layers)]
  return images, texts, layers


def run_layers(images, texts, layers, shared, resamples):
  """(labels per layer, stability per layer, seconds)."""
  from jaxdissect import similarity  # pylint: disable=g-import-not-at-top
  from jaxdissect import stability  # pylint: disable=g-import-not-at-top
  from jaxdissect import streaming  # pylint: disable=g-import-not-at-top
  started = time.perf_counter()
  normalisers = (streaming.RowNormalisers(images, texts, reused=True) if shared
                 else None)
  weights = stability.poisson_weights(len(images), resamples, 0)
  labels, stabilities = [], []
  for activations in layers:
    scores = streaming.soft_wpmi(images, texts, activations, row_normalisers=normalisers)
    labels.append(np.asarray(np.argmax(scores, axis=1)))
    _, top = similarity.top_activations(activations, stability.depth("soft_wpmi"))
    stabilities.append(stability.layer_stability(
        "soft_wpmi", images, texts, np.asarray(top), np.ones(activations.shape[1], bool),
        num_resamples=resamples, weights=weights,
        row_normalisers=normalisers).stability)
  return labels, stabilities, time.perf_counter() - started


def measure(args, queue):
  size, num_layers, dim, shared, resamples = args
  num_images, num_concepts, num_units = size
  warm = make_inputs(num_images, num_concepts, num_units, 1, dim, seed=1)
  run_layers(*warm, shared, resamples)  # compiles every program of the same shapes
  labels, stabilities, seconds = run_layers(
      *make_inputs(num_images, num_concepts, num_units, num_layers, dim, seed=0), shared,
      resamples)
  queue.put((labels, stabilities, seconds))


def in_process(args):
  ctx = multiprocessing.get_context("spawn")
  queue = ctx.Queue()
  proc = ctx.Process(target=measure, args=(args, queue))
  proc.start()
  out = queue.get()
  proc.join()
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="10000x20000x256",
                      help="images x concepts x units per layer")
  parser.add_argument("--layers", type=int, default=3)
  parser.add_argument("--dims", default="64,512", help="embedding widths, comma-separated")
  parser.add_argument("--resamples", type=int, default=20)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "layers_bench.json"))
  args = parser.parse_args()
  size = tuple(int(v) for v in args.size.split("x"))
  rows = []
  print(f"{args.size} x {args.layers} layers, soft_wpmi + stability ({args.resamples} "
        f"resamples), streamed")
  print(f"{'dim':>5} {'per call s':>11} {'shared s':>9} {'speed-up':>9} {'same labels':>12} "
        f"{'same stability':>15}")
  for dim in (int(d) for d in args.dims.split(",")):
    per_call = in_process((size, args.layers, dim, False, args.resamples))
    shared = in_process((size, args.layers, dim, True, args.resamples))
    same_labels = all(np.array_equal(a, b) for a, b in zip(per_call[0], shared[0]))
    same_stability = all(np.array_equal(a, b, equal_nan=True)
                         for a, b in zip(per_call[1], shared[1]))
    row = {"dim": dim, "per_call_s": per_call[2], "shared_s": shared[2],
           "speed_up": per_call[2] / shared[2], "same_labels": same_labels,
           "same_stability": same_stability}
    rows.append(row)
    print(f"{dim:>5} {row['per_call_s']:>11.1f} {row['shared_s']:>9.1f} "
          f"{row['speed_up']:>8.2f}x {str(same_labels):>12} {str(same_stability):>15}",
          flush=True)
  common.write_json(args.out, {"size": args.size, "layers": args.layers,
                               "resamples": args.resamples, "rows": rows,
                               "device": common.device_info()})


if __name__ == "__main__":
  main()

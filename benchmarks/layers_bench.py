"""Several layers of one streamed run: what it computes once, and what per layer.

    python benchmarks/layers_bench.py --out benchmarks/results/layers_bench.json \
        [--size 10000x20000x256] [--layers 3] [--dims 64,512] [--resamples 20] \
        [--widths 64,256,512,1024,2048] [--modes one_pass,in_memory]

What a streamed main.py run does after the probe pass: the (soft-)WPMI labels of every
layer from the embeddings and the label stability of every layer over bootstrap
resamples (stability.layer_stability). Both read every top image's softmax normaliser
over all concepts, and the similarity recomputes its top images' P rows per block of
concepts; each is a matmul over those images x concepts x dim. Three variants:
  - per call: each layer's streaming.soft_wpmi and stability compute their own
    normalisers, twice per layer (main.py before session 18);
  - shared: one streaming.RowNormalisers for the run, reused=True (what main.py does
    when it computes the stability), so each image's normaliser is computed once for
    all layers and the stability; each layer's similarity its own pass over the
    concepts (main.py in session 18);
  - one pass: the same normalisers, the similarity of all layers in one pass over
    blocks of concepts (streaming.layers_log_likelihood: each block's P rows computed
    once for the run; what label_probe does now), and the stability of all layers in
    another (stability.layers_stability; what trust.layer_trust does now);
  - in memory, with --in-memory: what a run does when P fits (concept_matrix_max_gb):
    P = labeling.concept_activation(images, texts) once, then the similarity of all
    layers in one pass over P's column blocks (similarity.layers_log_likelihood, what
    label_probe does with P); the stability as in one pass (it always streams). One
    pass / in memory is what streaming costs a run against holding P.
Each variant in its own process after a compiling run on other embeddings of the same
shapes, wall time of the whole run over the layers, one run. Labels and stabilities
must be equal between the streamed variants (up to the float32 rounding of a matmul of
another shape, which can move a label where two concepts tie to rounding); the table
says whether they are, and the JSON the in-memory labels' agreement with them.
Inputs: random embeddings and ReLU activations, seeded, as in similarity_bench.py.
"""
import argparse
import multiprocessing
import os
import sys
import time

import numpy as np

import common

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_inputs(num_images, num_concepts, widths, dim, seed):
  """widths: each layer's units."""
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((num_images, dim)).astype(np.float32)
  texts = rng.standard_normal((num_concepts, dim)).astype(np.float32)
  layers = [np.maximum(rng.standard_normal((num_images, units)), 0).astype(np.float32)
            for units in widths]
  return images, texts, layers


def run_layers(images, texts, layers, mode, resamples):
  """(labels per layer, stability per layer, seconds); mode: "per_call", "shared",
  "one_pass" or "in_memory" (the module docstring)."""
  from jaxdissect import labeling  # pylint: disable=g-import-not-at-top
  from jaxdissect import similarity  # pylint: disable=g-import-not-at-top
  from jaxdissect import stability  # pylint: disable=g-import-not-at-top
  from jaxdissect import streaming  # pylint: disable=g-import-not-at-top
  started = time.perf_counter()
  normalisers = (None if mode == "per_call"
                 else streaming.RowNormalisers(images, texts, reused=True))
  weights = stability.poisson_weights(len(images), resamples, 0) if resamples else None
  depth = stability.depth("soft_wpmi")
  tops = [np.asarray(similarity.top_activations(a, depth)[1]) for a in layers]
  if mode == "in_memory":
    P = labeling.concept_activation(images, texts)
    lam = similarity.registry.SIMILARITY["soft_wpmi"].defaults["lam"]
    labels = [np.asarray(np.argmax(similarity.subtract_prior(L, lam), axis=1))
              for L in similarity.layers_log_likelihood("soft_wpmi", P, tops)]
    del P
  elif mode == "one_pass":
    lam = similarity.registry.SIMILARITY["soft_wpmi"].defaults["lam"]
    labels = [np.asarray(np.argmax(similarity.subtract_prior(L, lam), axis=1))
              for L in streaming.layers_log_likelihood(
                  "soft_wpmi", images, texts, [t[:, :100] for t in tops],
                  row_normalisers=normalisers)]
  else:
    labels = [np.asarray(np.argmax(streaming.soft_wpmi(
        images, texts, None, top_images=top, row_normalisers=normalisers), axis=1))
              for top in tops]
  stabilities = []
  if resamples and mode in ("one_pass", "in_memory"):
    stabilities = [unit.stability for unit in stability.layers_stability(
        "soft_wpmi", images, texts, tops, [np.ones(t.shape[0], bool) for t in tops],
        num_resamples=resamples, weights=weights, row_normalisers=normalisers)]
  elif resamples:
    stabilities = [stability.layer_stability(
        "soft_wpmi", images, texts, top, np.ones(top.shape[0], bool),
        num_resamples=resamples, weights=weights, row_normalisers=normalisers).stability
                   for top in tops]
  return labels, stabilities, time.perf_counter() - started


def measure(args, queue):
  size, widths, dim, mode, resamples = args
  num_images, num_concepts = size[:2]
  warm = make_inputs(num_images, num_concepts, widths, dim, seed=1)
  # Compiles the programs of the same shapes (those shaped by the distinct top images
  # compile again in the timed run, in every variant alike).
  run_layers(*warm, mode, resamples)
  labels, stabilities, seconds = run_layers(
      *make_inputs(num_images, num_concepts, widths, dim, seed=0), mode, resamples)
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
  parser.add_argument("--widths", default=None,
                      help="each layer's units, comma-separated (instead of --layers "
                      "layers of the size's units), e.g. ResNet-50's 64,256,512,1024,2048")
  parser.add_argument("--modes", default=None,
                      help="only these variants, comma-separated (per_call, shared, "
                      "one_pass, in_memory); the comparisons need per_call and one_pass")
  parser.add_argument("--dims", default="64,512", help="embedding widths, comma-separated")
  parser.add_argument("--in-memory", action="store_true",
                      help="also time the run that holds P (labels in memory)")
  parser.add_argument("--resamples", type=int, default=20,
                      help="bootstrap resamples of the stability; 0: labels only")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "layers_bench.json"))
  args = parser.parse_args()
  size = tuple(int(v) for v in args.size.split("x"))
  widths = (tuple(int(w) for w in args.widths.split(",")) if args.widths
            else (size[2],) * args.layers)
  rows = []
  print(f"{size[0]}x{size[1]}, layers of {','.join(map(str, widths))} units, soft_wpmi + "
        f"stability ({args.resamples} resamples), streamed")
  print(f"{'dim':>5} {'per call s':>11} {'shared s':>9} {'one pass s':>11} "
        f"{'speed-up':>9} {'in memory s':>12} {'one pass/in memory':>19} "
        f"{'same labels':>12} {'same stability':>15}")
  modes = ("per_call", "shared", "one_pass") + (("in_memory",) if args.in_memory else ())
  if args.modes:
    modes = tuple(args.modes.split(","))
  for dim in (int(d) for d in args.dims.split(",")):
    runs = {mode: in_process((size, widths, dim, mode, args.resamples))
            for mode in modes}
    if not {"per_call", "one_pass"} <= set(runs):
      row = {"dim": dim, **{f"{mode}_s": run[2] for mode, run in runs.items()}}
      rows.append(row)
      print(f"{dim:>5} " + " ".join(f"{mode} {run[2]:.1f} s" for mode, run in runs.items()),
            flush=True)
      continue
    base = runs["per_call"]
    streamed = [runs[mode] for mode in ("per_call", "shared", "one_pass")]
    same_labels = all(np.array_equal(a, b) for run in streamed
                      for a, b in zip(base[0], run[0]))
    same_stability = all(np.array_equal(a, b, equal_nan=True) for run in runs.values()
                         for a, b in zip(base[1], run[1]))
    row = {"dim": dim, "per_call_s": base[2], "shared_s": runs["shared"][2],
           "one_pass_s": runs["one_pass"][2],
           "speed_up": base[2] / runs["one_pass"][2],
           "one_pass_over_shared": runs["one_pass"][2] / runs["shared"][2],
           "same_labels": same_labels, "same_stability": same_stability,
           "label_agreement": float(np.mean([np.mean(a == b) for a, b in zip(
               base[0], runs["one_pass"][0])]))}
    if "in_memory" in runs:
      row.update(in_memory_s=runs["in_memory"][2],
                 in_memory_label_agreement=float(np.mean([np.mean(a == b) for a, b in zip(
                     base[0], runs["in_memory"][0])])),
                 one_pass_over_in_memory=runs["one_pass"][2] / runs["in_memory"][2])
    rows.append(row)
    print(f"{dim:>5} {row['per_call_s']:>11.1f} {row['shared_s']:>9.1f} "
          f"{row['one_pass_s']:>11.1f} {row['speed_up']:>8.2f}x "
          f"{row.get('in_memory_s', float('nan')):>12.1f} "
          f"{row.get('one_pass_over_in_memory', float('nan')):>19.2f} "
          f"{str(same_labels):>12} {str(same_stability):>15}", flush=True)
  common.write_json(args.out, {"size": args.size, "widths": widths,
                               "resamples": args.resamples, "rows": rows,
                               "device": common.device_info()})


if __name__ == "__main__":
  main()

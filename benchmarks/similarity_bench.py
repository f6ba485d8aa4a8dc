"""Similarity functions against a per-neuron NumPy loop (the official tool's shape).

    python benchmarks/similarity_bench.py --out benchmarks/results/similarity_bench.json \
        [--sizes 10000x20000x256,50000x20000x2048] [--functions soft_wpmi,cos_similarity]

For each size (images x concepts x neurons) and function: seconds for ours (in-memory P,
jitted, compile excluded by a warm-up on the same shapes), ours streaming (no P, from
the embeddings), and the per-neuron NumPy baseline, measured in the same run; the ratios
baseline / ours and baseline / streaming; and the peak RSS of each (every measurement runs in its own process).
For (soft-)WPMI also the loop users would otherwise run: the official tool's algorithm in
PyTorch (float32, no autograd, torch threads = cores; softmax over concepts once, top-k of
the activations, then per neuron a gather of its top rows, log and sum, and the prior),
written from the paper's formulas; skipped with a note where torch is not installed.
For (soft-)WPMI also streaming with bfloat16 products (float32 accumulation): its time
and its label agreement with float32 streaming; with --kernels, streaming through the
fused Pallas kernel (kernels.py; only meaningful on a GPU or TPU, the CPU interprets it).
Inputs are random CLIP-like embeddings (dim 64) and ReLU activations, seeded.
cos_similarity's NumPy baseline reads all of P once per neuron: at 50000x20000x2048 that
is over 10 minutes, so BENCHMARKS.md runs that size with --functions soft_wpmi,wpmi.
"""
import argparse
import multiprocessing
import os
import resource
import time

import numpy as np

import common
from jaxdissect import registry  # noqa: E402  (no JAX: the parent stays light)

EMBED_DIM = 64
DEFAULT_SIZES = "10000x20000x256,50000x20000x2048,20000x5000x512"


def make_inputs(num_images, num_concepts, num_neurons, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((num_images, EMBED_DIM)).astype(np.float32)
  texts = rng.standard_normal((num_concepts, EMBED_DIM)).astype(np.float32)
  activations = np.maximum(rng.standard_normal((num_images, num_neurons)), 0).astype(
      np.float32)
  return images, texts, activations


def numpy_concept_activation(images, texts):
  images = images / np.linalg.norm(images, axis=1, keepdims=True)
  texts = texts / np.linalg.norm(texts, axis=1, keepdims=True)
  return images @ texts.T


def numpy_baseline(name, images, texts, activations):
  """One neuron at a time, as the official code loops: (num_neurons, num_concepts)."""
  P = numpy_concept_activation(images, texts)
  num_neurons = activations.shape[1]
  if name in registry.PRIOR_FUNCTIONS:
    top_k, a, lam = (100, 10.0, 1.0) if name == "soft_wpmi" else (28, 2.0, 0.6)
    logits = a * P
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    ranks = np.arange(top_k)
    membership = (0.998 - ranks / top_k * (0.998 - 0.97))[:, None]
    L = np.empty((num_neurons, P.shape[1]), np.float32)
    for k in range(num_neurons):
      idx = np.argsort(-activations[:, k], kind="stable")[:top_k]
      if name == "soft_wpmi":
        L[k] = np.log(1 + membership * (probs[idx] - 1) + 1e-7).sum(axis=0)
      else:
        L[k] = np.log(probs[idx] + 1e-7).sum(axis=0)
    m = L.max(axis=0)
    prior = m + np.log(np.exp(L - m).sum(axis=0)) - np.log(num_neurons)
    return L - lam * prior
  if name == "cos_similarity":
    Pn = P / np.linalg.norm(P, axis=0, keepdims=True)
    out = np.empty((num_neurons, P.shape[1]), np.float32)
    for k in range(num_neurons):
      column = activations[:, k] / max(np.linalg.norm(activations[:, k]), 1e-12)
      out[k] = column @ Pn
    return out
  raise ValueError(name)


def torch_baseline(name, images, texts, activations):
  """(Soft-)WPMI as the official PyTorch code computes it, one neuron at a time."""
  import math  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  defaults = registry.SIMILARITY[name].defaults
  with torch.no_grad():
    image_t = torch.nn.functional.normalize(torch.from_numpy(images), dim=1)
    text_t = torch.nn.functional.normalize(torch.from_numpy(texts), dim=1)
    probs = torch.softmax(defaults["a"] * (image_t @ text_t.T), dim=1)
    top_k = defaults["top_k"]
    top = torch.topk(torch.from_numpy(activations), k=top_k, dim=0).indices  # (top_k, K)
    if name == "soft_wpmi":
      ranks = torch.arange(top_k, dtype=torch.float32)
      membership = (defaults["p_start"] - ranks / top_k * (
          defaults["p_start"] - defaults["p_end"])).unsqueeze(1)
    rows = []
    for k in range(activations.shape[1]):
      selected = probs[top[:, k]]
      terms = 1 + membership * (selected - 1) if name == "soft_wpmi" else selected
      rows.append(torch.log(terms + defaults["min_prob"]).sum(dim=0))
    L = torch.stack(rows)
    prior = torch.logsumexp(L, dim=0) - math.log(L.shape[0])
    return (L - defaults["lam"] * prior).numpy()


def torch_available() -> bool:
  import importlib.util  # pylint: disable=g-import-not-at-top
  return importlib.util.find_spec("torch") is not None


def _measure(kind, name, size, queue):
  import jax  # pylint: disable=g-import-not-at-top
  from jaxdissect import labeling, similarity, streaming  # pylint: disable=g-import-not-at-top
  images, texts, activations = make_inputs(*size)
  if kind == "numpy":
    start = time.perf_counter()
    scores = numpy_baseline(name, images, texts, activations)
  elif kind == "torch":
    start = time.perf_counter()
    scores = torch_baseline(name, images, texts, activations)
  else:
    def ours():
      if kind == "streaming":
        return streaming.FUNCTIONS[name](images, texts, activations)
      if kind == "streaming_bf16":
        return streaming.FUNCTIONS[name](images, texts, activations,
                                         compute_dtype="bfloat16", kernel="jnp")
      if kind == "streaming_pallas":
        return streaming.FUNCTIONS[name](images, texts, activations, kernel="pallas")
      P = labeling.concept_activation(images, texts)
      return similarity.SIMILARITY_FUNCTIONS[name](P, activations)
    jax.block_until_ready(ours())  # compile
    start = time.perf_counter()
    scores = np.asarray(jax.block_until_ready(ours()))
  seconds = time.perf_counter() - start
  peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  queue.put({"seconds": seconds, "peak_rss_gb": peak_gb,
             "labels": np.asarray(scores).argmax(axis=1).tolist()})


def measure(kind, name, size):
  ctx = multiprocessing.get_context("spawn")
  queue = ctx.Queue()
  proc = ctx.Process(target=_measure, args=(kind, name, size, queue))
  proc.start()
  result = queue.get()
  proc.join()
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default=DEFAULT_SIZES)
  parser.add_argument("--functions", default="soft_wpmi,wpmi,cos_similarity")
  parser.add_argument("--out", default=None)
  parser.add_argument("--kernels", action="store_true",
                      help="also time streaming (soft-)WPMI through the Pallas kernel")
  args = parser.parse_args(argv)
  records = []
  header = (f"{'function':<16} {'images':>7} {'concepts':>8} {'neurons':>7} "
            f"{'ours s':>8} {'stream s':>8} {'numpy s':>8} {'speedup':>8} {'stream x':>8} "
            f"{'ours GB':>8} {'stream GB':>9} {'numpy GB':>8} {'agree':>6} "
            f"{'bf16 s':>7} {'bf16 agree':>10} {'pallas s':>8} {'torch s':>8} "
            f"{'vs torch':>8} {'torch GB':>8}")
  print(header, flush=True)
  for size_text in args.sizes.split(","):
    size = tuple(int(x) for x in size_text.split("x"))
    for name in args.functions.split(","):
      ours = measure("ours", name, size)
      stream = measure("streaming", name, size)
      baseline = measure("numpy", name, size)
      agree = float(np.mean(np.asarray(ours["labels"]) == np.asarray(baseline["labels"])))
      bf16 = pallas = official = None
      if name in registry.PRIOR_FUNCTIONS and torch_available():
        official = measure("torch", name, size)
        official["agreement"] = float(np.mean(np.asarray(ours["labels"]) ==
                                              np.asarray(official["labels"])))
      elif name in registry.PRIOR_FUNCTIONS:
        print("(torch not installed: the official-algorithm baseline is skipped)")
      if name in registry.PRIOR_FUNCTIONS:
        bf16 = measure("streaming_bf16", name, size)
        bf16["agreement"] = float(np.mean(np.asarray(bf16["labels"]) ==
                                          np.asarray(stream["labels"])))
        if args.kernels:
          pallas = measure("streaming_pallas", name, size)
      record = {"function": name, "images": size[0], "concepts": size[1],
                "neurons": size[2], "ours_seconds": ours["seconds"],
                "streaming_seconds": stream["seconds"],
                "numpy_seconds": baseline["seconds"],
                "speedup": baseline["seconds"] / ours["seconds"],
                "streaming_speedup": baseline["seconds"] / stream["seconds"],
                "ours_peak_rss_gb": ours["peak_rss_gb"],
                "streaming_peak_rss_gb": stream["peak_rss_gb"],
                "numpy_peak_rss_gb": baseline["peak_rss_gb"],
                "label_agreement": agree,
                "bf16_streaming_seconds": bf16 and bf16["seconds"],
                "bf16_label_agreement_with_f32": bf16 and bf16["agreement"],
                "pallas_streaming_seconds": pallas and pallas["seconds"],
                "torch_seconds": official and official["seconds"],
                "speedup_vs_torch": official and official["seconds"] / ours["seconds"],
                "streaming_speedup_vs_torch": official and (official["seconds"]
                                                            / stream["seconds"]),
                "torch_peak_rss_gb": official and official["peak_rss_gb"],
                "label_agreement_with_torch": official and official["agreement"]}
      records.append(record)
      print(f"{name:<16} {size[0]:>7} {size[1]:>8} {size[2]:>7} "
            f"{ours['seconds']:>8.2f} {stream['seconds']:>8.2f} {baseline['seconds']:>8.2f} "
            f"{record['speedup']:>7.1f}x {record['streaming_speedup']:>7.1f}x "
            f"{ours['peak_rss_gb']:>8.2f} "
            f"{stream['peak_rss_gb']:>9.2f} {baseline['peak_rss_gb']:>8.2f} {agree:>6.3f} "
            f"{_fmt(bf16 and bf16['seconds'], 7)} {_fmt(bf16 and bf16['agreement'], 10, 3)} "
            f"{_fmt(pallas and pallas['seconds'], 8)} "
            f"{_fmt(official and official['seconds'], 8)} "
            f"{_fmt(record['speedup_vs_torch'], 7)}x "
            f"{_fmt(official and official['peak_rss_gb'], 8)}", flush=True)
  if args.out:
    common.write_json(args.out, {"device": common.device_info(), "records": records})


def _fmt(value, width, digits=2):
  return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


if __name__ == "__main__":
  main()

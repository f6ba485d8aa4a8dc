"""Similarity functions against the loops users would otherwise run, in the same run.

    python benchmarks/similarity_bench.py --out benchmarks/results/similarity_bench.json \
        [--sizes 10000x20000x256,50000x20000x2048] [--functions soft_wpmi,wpmi]

For each size (images x concepts x neurons) and function, every measurement in its own
process (peak RSS per measurement):
  - ours: similarity.<function>(P, activations) on P already in memory, jitted, best
    of 3 after a compiling call on the same shapes;
  - streaming: streaming.<function>(image embeddings, text embeddings, activations),
    which never holds P (it recomputes P's blocks), best of 3 likewise;
  - streaming_shared, for (soft-)WPMI: one layer streamed with each image's softmax
    normaliser over the concepts, which main.py computes once per run
    (streaming.RowNormalisers), already held (computed outside the timer) and, as in a
    run with label stability, reused (so the blocked plan is taken), best of 3. A run
    now streams all its layers in one pass over the concepts, sharing each block's P
    rows too (streaming.layers_log_likelihood): layers_bench.py times whole runs;
  - with_P: what a one-layer main.py run does when it holds P, from the same
    embeddings as streaming: P = labeling.concept_activation(images, texts), then
    ours on it, both inside the timer, best of 3 (stream/with_P is the choice a user
    makes with concept_matrix_max_gb; a run of several layers builds P once);
  - torch, for (soft-)WPMI: the official tool's algorithm as a PyTorch loop on the same
    P (float32, no autograd, torch threads = cores; softmax over concepts once, top-k of
    the activations, then per neuron a gather of its top rows, log and sum, and the
    prior), written from the paper's formulas the way the authors' loop computes them
    (torch.gather with an expanded index), one call, its process started with glibc
    malloc settings that let the loop reuse its temporaries (TORCH_MALLOC_ENV);
    skipped with a note where torch is not installed;
  - torch_index: the same loop reading the rows as probs[top[:, k]], usually faster
    than the authors' gather (a stricter bar), one call;
  - numpy: the same per-neuron loop in NumPy on the same P, one call;
  - stability, with --stability, for (soft-)WPMI: the label stability of every neuron
    (stability.py, 20 bootstrap resamples, trust_bootstrap's default) from the
    embeddings and each neuron's top images, one call after a compiling call;
    stability/ours is what it adds to a run's similarity time; and the same with
    the normalisers already held, as in a run, where the layers' similarity computed
    them (stability+);
  - explanations, with --explanations (once per size, after the first function): the
    linear explanations of every neuron (explanations.py: 5 concepts, 25% held out,
    the moments pass, the fit, the simulations and the explained test), and the same
    with the compositional labels (beam 6, AND / OR, no prompts), one call each after
    a compiling call, and the explanations with their selection shares over 20
    bootstrap resamples (trust_bootstrap's default); /ours is what they add to a run's
    similarity time;
  - visibility, with --explanations (once per size): which concepts the probe shows
    (visibility.py: each image's top max(5, 1% of the concepts) by CLIP similarity, a
    matmul and a top-k per block of images, once per run, not per layer), one call after
    a compiling call;
  - copy: a plain copy of P into a buffer already in memory (NumPy), best of 3. It moves
    2 x images x concepts x 4 bytes, as many as ours reads (P twice: the softmax
    normalisers, then the blocks), so copy / ours is how close ours runs to the memory
    floor.
For (soft-)WPMI also streaming with bfloat16 products (float32 accumulation): its time
and its label agreement with float32 streaming; with --kernels, streaming through the
fused Pallas kernel (kernels.py; only meaningful on a GPU or TPU, the CPU interprets it).
A measurement whose process dies (out of memory) is reported with its exit code and
leaves its columns empty. Inputs are random CLIP-like embeddings (dim 64, or D with a
size written NxMxKxD: CLIP ViT-B's 512 makes each recomputed P row 8x the FLOPs) and ReLU
activations, seeded; P is computed from them outside every timer except with_P's, and
only in the processes of the measurements that take P (so the streaming processes' peak
memory is their own).
cos_similarity's NumPy baseline reads all of P once per neuron: at 50000x20000x2048 that
is over 10 minutes, so BENCHMARKS.md runs that size with --functions soft_wpmi,wpmi.

    python benchmarks/similarity_bench.py --default-run 3 [--run-config configs/synthetic.py]

times instead what the label stability adds to whole runs at the default settings:
main.py on the config (the embedded synthetic default unless given), N times, each a
fresh process with an empty workdir and no compilation cache, compiles included, from
each run's config.json stage_seconds (similarity: every layer's scores and labels;
label_stability: all layers' 20 resamples).
"""
import argparse
import json
import multiprocessing
import os
import queue as queue_lib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import common
from jaxdissect import registry  # noqa: E402  (no JAX: the parent stays light)

EMBED_DIM = 64
DEFAULT_SIZES = "10000x20000x256,50000x20000x2048,20000x5000x512"


def make_inputs(num_images, num_concepts, num_neurons, dim=EMBED_DIM, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((num_images, dim)).astype(np.float32)
  texts = rng.standard_normal((num_concepts, dim)).astype(np.float32)
  activations = np.maximum(rng.standard_normal((num_images, num_neurons)), 0).astype(
      np.float32)
  return images, texts, activations


def numpy_concept_activation(images, texts):
  images = images / np.linalg.norm(images, axis=1, keepdims=True)
  texts = texts / np.linalg.norm(texts, axis=1, keepdims=True)
  return images @ texts.T


def numpy_baseline(name, P, activations):
  """One neuron at a time, as the official code loops: (num_neurons, num_concepts)."""
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


def torch_baseline(name, P, activations, rows="gather"):
  """(Soft-)WPMI as the official PyTorch code computes it, one neuron at a time.

  rows "gather": each neuron's top rows read as the authors' loop reads them,
  probs.gather(0, top[:, k:k+1].expand(-1, concepts)) (an int64 index per element);
  "index": probs[top[:, k]], the same rows read faster in most runs (1.3-1.5x for
  soft-WPMI at 10k x 20k x 256 on 2 cores, one-off), kept as a stricter bar.
  """
  import math  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  defaults = registry.SIMILARITY[name].defaults
  with torch.no_grad():
    probs = torch.softmax(defaults["a"] * torch.from_numpy(P), dim=1)
    top_k = defaults["top_k"]
    top = torch.topk(torch.from_numpy(activations), k=top_k, dim=0).indices  # (top_k, K)
    if name == "soft_wpmi":
      ranks = torch.arange(top_k, dtype=torch.float32)
      membership = (defaults["p_start"] - ranks / top_k * (
          defaults["p_start"] - defaults["p_end"])).unsqueeze(1)
    out = []
    for k in range(activations.shape[1]):
      if rows == "gather":
        selected = probs.gather(0, top[:, k:k + 1].expand(-1, probs.shape[1]))
      else:
        selected = probs[top[:, k]]
      terms = 1 + membership * (selected - 1) if name == "soft_wpmi" else selected
      out.append(torch.sum(torch.log(terms + defaults["min_prob"]), dim=0, keepdim=True))
    L = torch.cat(out)
    prior = torch.logsumexp(L, dim=0) - math.log(L.shape[0])
    return (L - defaults["lam"] * prior).numpy()


def torch_available() -> bool:
  import importlib.util  # pylint: disable=g-import-not-at-top
  return importlib.util.find_spec("torch") is not None


def _best_of(repeats, fn):
  best, result = float("inf"), None
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    best = min(best, time.perf_counter() - start)
  return best, result


def _measure(kind, name, size, queue):
  import jax  # pylint: disable=g-import-not-at-top
  from jaxdissect import labeling, similarity, streaming  # pylint: disable=g-import-not-at-top
  images, texts, activations = make_inputs(*size)
  # Only the measurements on P get it: a P made and dropped would still be in the
  # others' peak memory (ru_maxrss), 4 GB at 50k x 20k.
  P = (numpy_concept_activation(images, texts)
       if kind in ("ours", "numpy", "torch", "torch_index") else None)
  extra = {}
  if kind == "numpy":
    seconds, scores = _best_of(1, lambda: numpy_baseline(name, P, activations))
  elif kind in ("torch", "torch_index"):
    rows = "gather" if kind == "torch" else "index"
    # Torch's one-time start-up (thread pool, kernels) is not the loop's cost.
    small = make_inputs(200, 50, 4)
    torch_baseline(name, numpy_concept_activation(*small[:2]), small[2], rows)
    seconds, scores = _best_of(1, lambda: torch_baseline(name, P, activations, rows))
  elif kind in ("explanations", "compositional", "selection"):
    from jaxdissect import explanations  # pylint: disable=g-import-not-at-top
    from jaxdissect import stability  # pylint: disable=g-import-not-at-top
    del P
    names = [f"concept {i}" for i in range(len(texts))]
    labels = np.zeros(activations.shape[1], np.int64)
    usable = np.ones(activations.shape[1], bool)
    beam = 6 if kind == "compositional" else 0
    weights = (stability.poisson_weights(len(images), 20, 0) if kind == "selection"
               else None)

    def explain():
      return explanations.layer_explanations(activations, images, texts, labels, usable,
                                             concepts=names, beam=beam, weights=weights)

    explain()  # compile
    seconds, result = _best_of(1, explain)
    scores = np.eye(activations.shape[1], 1)  # no labels of its own
    extra["mean_simulation"] = float(np.nanmean(result.simulation))
  elif kind == "visibility":
    from jaxdissect import visibility  # pylint: disable=g-import-not-at-top
    del P
    visibility.concept_visibility(images, texts)  # compile
    seconds, result = _best_of(1, lambda: visibility.concept_visibility(images, texts))
    scores = np.eye(activations.shape[1], 1)  # no labels of its own
    extra["visible_concepts"] = int(result.visible.sum())
  elif kind in ("stability", "stability_shared"):
    from jaxdissect import stability, topk  # pylint: disable=g-import-not-at-top
    del P
    depth = stability.depth(name)
    top_rows = topk.from_activations(activations, depth).ids[:depth].T.astype(np.int64)
    usable = np.ones(activations.shape[1], bool)
    normalisers = (_held_normalisers(streaming, name, images, texts)
                   if kind == "stability_shared" else None)

    def resampled():
      return stability.layer_stability(name, images, texts, top_rows, usable,
                                       row_normalisers=normalisers)

    resampled()  # compile
    seconds, result = _best_of(1, resampled)
    scores = np.eye(activations.shape[1], 1)  # no labels of its own
    extra["mean_stability"] = float(np.mean(result.stability))
  else:
    P_device = jax.device_put(P) if kind == "ours" else None
    del P
    normalisers = (_held_normalisers(streaming, name, images, texts)
                   if kind == "streaming_shared" else None)

    def ours():
      if kind in ("streaming", "streaming_shared"):
        out = streaming.FUNCTIONS[name](images, texts, activations,
                                        row_normalisers=normalisers)
      elif kind == "streaming_bf16":
        out = streaming.FUNCTIONS[name](images, texts, activations,
                                        compute_dtype="bfloat16", kernel="jnp")
      elif kind == "streaming_pallas":
        out = streaming.FUNCTIONS[name](images, texts, activations, kernel="pallas")
      elif kind == "with_P":
        out = similarity.SIMILARITY_FUNCTIONS[name](
            labeling.concept_activation(images, texts), activations)
      else:
        out = similarity.SIMILARITY_FUNCTIONS[name](P_device, activations)
      return np.asarray(jax.block_until_ready(out))

    ours()  # compile
    seconds, scores = _best_of(3, ours)
    if kind == "ours":
      source = np.asarray(P_device)
      target = np.ones_like(source)  # in memory before the copy: no page faults timed
      extra["copy_seconds"], _ = _best_of(3, lambda: np.copyto(target, source))
  peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  queue.put({"seconds": seconds, "peak_rss_gb": peak_gb,
             "labels": np.asarray(scores).argmax(axis=1).tolist(), **extra})


def _held_normalisers(streaming, name, images, texts):
  """A RowNormalisers holding every image's normaliser at the function's a, as a run
  with label stability (the default) holds them after its first layer."""
  normalisers = streaming.RowNormalisers(images, texts, reused=True)
  normalisers.at(np.arange(len(images)), registry.SIMILARITY[name].defaults["a"])
  return normalisers


# glibc malloc settings of the torch loops' processes. With the defaults, the loop's
# per-unit temporaries (three 8 MB tensors at 20k concepts) moved to fresh pages at
# every unit in most runs at 50k x 20k x 2048: the process grew by about 6 MB per unit
# to 24 GB and was killed, and the same loop's time varied 3x between runs (WPMI 6.8 s
# in one, 21.8 s in another). A fixed mmap threshold of 32 MB keeps those
# temporaries on the heap and a high trim threshold keeps the heap, so they are
# reused: the baseline at its best, not slowed by page faults.
TORCH_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
                    "MALLOC_TRIM_THRESHOLD_": str(8 * 2**30)}


def measure(kind, name, size):
  """One measurement in a fresh process: its record, or None when the process died
  before reporting (a note names it and its exit code; -9 is usually the kernel's OOM
  killer). Waiting on the queue alone would hang for ever on a killed process."""
  print(f"# {kind} {name} {'x'.join(map(str, size))} ...", file=sys.stderr, flush=True)
  ctx = multiprocessing.get_context("spawn")
  queue = ctx.Queue()
  proc = ctx.Process(target=_measure, args=(kind, name, size, queue))
  saved = dict(os.environ)
  if kind.startswith("torch"):
    os.environ.update(TORCH_MALLOC_ENV)  # the spawned process starts with these
  try:
    proc.start()
  finally:
    os.environ.clear()
    os.environ.update(saved)
  while True:
    try:
      result = queue.get(timeout=5)
      break
    except queue_lib.Empty:
      if not proc.is_alive():
        proc.join()
        print(f"(the {kind} measurement of {name} at {'x'.join(map(str, size))} died with "
              f"exit code {proc.exitcode} before reporting"
              f"{': killed, most likely out of memory' if proc.exitcode == -9 else ''}; "
              f"its columns stay empty)", flush=True)
        return None
  proc.join()
  return result


COLUMNS = (  # (header, record key, width, digits)
    ("function", "function", 16, None), ("images", "images", 7, None),
    ("concepts", "concepts", 8, None), ("neurons", "neurons", 7, None),
    ("ours s", "ours_seconds", 7, 2), ("stream s", "streaming_seconds", 8, 2),
    ("torch s", "torch_seconds", 7, 2), ("numpy s", "numpy_seconds", 7, 2),
    ("vs torch", "speedup_vs_torch", 8, 1), ("stream vs torch", "streaming_speedup_vs_torch",
                                             15, 1),
    ("torch idx s", "torch_index_seconds", 11, 2),
    ("vs torch idx", "speedup_vs_torch_index", 12, 1),
    ("vs numpy", "speedup_vs_numpy", 8, 1), ("stream/ours", "streaming_over_ours", 11, 2),
    ("stream+ s", "streaming_shared_seconds", 9, 2),
    ("stream+/ours", "streaming_shared_over_ours", 12, 2),
    ("with P s", "with_P_seconds", 8, 2), ("stream/with P", "streaming_over_with_P", 13, 2),
    ("copy/ours", "memory_floor_fraction", 9, 2), ("ours GB", "ours_peak_rss_gb", 7, 2),
    ("stream GB", "streaming_peak_rss_gb", 9, 2), ("torch GB", "torch_peak_rss_gb", 8, 2),
    ("agree torch", "label_agreement_with_torch", 11, 3),
    ("agree numpy", "label_agreement_with_numpy", 11, 3), ("bf16 s", "bf16_streaming_seconds", 6, 2),
    ("bf16 agree", "bf16_label_agreement_with_f32", 10, 3),
    ("pallas s", "pallas_streaming_seconds", 8, 2),
    ("stability s", "stability_seconds", 11, 2),
    ("stability/ours", "stability_over_ours", 14, 2),
    ("stability+/ours", "stability_shared_over_ours", 15, 2),
    ("explain s", "explanations_seconds", 9, 2),
    ("explain/ours", "explanations_over_ours", 12, 2),
    ("+compose s", "compositional_seconds", 10, 2),
    ("+compose/ours", "compositional_over_ours", 13, 2),
    ("+shares s", "selection_seconds", 9, 2),
    ("+shares/ours", "selection_over_ours", 12, 2),
    ("visible s", "visibility_seconds", 9, 2),
    ("visible/ours", "visibility_over_ours", 12, 2))


def _agreement(a, b):
  return float(np.mean(np.asarray(a["labels"]) == np.asarray(b["labels"])))


def _against(kind, baseline, ours, stream):
  """A baseline's record fields: its time and memory, ratios, label agreement (none
  when its measurement died)."""
  if baseline is None:
    return {f"{kind}_failed": True}
  return {f"{kind}_seconds": baseline["seconds"],
          f"speedup_vs_{kind}": baseline["seconds"] / ours["seconds"],
          f"streaming_speedup_vs_{kind}": baseline["seconds"] / stream["seconds"],
          f"{kind}_peak_rss_gb": baseline["peak_rss_gb"],
          f"label_agreement_with_{kind}": _agreement(ours, baseline)}


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_runs(num_runs: int, config: str) -> list[dict]:
  """Runs main.py on `config` num_runs times, each a fresh process with an empty workdir
  and no compilation cache (what a first run costs), and returns each run's
  config.json stage_seconds (similarity: scores and labels of every layer;
  label_stability: its resamples, compiles included)."""
  records = []
  for run in range(num_runs):
    with tempfile.TemporaryDirectory() as workdir:
      started = time.perf_counter()
      proc = subprocess.run(
          [sys.executable, os.path.join(REPO, "main.py"), "--config", config,
           "--workdir", workdir, "--config.compilation_cache_dir=none"],
          capture_output=True, text=True, cwd=REPO, check=False)
      if proc.returncode != 0:
        raise SystemExit(f"main.py --config {config} failed:\n{proc.stderr[-3000:]}")
      with open(os.path.join(workdir, "results", "config.json"), encoding="utf-8") as f:
        seconds = json.load(f)["stage_seconds"]
    record = {"run": run, "wall_seconds": time.perf_counter() - started, **seconds,
              "stability_over_similarity": seconds["label_stability"] / seconds["similarity"]}
    print(f"run {run}: similarity {seconds['similarity']:.2f} s, label stability "
          f"{seconds['label_stability']:.2f} s, stability / similarity "
          f"{record['stability_over_similarity']:.2f}, whole run "
          f"{record['wall_seconds']:.1f} s", flush=True)
    records.append(record)
  ratios = [r["stability_over_similarity"] for r in records]
  print(f"median stability / similarity over {num_runs} run(s): "
        f"{statistics.median(ratios):.2f}")
  return records


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default=DEFAULT_SIZES)
  parser.add_argument("--functions", default="soft_wpmi,wpmi,cos_similarity")
  parser.add_argument("--out", default=None)
  parser.add_argument("--kernels", action="store_true",
                      help="also time streaming (soft-)WPMI through the Pallas kernel")
  parser.add_argument("--no-numpy", action="store_true",
                      help="skip the NumPy loop (the slowest baseline)")
  parser.add_argument("--no-torch", action="store_true",
                      help="skip the PyTorch loop")
  parser.add_argument("--stability", action="store_true",
                      help="also time the label stability (20 resamples) of (soft-)WPMI")
  parser.add_argument("--explanations", action="store_true",
                      help="also time the linear explanations and compositional labels")
  parser.add_argument("--default-run", type=int, default=0, metavar="N",
                      help="instead: N whole main.py runs of --run-config, the "
                      "similarity and label stability stages' seconds of each")
  parser.add_argument("--run-config", default=os.path.join(REPO, "configs", "synthetic.py"))
  args = parser.parse_args(argv)
  if args.default_run:
    records = default_runs(args.default_run, args.run_config)
    if args.out:
      common.write_json(args.out, {"device": common.device_info(), "config": args.run_config,
                                   "runs": records})
    return
  records = []
  print(" ".join(f"{h:>{w}}" for h, _, w, _ in COLUMNS), flush=True)
  for size_text in args.sizes.split(","):
    size = tuple(int(x) for x in size_text.split("x"))
    for index, name in enumerate(args.functions.split(",")):
      ours = measure("ours", name, size)
      stream = measure("streaming", name, size)
      if ours is None or stream is None:
        continue  # every ratio needs both
      record = {"function": name, "images": size[0], "concepts": size[1],
                "neurons": size[2], "dim": size[3] if len(size) > 3 else EMBED_DIM,
                "ours_seconds": ours["seconds"],
                "streaming_seconds": stream["seconds"],
                "streaming_over_ours": stream["seconds"] / ours["seconds"],
                "copy_seconds": ours["copy_seconds"],
                "memory_floor_fraction": ours["copy_seconds"] / ours["seconds"],
                "ours_peak_rss_gb": ours["peak_rss_gb"],
                "streaming_peak_rss_gb": stream["peak_rss_gb"]}
      with_p = measure("with_P", name, size)
      if with_p is not None:
        record.update(with_P_seconds=with_p["seconds"],
                      streaming_over_with_P=stream["seconds"] / with_p["seconds"],
                      with_P_peak_rss_gb=with_p["peak_rss_gb"],
                      with_P_label_agreement=_agreement(with_p, ours))
      if not args.no_numpy:
        record.update(_against("numpy", measure("numpy", name, size), ours, stream))
      if args.no_torch:
        pass
      elif name in registry.PRIOR_FUNCTIONS and torch_available():
        record.update(_against("torch", measure("torch", name, size), ours, stream))
        record.update(_against("torch_index", measure("torch_index", name, size), ours,
                               stream))
      elif name in registry.PRIOR_FUNCTIONS:
        print("(torch not installed: the official-algorithm baseline is skipped)")
      if name in registry.PRIOR_FUNCTIONS:
        shared = measure("streaming_shared", name, size)
        if shared is not None:
          record.update(streaming_shared_seconds=shared["seconds"],
                        streaming_shared_over_ours=shared["seconds"] / ours["seconds"],
                        streaming_shared_label_agreement=_agreement(shared, stream))
        bf16 = measure("streaming_bf16", name, size)
        if bf16 is not None:
          record.update(bf16_streaming_seconds=bf16["seconds"],
                        bf16_label_agreement_with_f32=_agreement(bf16, stream))
        pallas = measure("streaming_pallas", name, size) if args.kernels else None
        if pallas is not None:
          record["pallas_streaming_seconds"] = pallas["seconds"]
        resampled = measure("stability", name, size) if args.stability else None
        if resampled is not None:
          record.update(stability_seconds=resampled["seconds"],
                        stability_over_ours=resampled["seconds"] / ours["seconds"],
                        stability_peak_rss_gb=resampled["peak_rss_gb"],
                        mean_stability=resampled["mean_stability"])
        resampled = measure("stability_shared", name, size) if args.stability else None
        if resampled is not None:
          record.update(stability_shared_seconds=resampled["seconds"],
                        stability_shared_over_ours=resampled["seconds"] / ours["seconds"],
                        mean_stability_shared=resampled["mean_stability"])
      for kind in (("explanations", "compositional", "selection", "visibility")
                   if args.explanations and index == 0 else ()):
        timed = measure(kind, name, size)
        if timed is not None:
          record.update({f"{kind}_seconds": timed["seconds"],
                         f"{kind}_over_ours": timed["seconds"] / ours["seconds"],
                         f"{kind}_peak_rss_gb": timed["peak_rss_gb"]})
      records.append(record)
      print(" ".join(_fmt(record.get(key), width, digits)
                     for _, key, width, digits in COLUMNS), flush=True)
  if args.out:
    common.write_json(args.out, {"device": common.device_info(), "records": records})


def _fmt(value, width, digits=2):
  if value is None:
    return f"{'-':>{width}}"
  if digits is None:
    return f"{value:>{width}}"
  return f"{value:>{width}.{digits}f}"


if __name__ == "__main__":
  main()

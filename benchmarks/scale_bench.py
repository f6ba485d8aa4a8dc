"""soft_wpmi over a million probe images in bounded memory.

    python benchmarks/scale_bench.py --out benchmarks/results/scale_bench.json \
        [--sizes 100000,300000,1000000] [--concepts 20000] [--neurons 512]

Per size, in its own process (so peak RSS is that size's alone), the path main.py takes
for a large probe set:
  1. a simulated probe pass in chunks of 65,536 images: CLIP-like image embeddings
     (dim 512) written to a memory-mapped .npy (as the activation store holds them),
     and the activations of 512 neurons folded into the running top-k in-graph
     (topk.update_state) and then dropped;
  2. streaming soft_wpmi from the running top-k: only the top images' embedding rows
     are read from the memmap, and rows of softmax(a P) are computed on demand.
Neuron k responds to images close to concept c_k, so the labels mean something: the
record holds the fraction of neurons labelled c_k ("planted") and the sha256 of the
label vector. At the smallest size the labels are also
checked against the in-memory similarity.soft_wpmi(P, A) (P held whole, in another
process). Peak RSS is the process's ru_maxrss.
"""
import argparse
import hashlib
import multiprocessing
import os
import resource
import tempfile
import time

import numpy as np

import common

EMBED_DIM = 512
CHUNK = 65536


def _planted(num_concepts, num_neurons, seed):
  rng = np.random.default_rng(seed)
  texts = rng.standard_normal((num_concepts, EMBED_DIM)).astype(np.float32)
  preferred = rng.choice(num_concepts, num_neurons, replace=False)
  weights = (texts[preferred] + 0.5 * rng.standard_normal(
      (num_neurons, EMBED_DIM)).astype(np.float32)).T  # (dim, neurons)
  return texts, weights, preferred


def _chunk(start, stop, seed):
  """Image embeddings of images start..stop-1 (each chunk seeded)."""
  rng = np.random.default_rng([seed, start])
  images = rng.standard_normal((stop - start, EMBED_DIM)).astype(np.float32)
  return images


def _streaming(num_images, num_concepts, num_neurons, seed, workdir, queue):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxdissect import streaming, topk  # pylint: disable=g-import-not-at-top
  texts, weights, preferred = _planted(num_concepts, num_neurons, seed)
  update = jax.jit(topk.update_state, donate_argnums=0)
  project = jax.jit(lambda x, w: jnp.maximum(x @ w, 0.0))
  start_time = time.perf_counter()
  path = os.path.join(workdir, "image_embeddings.npy")
  stored = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                     shape=(num_images, EMBED_DIM))
  state = topk.empty_state(topk.RUNNING_TOP_K, num_neurons)
  last_log = start_time
  for start in range(0, num_images, CHUNK):
    stop = min(start + CHUNK, num_images)
    images = _chunk(start, stop, seed)
    stored[start:stop] = images
    pad = CHUNK - (stop - start)  # fixed shapes: one compilation
    padded = np.concatenate([images, np.zeros((pad, EMBED_DIM), np.float32)])
    activations = project(padded, weights)
    state = update(state, activations, jnp.arange(start, start + CHUNK, dtype=jnp.int32),
                   jnp.arange(CHUNK) < stop - start)
    if time.perf_counter() - last_log > 10:
      last_log = time.perf_counter()
      print(f"  probe pass: {stop}/{num_images} images", flush=True)
  stored.flush()
  del stored
  running = topk.from_state(state)
  probe_seconds = time.perf_counter() - start_time
  embeddings = np.load(path, mmap_mode="r")
  scores = streaming.soft_wpmi(embeddings, texts, None, top_images=running.ids.T)
  labels = np.asarray(scores).argmax(axis=1)
  seconds = time.perf_counter() - start_time
  queue.put({"seconds": seconds, "probe_seconds": probe_seconds,
             "similarity_seconds": seconds - probe_seconds,
             "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
             "labels": labels.tolist(),
             "planted_accuracy": float(np.mean(labels == preferred))})


def _in_memory(num_images, num_concepts, num_neurons, seed, queue):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxdissect import labeling, similarity  # pylint: disable=g-import-not-at-top
  texts, weights, _ = _planted(num_concepts, num_neurons, seed)
  images = np.concatenate([_chunk(s, min(s + CHUNK, num_images), seed)
                           for s in range(0, num_images, CHUNK)])
  activations = np.maximum(np.asarray(jnp.asarray(images) @ jnp.asarray(weights)), 0.0)
  start = time.perf_counter()
  concept_activation = labeling.concept_activation(images, texts)
  del images
  scores = similarity.soft_wpmi(concept_activation, activations)
  labels = np.asarray(scores).argmax(axis=1)
  queue.put({"seconds": time.perf_counter() - start,
             "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
             "labels": labels.tolist()})


def _in_process(target, *args):
  ctx = multiprocessing.get_context("spawn")
  queue = ctx.Queue()
  proc = ctx.Process(target=target, args=(*args, queue))
  proc.start()
  proc.join()
  if proc.exitcode != 0:
    return {"error": f"exit code {proc.exitcode} (killed for memory?)"}
  return queue.get()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default="100000,300000,1000000")
  parser.add_argument("--concepts", type=int, default=20000)
  parser.add_argument("--neurons", type=int, default=512)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no_check", action="store_true",
                      help="skip the in-memory check at the smallest size")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  sizes = [int(x) for x in args.sizes.split(",")]
  records = []
  print(f"{'images':>9} {'concepts':>8} {'neurons':>7} {'seconds':>8} {'probe s':>8} "
        f"{'sim s':>7} {'peak GB':>8} {'planted':>7}  {'labels sha256':<16} check", flush=True)
  for size in sizes:
    with tempfile.TemporaryDirectory() as workdir:
      result = _in_process(_streaming, size, args.concepts, args.neurons, args.seed,
                           workdir)
    if "error" in result:
      raise SystemExit(f"{size} images: {result['error']}")
    labels = np.asarray(result["labels"], np.int64)
    record = {"images": size, "concepts": args.concepts, "neurons": args.neurons,
              "seconds": result["seconds"], "probe_seconds": result["probe_seconds"],
              "similarity_seconds": result["similarity_seconds"],
              "peak_rss_gb": result["peak_rss_gb"],
              "planted_accuracy": result["planted_accuracy"],
              "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest()}
    check = ""
    if size == min(sizes) and not args.no_check:
      reference = _in_process(_in_memory, size, args.concepts, args.neurons, args.seed)
      if "error" in reference:
        record["in_memory_check"] = reference["error"]
        check = reference["error"]
      else:
        agreement = float(np.mean(np.asarray(reference["labels"]) == labels))
        record.update(in_memory_label_agreement=agreement,
                      in_memory_seconds=reference["seconds"],
                      in_memory_peak_rss_gb=reference["peak_rss_gb"])
        check = (f"labels equal the in-memory soft_wpmi's: {agreement:.4f} "
                 f"(in-memory: {reference['seconds']:.1f} s, "
                 f"{reference['peak_rss_gb']:.1f} GB)")
    records.append(record)
    print(f"{size:>9} {args.concepts:>8} {args.neurons:>7} {record['seconds']:>8.1f} "
          f"{record['probe_seconds']:>8.1f} {record['similarity_seconds']:>7.1f} "
          f"{record['peak_rss_gb']:>8.2f} {record['planted_accuracy']:>7.3f}  "
          f"{record['labels_sha256'][:16]} {check}",
          flush=True)
  if args.out:
    common.write_json(args.out, {"device": common.device_info(), "records": records})


if __name__ == "__main__":
  main()

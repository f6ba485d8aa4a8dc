"""Probe-pass throughput with models of real size, and the similarity for all of
ResNet-50's conv1..layer4 units.

    python benchmarks/pipeline_bench.py --out benchmarks/results/pipeline_bench.json \
        [--num_images 64] [--batch_size 32] [--concepts 20000] [--sim_images 50000]

Models: ResNet-50 (transformers' ResNetConfig defaults) as the target and CLIP
ViT-B/16 (CLIPConfig with patch 16) as CLIP, random weights, saved with
save_pretrained and loaded back through jaxdissect's loaders, as a user's would be.
Measured in one run:
  - step: images/s of the probe pass on pre-transformed in-memory batches (CLIP image
    embedding + ResNet-50 forward + pooling of conv1..layer4 + running top-k, jitted,
    prefetched to the device): the compute ceiling;
  - decode (when TensorFlow is installed): images/s of the tf.data input pipeline alone
    (JPEG decode + both transforms) over generated 320x256 JPEGs: the input ceiling;
  - full (when TensorFlow is installed): images/s of the probe pass fed by that
    pipeline, as main.py runs it;
  - similarity: streaming soft_wpmi for the 3,904 units of conv1..layer4 (one prior per
    layer) x `concepts` concepts, from each unit's running top-k over `sim_images`
    random embeddings (first call, compile included, and a second call);
  - the end-to-end estimate for 50,000 images: 50,000 / (full or step rate) + similarity.
It needs jax, flax, numpy, transformers 4.57.x and ml_collections, not TensorFlow: on a
GPU machine without TensorFlow, decode and full are skipped (images made in memory).
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

# Importable from a bare checkout (the GPU machine runs it without installing).
sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                os.path.dirname(os.path.abspath(__file__))]
import common  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

LAYERS = ("conv1", "layer1", "layer2", "layer3", "layer4")


def _log(message):
  print(message, file=sys.stderr, flush=True)


def build_models(directory):
  """ResNet-50 and CLIP ViT-B/16 with random weights, saved and loaded back."""
  import jax  # pylint: disable=g-import-not-at-top
  from transformers import (CLIPConfig, CLIPImageProcessor, ConvNextImageProcessor,  # pylint: disable=g-import-not-at-top
                            FlaxCLIPModel, FlaxResNetForImageClassification,
                            ResNetConfig)
  from jaxdissect import tiny_models  # pylint: disable=g-import-not-at-top
  from jaxdissect.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  from jaxdissect.models import targets  # pylint: disable=g-import-not-at-top
  resnet_dir, clip_dir = os.path.join(directory, "resnet50"), os.path.join(directory, "clip")
  start = time.perf_counter()
  resnet = FlaxResNetForImageClassification(ResNetConfig(), seed=0,
                                            input_shape=(1, 224, 224, 3))
  resnet.save_pretrained(resnet_dir)
  ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875, resample=2,
                         image_mean=[0.485, 0.456, 0.406],
                         image_std=[0.229, 0.224, 0.225]).save_pretrained(resnet_dir)
  del resnet
  clip = FlaxCLIPModel(CLIPConfig(vision_config={"patch_size": 16}), seed=0)
  clip.save_pretrained(clip_dir)
  del clip
  tiny_models.write_clip_tokenizer(clip_dir)
  CLIPImageProcessor(size={"shortest_edge": 224},
                     crop_size={"height": 224, "width": 224}).save_pretrained(clip_dir)
  target = targets.load_target(resnet_dir)
  clip = clip_lib.load_clip(clip_dir)
  _log(f"models built and loaded in {time.perf_counter() - start:.1f} s "
       f"({jax.default_backend()})")
  return target, clip


def memory_batches(num_images, batch_size, clip_size, target_size, seed=0):
  """Pre-transformed batches made in memory (no decoding): the compute ceiling."""
  rng = np.random.default_rng(seed)
  clip_pixels = rng.standard_normal((batch_size, *clip_size, 3)).astype(np.float32)
  target_pixels = rng.standard_normal((batch_size, *target_size, 3)).astype(np.float32)
  for start in range(0, num_images, batch_size):
    index = np.arange(start, start + batch_size)
    yield {"clip_pixels": clip_pixels, "target_pixels": target_pixels,
           "index": index, "mask": index < num_images,
           "image_id": np.array([str(i).encode() for i in index])}


def timed_pass(clip, target, layers, batches, num_images, mesh, step):
  from jaxdissect import activations  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  activations.run_probe_pass(clip, target, layers, batches, num_images, mesh=mesh,
                             step=step, log_every_s=30.0)
  return num_images / (time.perf_counter() - start)


def write_jpegs(folder, num_images):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from jaxdissect import tiny_models  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  base = tiny_models.render_images(16, seed=1, min_size=256, max_size=256)
  for i in range(num_images):
    image = Image.fromarray(base[i % 16]).resize((320, 256))
    image.save(os.path.join(folder, f"img_{i:06d}.jpg"), quality=90)


def similarity_seconds(layers, num_images, num_concepts, dim, seed=0):
  """Streaming soft_wpmi for every layer from its running top-k: (first, second) s."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxdissect import streaming, topk  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((num_images, dim)).astype(np.float32)
  texts = rng.standard_normal((num_concepts, dim)).astype(np.float32)
  tops = {}
  for info in layers:
    activations = np.maximum(rng.standard_normal((num_images, info.num_units)), 0)
    tops[info.name] = topk.from_activations(activations.astype(np.float32), 100).ids.T
  times = []
  for _ in range(2):
    start = time.perf_counter()
    for info in layers:
      jax.block_until_ready(streaming.soft_wpmi(images, texts, None,
                                                top_images=tops[info.name]))
    times.append(time.perf_counter() - start)
  return times


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_images", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--concepts", type=int, default=20000)
  parser.add_argument("--sim_images", type=int, default=50000)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from jaxdissect import activations, sharding  # pylint: disable=g-import-not-at-top
  record = {"num_images": args.num_images, "batch_size": args.batch_size,
            "concepts": args.concepts, "sim_images": args.sim_images,
            "device": common.device_info()}
  with tempfile.TemporaryDirectory() as tmp:
    target, clip = build_models(tmp)
    layers = target.resolve_layers(list(LAYERS))
    record["units"] = sum(info.num_units for info in layers)
    mesh = sharding.make_mesh()
    step = activations.make_probe_step(clip, target, layers, "avg", "cls", mesh)
    warm = memory_batches(args.batch_size, args.batch_size, clip.transform.output_size,
                          target.transform.output_size)
    start = time.perf_counter()
    timed_pass(clip, target, layers, warm, args.batch_size, mesh, step)
    record["compile_seconds"] = time.perf_counter() - start
    record["step_images_per_s"] = timed_pass(
        clip, target, layers,
        memory_batches(args.num_images, args.batch_size, clip.transform.output_size,
                       target.transform.output_size), args.num_images, mesh, step)
    _log(f"step: {record['step_images_per_s']:.1f} images/s")
    try:
      import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
      have_tf = True
    except ImportError:
      have_tf = False
    record["decode_images_per_s"] = record["full_images_per_s"] = None
    if have_tf:
      from jaxdissect.data import probe  # pylint: disable=g-import-not-at-top
      folder = os.path.join(tmp, "jpegs")
      write_jpegs(folder, args.num_images)
      probe_set = probe.ProbeSet(probe.parse_probe_spec(f"folder:{folder}"))

      def pipeline():
        return probe_set.batches(clip.transform, target.transform, args.batch_size)

      start = time.perf_counter()
      for _ in pipeline():
        pass
      record["decode_images_per_s"] = args.num_images / (time.perf_counter() - start)
      record["full_images_per_s"] = timed_pass(clip, target, layers, pipeline(),
                                               args.num_images, mesh, step)
      _log(f"decode: {record['decode_images_per_s']:.1f} images/s, full: "
           f"{record['full_images_per_s']:.1f} images/s")
  first, second = similarity_seconds(layers, args.sim_images, args.concepts,
                                     clip.embedding_dim)
  record["similarity_first_call_seconds"] = first
  record["similarity_seconds"] = second
  rate = record["full_images_per_s"] or record["step_images_per_s"]
  record["end_to_end_50k_estimate_seconds"] = 50000 / rate + second
  print(f"{'device':<10} {'units':>6} {'step img/s':>10} {'decode img/s':>12} "
        f"{'full img/s':>10} {'sim s':>7} {'50k e2e s':>9}")
  print(f"{record['device']['backend']:<10} {record['units']:>6} "
        f"{record['step_images_per_s']:>10.1f} "
        f"{_fmt(record['decode_images_per_s'], 12)} {_fmt(record['full_images_per_s'], 10)} "
        f"{second:>7.1f} {record['end_to_end_50k_estimate_seconds']:>9.0f}")
  if args.out:
    common.write_json(args.out, record)


def _fmt(value, width):
  return f"{'-':>{width}}" if value is None else f"{value:>{width}.1f}"


if __name__ == "__main__":
  main()

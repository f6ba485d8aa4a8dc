"""Tiny random-weight models and images, written the way real checkpoints are.

Used by the tests and the offline demo: each model is saved with save_pretrained (with
its tokenizer and preprocessor_config.json) and loaded back through the real loaders,
so the loading code is exercised without a network. Random weights give meaningless
labels; they test the plumbing, not label quality.

    python -m jaxdissect.tiny_models --out DIR [--num_images 120]
"""
import json
import os
from typing import Sequence

import numpy as np

from jaxdissect import registry


def _byte_characters() -> list[str]:
  """The 256 printable characters byte-level BPE (GPT-2 / CLIP) maps bytes to."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  chars, extra = list(printable), 0
  for b in range(256):
    if b not in printable:
      chars.append(256 + extra)
      extra += 1
  return [chr(c) for c in chars]


def write_clip_tokenizer(out_dir: str) -> None:
  """A valid CLIPTokenizerFast with no merges: every word is spelt out in characters."""
  from transformers import CLIPTokenizerFast  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  vocab = {}
  for ch in _byte_characters():
    vocab[ch] = len(vocab)
  for ch in _byte_characters():
    vocab[ch + "</w>"] = len(vocab)
  # CLIP pools the text at the highest token id: end-of-text must be the last id.
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  vocab_file = os.path.join(out_dir, "vocab.json")
  merges_file = os.path.join(out_dir, "merges.txt")
  with open(vocab_file, "w", encoding="utf-8") as f:
    json.dump(vocab, f)
  with open(merges_file, "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n")
  tokenizer = CLIPTokenizerFast(vocab_file=vocab_file, merges_file=merges_file)
  tokenizer.save_pretrained(out_dir)


def make_tiny_clip(out_dir: str, image_size: int = 32, seed: int = 0,
                   safetensors: bool = False, vision_weight_scale: float = 20.0,
                   text_weight_scale: float = 20.0) -> str:
  """A random CLIP whose image embeddings depend on the image.

  At the default init scale every image embeds to nearly the same vector (mean cosine
  0.99999 between images), which makes any label a coin toss; scaling the vision
  tower's kernels by `vision_weight_scale` spreads them (mean cosine ~0.5 at 20).
  """
  from transformers import CLIPConfig, CLIPImageProcessor, FlaxCLIPModel  # pylint: disable=g-import-not-at-top
  write_clip_tokenizer(out_dir)
  vocab_size = 2 * 256 + 2
  config = CLIPConfig(
      text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2,
                       max_position_embeddings=32, bos_token_id=vocab_size - 2,
                       eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, image_size=image_size, patch_size=8),
      projection_dim=16)
  model = FlaxCLIPModel(config, seed=seed)
  import jax  # pylint: disable=g-import-not-at-top

  def scale(path, leaf):
    name = jax.tree_util.keystr(path)
    if "kernel" not in name:
      return leaf
    if "vision_model" in name:
      return leaf * vision_weight_scale
    return leaf * text_weight_scale if "text_model" in name else leaf

  model.params = jax.tree_util.tree_map_with_path(scale, model.params)
  model.save_pretrained(out_dir, safe_serialization=safetensors)
  CLIPImageProcessor(size={"shortest_edge": image_size},
                     crop_size={"height": image_size, "width": image_size}
                     ).save_pretrained(out_dir)
  return out_dir


def make_tiny_resnet(out_dir: str, layer_type: str = "basic",
                     class_names: Sequence[str] = ("apple", "boat", "cat", "dog", "egg"),
                     image_size: int = 40, seed: int = 0,
                     safetensors: bool = False) -> str:
  from transformers import ConvNextImageProcessor, FlaxResNetForImageClassification, ResNetConfig  # pylint: disable=g-import-not-at-top
  config = ResNetConfig(
      embedding_size=8, hidden_sizes=[8, 16, 16, 24] if layer_type == "basic" else
      [16, 16, 32, 32], depths=[1, 1, 2, 1], layer_type=layer_type,
      num_labels=len(class_names), id2label=dict(enumerate(class_names)),
      label2id={c: i for i, c in enumerate(class_names)})
  model = FlaxResNetForImageClassification(config, seed=seed,
                                           input_shape=(1, image_size, image_size, 3))
  _perturb_batch_stats(model, seed)
  model.save_pretrained(out_dir, safe_serialization=safetensors)
  ConvNextImageProcessor(size={"shortest_edge": image_size}, crop_pct=0.875,
                         resample=2, image_mean=list(registry.IMAGENET_MEAN),
                         image_std=list(registry.IMAGENET_STD)).save_pretrained(out_dir)
  return out_dir


def _perturb_batch_stats(model, seed: int) -> None:
  """Non-trivial running statistics, so a test would notice them being ignored."""
  import jax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)

  def perturb(path, leaf):
    name = jax.tree_util.keystr(path)
    shape = np.shape(leaf)
    if "var" in name:
      return np.asarray(0.5 + rng.random(shape), np.float32)
    return np.asarray(0.1 * rng.standard_normal(shape), np.float32)

  params = dict(model.params)
  params["batch_stats"] = jax.tree_util.tree_map_with_path(perturb, params["batch_stats"])
  model.params = params


def make_tiny_vit(out_dir: str, class_names: Sequence[str] = ("apple", "boat", "cat"),
                  image_size: int = 32, seed: int = 0) -> str:
  from transformers import FlaxViTForImageClassification, ViTConfig, ViTImageProcessor  # pylint: disable=g-import-not-at-top
  config = ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, image_size=image_size, patch_size=8,
                     num_labels=len(class_names), id2label=dict(enumerate(class_names)),
                     label2id={c: i for i, c in enumerate(class_names)})
  model = FlaxViTForImageClassification(config, seed=seed)
  model.save_pretrained(out_dir)
  ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(
      out_dir)
  return out_dir


def render_images(num_images: int, seed: int = 0, min_size: int = 24,
                  max_size: int = 64) -> list[np.ndarray]:
  """Varied uint8 RGB images (sizes, aspect ratios, blobs, stripes) for probe sets."""
  rng = np.random.default_rng(seed)
  images = []
  for _ in range(num_images):
    h, w = rng.integers(min_size, max_size + 1, size=2)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 256, size=3)
    image = np.broadcast_to(base, (h, w, 3)).astype(np.float64)
    cy, cx, r = rng.random() * h, rng.random() * w, (0.15 + 0.3 * rng.random()) * min(h, w)
    blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
    image[blob] = rng.integers(0, 256, size=3)
    if rng.random() < 0.5:
      period = int(rng.integers(3, 9))
      image[(xx // period) % 2 == 0] *= 0.5
    image += rng.normal(0, 8, size=image.shape)
    images.append(np.clip(image, 0, 255).astype(np.uint8))
  return images


def write_image_folder(folder: str, num_images: int, seed: int = 0) -> list[str]:
  """PNG and JPEG files in two subfolders; returns relative paths in sorted order."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  paths = []
  for i, image in enumerate(render_images(num_images, seed)):
    sub = "a" if i % 2 == 0 else "b/c"
    ext = "png" if i % 3 else "jpg"
    rel = f"{sub}/img_{i:05d}.{ext}"
    os.makedirs(os.path.join(folder, os.path.dirname(rel)), exist_ok=True)
    Image.fromarray(image).save(os.path.join(folder, rel))
    paths.append(rel)
  return sorted(paths)


def write_concepts(path: str, concepts: Sequence[str]) -> str:
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(concepts) + "\n")
  return path


DEMO_CONCEPTS = ("red", "green", "blue", "yellow", "stripes", "dots", "circle", "square",
                 "sky", "grass", "water", "sand", "dog", "cat", "car", "tree", "house",
                 "boat", "apple", "flower")


def main(argv=None) -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="directory to write into")
  parser.add_argument("--num_images", type=int, default=160)
  args = parser.parse_args(argv)
  make_tiny_clip(os.path.join(args.out, "clip"))
  make_tiny_resnet(os.path.join(args.out, "resnet"))
  write_image_folder(os.path.join(args.out, "images"), args.num_images)
  write_concepts(os.path.join(args.out, "concepts.txt"), DEMO_CONCEPTS)
  print(f"Wrote tiny random CLIP, ResNet, {args.num_images} images and "
        f"{len(DEMO_CONCEPTS)} concepts to {args.out}")


if __name__ == "__main__":
  main()

"""Each model's own image transform, read from its preprocessor_config.json.

The transform is the HF image processors' NumPy/PIL path, with PIL itself: PIL resize
of the uint8 image, centre crop with the same integer offsets (black padding when the
crop is larger), rescale, normalise. The output is HWC float32.
"""
import dataclasses
import json
import os
from typing import Any

from absl import logging
import numpy as np

from jaxdissect import errors
from jaxdissect import registry

IMAGENET_MEAN, IMAGENET_STD = registry.IMAGENET_MEAN, registry.IMAGENET_STD
# PIL resample codes as stored in preprocessor_config.json, and back.
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos3", 2: "bilinear", 3: "bicubic", 4: "area",
                   5: "hamming"}
PIL_RESAMPLE = {name: code for code, name in _RESAMPLE_NAMES.items()}


@dataclasses.dataclass(frozen=True)
class ImageTransform:
  """A model's preprocessing.

  At most one of resize_shortest_edge (keep aspect) and resize_to (exact (h, w)) is
  set (neither: no resize, as with do_resize=False); crop_size (h, w) is a centre crop
  after resizing, or None.
  """
  resize_shortest_edge: int | None = None
  resize_to: tuple[int, int] | None = None
  crop_size: tuple[int, int] | None = None
  resample: str = "bicubic"
  rescale_factor: float = 1.0 / 255.0
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD

  def __post_init__(self):
    if self.resize_shortest_edge is not None and self.resize_to is not None:
      raise ValueError("ImageTransform takes at most one of resize_shortest_edge and "
                       "resize_to.")
    if self.resample not in PIL_RESAMPLE:
      raise ValueError(f"ImageTransform resample {self.resample!r} is not one of "
                       f"{sorted(PIL_RESAMPLE)}.")

  @property
  def output_size(self) -> tuple[int, int] | None:
    """(height, width) of every output, or None when it depends on the image."""
    if self.crop_size is not None:
      return tuple(self.crop_size)
    if self.resize_to is not None:
      return tuple(self.resize_to)
    return None

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# Processor classes whose resize is "shortest edge then centre crop" or "exact size, then
# optional centre crop": what the geometry below reproduces. ConvNext-style processors
# (crop_pct) are handled on their own.
_STANDARD_PROCESSORS = ("CLIPImageProcessor", "ViTImageProcessor", "DeiTImageProcessor",
                        "BeitImageProcessor", "BitImageProcessor",
                        "Data2VecVisionImageProcessor", "ViTHybridImageProcessor",
                        "SiglipImageProcessor", "ChineseCLIPImageProcessor",
                        "BlipImageProcessor", "DPTImageProcessor", "ConvNextImageProcessor")
# Switches that change the pixels in ways the transform does not reproduce.
_UNSUPPORTED_SWITCHES = ("do_flip_channel_order", "rescale_offset", "do_pad",
                         "keep_aspect_ratio")


def transform_from_processor(processor, name: str = "model") -> ImageTransform:
  """The transform an HF image processor applies, read from the processor itself.

  transformers interprets the config (legacy feature-extractor configs, a bare-int
  `size` meaning the shortest edge for CLIP/ConvNext and height x width for ViT,
  `crop_pct`, `do_*` switches); this reads the interpreted attributes, so each config
  format means here what it means in transformers.
  """
  kind = type(processor).__name__
  for switch in _UNSUPPORTED_SWITCHES:
    if getattr(processor, switch, False):
      raise errors.UserError(
          "image processor", f"{name}'s {kind} sets {switch}, which jaxdissect's "
          "transform does not reproduce.", "save a preprocessor_config.json without "
          f"{switch}, or wrap the model as python:pkg.module:factory with an "
          "ImageTransform.")
  if kind not in _STANDARD_PROCESSORS:
    logging.warning("%s uses %s, whose resize jaxdissect reads as the common rule "
                    "(shortest edge, or exact size, then centre crop).", name, kind)
  resample = _RESAMPLE_NAMES.get(int(getattr(processor, "resample", 3)), "bicubic")
  if getattr(processor, "do_normalize", True):
    mean = tuple(float(v) for v in _three(processor.image_mean))
    std = tuple(float(v) for v in _three(processor.image_std))
  else:
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
  rescale = (float(getattr(processor, "rescale_factor", 1 / 255))
             if getattr(processor, "do_rescale", True) else 1.0)
  common = dict(resample=resample, mean=mean, std=std, rescale_factor=rescale)
  size = dict(getattr(processor, "size", None) or {})
  do_resize = getattr(processor, "do_resize", True) and bool(size)

  if kind.startswith("ConvNext") and do_resize:
    shortest = int(size["shortest_edge"])
    if shortest < 384:  # ConvNextImageProcessor.resize: enlarge by 1/crop_pct, crop.
      crop_pct = float(getattr(processor, "crop_pct", None) or 224 / 256)
      return ImageTransform(resize_shortest_edge=int(shortest / crop_pct),
                            crop_size=(shortest, shortest), **common)
    return ImageTransform(resize_to=(shortest, shortest), **common)

  crop = None
  if getattr(processor, "do_center_crop", False):
    crop_size = processor.crop_size
    crop = ((int(crop_size), int(crop_size)) if isinstance(crop_size, int)
            else (int(crop_size["height"]), int(crop_size["width"])))
  if not do_resize:
    return ImageTransform(crop_size=crop, **common)
  if "shortest_edge" in size:
    return ImageTransform(resize_shortest_edge=int(size["shortest_edge"]), crop_size=crop,
                          **common)
  if "height" in size and "width" in size:
    return ImageTransform(resize_to=(int(size["height"]), int(size["width"])),
                          crop_size=crop, **common)
  raise errors.UserError(
      "image processor", f"{name}'s {kind} has size {size}, which names no shortest "
      "edge and no height/width.", "give the preprocessor_config.json a size of "
      '{"shortest_edge": N} or {"height": H, "width": W}.')


def _three(values) -> tuple:
  values = tuple(values) if isinstance(values, (list, tuple)) else (values,) * 3
  return values if len(values) == 3 else values[:1] * 3


def load_processor(model_dir_or_id: str, cache_dir: str | None = None):
  """transformers' own (slow, NumPy/PIL) image processor for a directory or hub id."""
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.AutoImageProcessor.from_pretrained(model_dir_or_id, use_fast=False,
                                                         cache_dir=cache_dir)


def transform_from_processor_config(processor_config: dict[str, Any]) -> ImageTransform:
  """The transform of a preprocessor_config.json's contents, as transformers reads it."""
  import tempfile  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    with open(os.path.join(tmp, "preprocessor_config.json"), "w", encoding="utf-8") as f:
      json.dump(processor_config, f)
    return transform_from_processor(load_processor(tmp), "this config")


def load_transform(model_dir_or_id: str, fallback: ImageTransform,
                   cache_dir: str | None = None) -> ImageTransform:
  """The transform of a local model directory or hub id, or `fallback` if it has none."""
  local = os.path.join(model_dir_or_id, "preprocessor_config.json")
  if os.path.isdir(model_dir_or_id) and not os.path.isfile(local):
    logging.warning("No preprocessor_config.json in %s; using %s.", model_dir_or_id,
                    fallback)
    return fallback
  try:
    processor = load_processor(model_dir_or_id, cache_dir)
  except Exception as err:  # pylint: disable=broad-except
    if os.path.isfile(local):
      raise errors.UserError(
          "image processor", f"transformers cannot read {local} ({type(err).__name__}: "
          f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}).",
          "fix or remove the file (without it the model's default transform is "
          "used).") from None
    logging.warning("No preprocessor_config.json for %s (%s); using %s.",
                    model_dir_or_id, type(err).__name__, fallback)
    return fallback
  transform = transform_from_processor(processor, model_dir_or_id)
  logging.info("Image transform of %s (%s): %s.", model_dir_or_id,
               type(processor).__name__, transform)
  return transform


def resize_output_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
  """HF's get_resize_output_image_size(default_to_square=False): (new_h, new_w)."""
  short, long = min(height, width), max(height, width)
  new_long = int(shortest_edge * long / short)
  return (shortest_edge, new_long) if height <= width else (new_long, shortest_edge)


def resized_size(height: int, width: int, transform: ImageTransform) -> tuple[int, int]:
  """(h, w) after the transform's resize (before its crop)."""
  if transform.resize_to is not None:
    return tuple(transform.resize_to)
  if transform.resize_shortest_edge is not None:
    return resize_output_size(height, width, transform.resize_shortest_edge)
  return height, width


def apply_transform(image, transform: ImageTransform) -> np.ndarray:
  """An RGB image (PIL, or uint8 (H, W, 3)) -> float32 model input (h, w, 3).

  As the HF processors do it: PIL resize of the uint8 image (reducing_gap None),
  centre crop, rescale in float64, normalise in float32. Memory stays that of uint8
  images: no float copy of the full-size image."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not isinstance(image, Image.Image):
    image = Image.fromarray(np.asarray(image, np.uint8), mode="RGB")
  height, width = image.height, image.width
  new_h, new_w = resized_size(height, width, transform)
  if (new_h, new_w) != (height, width):
    image = image.resize((new_w, new_h), resample=PIL_RESAMPLE[transform.resample],
                         reducing_gap=None)
  pixels = np.asarray(image)
  if transform.crop_size is not None:
    pixels = center_crop(pixels, *transform.crop_size)
  return normalise(pixels, transform)


def normalise(pixels: np.ndarray, transform: ImageTransform) -> np.ndarray:
  """Pixel values 0..255 (..., 3) -> the model's input scale, float32: x * rescale_factor
  (in float64, as HF's rescale), then (x - mean) / std per channel."""
  scaled = (np.asarray(pixels, np.float64) * transform.rescale_factor).astype(np.float32)
  return (scaled - np.asarray(transform.mean, np.float32)) / np.asarray(transform.std,
                                                                        np.float32)


def center_crop(pixels: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
  """HF's center_crop of (H, W, C): offsets (size - crop) // 2; an image smaller than
  the crop is first padded with black, ceil((crop - size) / 2) before it."""
  height, width = pixels.shape[:2]
  pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
  if pad_h or pad_w:
    top_pad, left_pad = (pad_h + 1) // 2, (pad_w + 1) // 2
    pixels = np.pad(pixels, [(top_pad, pad_h - top_pad), (left_pad, pad_w - left_pad),
                             (0, 0)])
  height, width = pixels.shape[:2]
  top, left = (height - crop_h) // 2, (width - crop_w) // 2
  return pixels[top:top + crop_h, left:left + crop_w]

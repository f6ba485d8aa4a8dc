"""Each model's own image transform, read from its preprocessor_config.json, run in TF.

The transform reproduces the HF image processors' NumPy/PIL path: resize (with
antialiasing, like PIL) and round to uint8 as PIL does, centre-crop with the same
integer offsets, rescale, normalise. The output is NHWC float32.
"""
import dataclasses
import json
import os
from typing import Any

from absl import logging

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PIL resample codes as stored in preprocessor_config.json.
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos3", 2: "bilinear", 3: "bicubic", 4: "area",
                 5: "area"}


@dataclasses.dataclass(frozen=True)
class ImageTransform:
  """A model's preprocessing.

  Exactly one of resize_shortest_edge (keep aspect) and resize_to (exact (h, w)) is
  set; crop_size (h, w) is a centre crop after resizing, or None.
  """
  resize_shortest_edge: int | None = None
  resize_to: tuple[int, int] | None = None
  crop_size: tuple[int, int] | None = None
  resample: str = "bicubic"
  rescale_factor: float = 1.0 / 255.0
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD

  def __post_init__(self):
    if (self.resize_shortest_edge is None) == (self.resize_to is None):
      raise ValueError("ImageTransform needs exactly one of resize_shortest_edge and "
                       "resize_to.")

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


def transform_from_processor_config(processor_config: dict[str, Any]) -> ImageTransform:
  """Builds the transform an HF image processor config describes.

  Handles the processors vision models ship with: CLIP/BiT style (shortest edge then
  crop), ConvNext style (used by microsoft/resnet-*: shortest edge / crop_pct then crop),
  ViT style (exact size).
  """
  kind = processor_config.get("image_processor_type", "")
  size = processor_config.get("size", 224)
  if isinstance(size, int):
    size = {"shortest_edge": size} if "ConvNext" in kind else {"height": size,
                                                                 "width": size}
  resample = _PIL_RESAMPLE.get(int(processor_config.get("resample", 3)), "bicubic")
  do_normalize = processor_config.get("do_normalize", True)
  mean = tuple(processor_config.get("image_mean", IMAGENET_MEAN)) if do_normalize else (
      0.0, 0.0, 0.0)
  std = tuple(processor_config.get("image_std", IMAGENET_STD)) if do_normalize else (
      1.0, 1.0, 1.0)
  rescale = (processor_config.get("rescale_factor", 1 / 255)
             if processor_config.get("do_rescale", True) else 1.0)
  common = dict(resample=resample, mean=mean, std=std, rescale_factor=float(rescale))

  if "ConvNext" in kind:
    shortest = int(size["shortest_edge"])
    if shortest < 384:
      crop_pct = float(processor_config.get("crop_pct") or 224 / 256)
      return ImageTransform(resize_shortest_edge=int(shortest / crop_pct),
                            crop_size=(shortest, shortest), **common)
    return ImageTransform(resize_to=(shortest, shortest), **common)

  crop = None
  if processor_config.get("do_center_crop", False):
    crop_cfg = processor_config.get("crop_size", 224)
    if isinstance(crop_cfg, int):
      crop = (crop_cfg, crop_cfg)
    else:
      crop = (int(crop_cfg["height"]), int(crop_cfg["width"]))
  if "shortest_edge" in size:
    return ImageTransform(resize_shortest_edge=int(size["shortest_edge"]), crop_size=crop,
                          **common)
  return ImageTransform(resize_to=(int(size["height"]), int(size["width"])), crop_size=crop,
                        **common)


def load_transform(model_dir_or_id: str, fallback: ImageTransform,
                   cache_dir: str | None = None) -> ImageTransform:
  """The transform of a local model directory or hub id, or `fallback` if it has none."""
  local = os.path.join(model_dir_or_id, "preprocessor_config.json")
  path = local if os.path.isfile(local) else None
  if path is None and not os.path.isdir(model_dir_or_id):
    try:
      from huggingface_hub import hf_hub_download  # pylint: disable=g-import-not-at-top
      path = hf_hub_download(model_dir_or_id, "preprocessor_config.json",
                             cache_dir=cache_dir)
    except Exception as err:  # pylint: disable=broad-except
      logging.warning("No preprocessor_config.json for %s (%s); using %s.",
                      model_dir_or_id, type(err).__name__, fallback)
      return fallback
  if path is None:
    logging.warning("No preprocessor_config.json in %s; using %s.", model_dir_or_id,
                    fallback)
    return fallback
  with open(path, encoding="utf-8") as f:
    return transform_from_processor_config(json.load(f))


def resize_output_size(height, width, shortest_edge):
  """HF's get_resize_output_image_size(default_to_square=False), on tf scalars."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  short = tf.minimum(height, width)
  long = tf.maximum(height, width)
  new_short = tf.constant(shortest_edge, tf.int32)
  # int(size * long / short), computed in float64 as Python does.
  new_long = tf.cast(tf.math.floor(
      tf.cast(shortest_edge, tf.float64) * tf.cast(long, tf.float64)
      / tf.cast(short, tf.float64)), tf.int32)
  new_h = tf.where(height <= width, new_short, new_long)
  new_w = tf.where(height <= width, new_long, new_short)
  return new_h, new_w


def apply_transform(image, transform: ImageTransform):
  """uint8 (H, W, 3) tf image -> float32 model input (h, w, 3)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  if transform.resize_to is not None:
    new_h, new_w = transform.resize_to
  else:
    new_h, new_w = resize_output_size(height, width, transform.resize_shortest_edge)
  method = {"lanczos3": "lanczos3", "bicubic": "bicubic", "bilinear": "bilinear",
            "nearest": "nearest", "area": "area"}[transform.resample]
  antialias = method != "nearest"
  # PIL resamples in two passes, width then height, rounding and clipping to uint8 after
  # each (half up); doing the same keeps cubic overshoot near saturated pixels identical.
  resized = tf.image.resize(tf.cast(image, tf.float32), tf.stack([height, new_w]),
                            method=method, antialias=antialias)
  resized = tf.clip_by_value(tf.floor(resized + 0.5), 0.0, 255.0)
  resized = tf.image.resize(resized, tf.stack([new_h, new_w]), method=method,
                            antialias=antialias)
  resized = tf.clip_by_value(tf.floor(resized + 0.5), 0.0, 255.0)
  if transform.crop_size is not None:
    crop_h, crop_w = transform.crop_size
    top = (tf.shape(resized)[0] - crop_h) // 2
    left = (tf.shape(resized)[1] - crop_w) // 2
    resized = tf.image.crop_to_bounding_box(resized, top, left, crop_h, crop_w)
    resized = tf.ensure_shape(resized, (crop_h, crop_w, 3))
  elif transform.resize_to is not None:
    resized = tf.ensure_shape(resized, (*transform.resize_to, 3))
  scaled = resized * transform.rescale_factor
  mean = tf.constant(transform.mean, tf.float32)
  std = tf.constant(transform.std, tf.float32)
  return (scaled - mean) / std

"""Images a person looks at: a unit's spatial activation map, heat-map overlays, grids
and PNG files; shared by the report and the visualisation application."""
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect.models import targets as targets_lib


def layer_output_fn(target: targets_lib.TargetModel, path: str):
  """Jitted (variables, pixels (b, H, W, 3)) -> the layer's raw output, built once per
  layer so that repeated batches reuse one compile."""
  keep = targets_lib.capture_filter([path])

  @jax.jit
  def output(variables, batch):
    _, inter = target.forward(variables, batch, capture=keep)
    return targets_lib.get_intermediate(inter, path)

  return output


def spatial_maps(output: np.ndarray) -> np.ndarray | None:
  """A layer output -> (b, h, w, units) maps: feature maps as they are, ViT tokens'
  patch tokens as a square grid; None for outputs with no spatial axes."""
  if output.ndim == 4:
    return output
  if output.ndim == 3:
    side = int(round(np.sqrt(output.shape[1] - 1)))
    if side * side == output.shape[1] - 1:
      return output[:, 1:, :].reshape(len(output), side, side, -1)
  return None


def unit_maps(target: targets_lib.TargetModel, path: str, pixels: np.ndarray,
              units: Sequence[int], output_fn=None) -> np.ndarray | None:
  """(num_images, h, w, len(units)) activation maps of a layer, or None for a layer
  with no spatial axes. output_fn: layer_output_fn(target, path), if built already."""
  output_fn = output_fn or layer_output_fn(target, path)
  maps = spatial_maps(np.asarray(output_fn(target.variables, jnp.asarray(pixels))))
  return None if maps is None else maps[..., list(units)]


def heat_overlay(image: np.ndarray, heat: np.ndarray | None, scale: float,
                 alpha: float = 0.5) -> np.ndarray:
  """image: (H, W, 3) in [0, 1]; heat: (h, w) activations or None; scale: the value
  shown at full strength -> (H, W, 3) uint8 with a red-yellow heat map blended in."""
  if heat is None:
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  height, width = image.shape[:2]
  # PIL's float resize: per-tile jax.image.resize ran op by op and dominated the report.
  up = np.asarray(Image.fromarray(np.asarray(heat, np.float32), mode="F").resize(
      (width, height), Image.BILINEAR))
  strength = np.clip(up / max(scale, 1e-12), 0.0, 1.0)[..., None]
  colour = np.concatenate([np.ones_like(strength), strength, np.zeros_like(strength)],
                          axis=-1)  # red (low) to yellow (high)
  blended = image * (1 - alpha * strength) + colour * alpha * strength
  return np.round(np.clip(blended, 0, 1) * 255).astype(np.uint8)


def grid(tiles: Sequence[np.ndarray], columns: int = 4, pad: int = 2) -> np.ndarray:
  """Equal-size (H, W, 3) uint8 tiles -> one (rows*(H+pad), columns*(W+pad), 3) image."""
  h, w = tiles[0].shape[:2]
  rows = -(-len(tiles) // columns)
  out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
  for i, tile in enumerate(tiles):
    r, c = divmod(i, columns)
    out[pad + r * (h + pad):pad + r * (h + pad) + h,
        pad + c * (w + pad):pad + c * (w + pad) + w] = tile
  return out


def save_png(path: str, image: np.ndarray, min_side: int = 128, title: str = "") -> None:
  """Writes atomically; small images are enlarged (nearest) so that they can be seen, and
  `title` (one line, clipped to the width) goes in a white band above the picture so that
  a PNG opened on its own says what it shows."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  picture = Image.fromarray(image)
  factor = max(1, -(-min_side // min(image.shape[:2])))
  if factor > 1:
    picture = picture.resize((image.shape[1] * factor, image.shape[0] * factor),
                             Image.NEAREST)
  if title:
    font = ImageFont.load_default()
    band = font.getbbox("Ag")[3] + 8
    titled = Image.new("RGB", (picture.width, picture.height + band), (255, 255, 255))
    titled.paste(picture, (0, band))
    text = title
    while len(text) > 1 and font.getlength(text) > picture.width - 8:
      text = text[:-2] + "\u2026"
    ImageDraw.Draw(titled).text((4, 4), text, fill=(0, 0, 0), font=font)
    picture = titled
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  temporary = f"{path}.tmp-{os.getpid()}.png"
  # zlib level 1, not PIL's 6: a report strip (492 x 100) encodes in 8.5 ms instead of
  # 32-37, for files 10% larger; a ResNet-50 report writes 3,904 of them.
  picture.save(temporary, compress_level=1)
  os.replace(temporary, path)


def to_display(pixels: np.ndarray, mean, std) -> np.ndarray:
  """Normalised model input (..., 3) -> RGB in [0, 1]."""
  return np.clip(pixels * np.asarray(std) + np.asarray(mean), 0.0, 1.0)


# --------------------------------------------------------- activation maximisation

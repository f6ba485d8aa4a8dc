"""Neuron visualisation: each unit's top probe images with its activation map overlaid,
and activation maximisation.

    python -m jaxdissect.applications.visualize --results DIR --units 'layer4:0,1,2' \
        [--top 8] [--maximize] [--steps 256] [--out DIR/visualize]

Top images: the unit's highest-activating probe images (top_images.csv), in the
target's preprocessing, with the unit's spatial map (feature map channel; ViT patch
tokens; none for dense outputs) upsampled bilinearly and blended in as a heat map,
scaled by the unit's largest activation over those images so that the grid compares
images on one scale. Written as LAYER/unit-N-top.png.

Activation maximisation: gradient ascent (Adam) on the input image for the unit's
pooled activation, as the dissection pooled it, all steps in one jitted lax.scan. The
image is parameterised as a sum of upsampled grids from coarse to full resolution
through a sigmoid, so that a gradient reaching a few pixels moves whole regions (a
unit that responds to one colour gives no gradient where that colour is absent); each
step sees the image randomly shifted (jitter, up to `jitter` pixels) and blurred
(Gaussian, `blur_sigma` pixels), so the result cannot rely on single-pixel patterns.
A unit that stays below its best probe activation from noise (a ReLU unit silent on
every noise image has no gradient) is optimised again from its best probe image.
Written as LAYER/unit-N-maximized.png, with the activation it reaches beside the best
probe image's in visualize.csv.
"""
import csv
import dataclasses
import os
import sys
from typing import Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdissect import entry
from jaxdissect import errors
from jaxdissect import images as images_lib
from jaxdissect import rundir
from jaxdissect.applications import common
from jaxdissect.models import targets as targets_lib


@dataclasses.dataclass
class MaximizeOptions:
  steps: int = 256
  learning_rate: float = 0.05
  jitter: int = 4
  blur_sigma: float = 0.5
  seed: int = 0


INIT_STD = 1.5
INIT_DECAY = 0.5


def pyramid_sizes(height: int, width: int, coarsest: int = 4) -> list[tuple[int, int]]:
  sizes, h, w = [], height, width
  while min(h, w) >= coarsest:
    sizes.append((h, w))
    h, w = h // 2, w // 2
  return sizes[::-1] or [(height, width)]


def decode_image(params: Sequence[jax.Array], size: tuple[int, int]) -> jax.Array:
  """Pyramid parameters [(b, h_s, w_s, 3)] -> (b, H, W, 3) image in (0, 1)."""
  total = sum(jax.image.resize(p, (p.shape[0], *size, 3), "bilinear") for p in params)
  return jax.nn.sigmoid(total)


def gaussian_blur(images: jax.Array, sigma: float) -> jax.Array:
  """(b, H, W, 3) separable Gaussian blur, reflected borders."""
  if sigma <= 0:
    return images
  radius = max(1, int(np.ceil(2 * sigma)))
  x = np.arange(-radius, radius + 1, dtype=np.float32)
  kernel = np.exp(-x ** 2 / (2 * sigma ** 2))
  kernel = jnp.asarray(kernel / kernel.sum())
  padded = jnp.pad(images, ((0, 0), (radius, radius), (radius, radius), (0, 0)),
                   mode="reflect")
  h, w = images.shape[1:3]
  rows = sum(kernel[i] * padded[:, i:i + h, :, :] for i in range(len(kernel)))
  return sum(kernel[i] * rows[:, :, i:i + w, :] for i in range(len(kernel)))


def make_unit_objective(target: targets_lib.TargetModel, path: str, unit: int,
                        pool_mode: str = "avg", token_pool: str = "cls"):
  """(variables, normalised pixels (b, H, W, 3)) -> (b,) the unit's pooled activation."""
  keep = targets_lib.capture_filter([path])

  def objective(variables, pixels):
    _, inter = target.forward(variables, pixels, capture=keep)
    pooled = targets_lib.pool(targets_lib.get_intermediate(inter, path), pool_mode,
                              token_pool)
    return pooled[:, unit]

  return objective


def maximize(objective, variables, size: tuple[int, int], mean, std,
             options: MaximizeOptions = MaximizeOptions(),
             init: np.ndarray | None = None) -> tuple[np.ndarray, float]:
  """Gradient ascent on the input for objective. init: (H, W, 3) RGB in [0, 1] to start
  from (else noise). Returns (the optimised (H, W, 3) RGB in [0, 1], the objective on it
  without jitter or blur)."""
  sizes = pyramid_sizes(*size)
  key = jax.random.key(options.seed)
  keys = jax.random.split(key, len(sizes) + 1)
  # Logits spread wide on the coarse grids and less on each finer one: colours vary
  # smoothly over the whole range, so some region is near any colour (a unit that
  # responds to one colour has a gradient from the start) without pixel noise.
  params = [INIT_STD * INIT_DECAY ** j * jax.random.normal(k, (1, *s, 3))
            for j, (k, s) in enumerate(zip(keys[1:], sizes))]
  if init is not None:
    # Start from the given image: its logit at full resolution, the coarse grids at 0.
    clipped = np.clip(np.asarray(init, np.float32), 0.02, 0.98)
    params = [jnp.zeros((1, *s, 3)) for s in sizes[:-1]] + [
        jnp.asarray(np.log(clipped / (1 - clipped)))[None]]
  mean, std = jnp.asarray(mean), jnp.asarray(std)
  optimizer = optax.adam(options.learning_rate)

  def loss(p, step_key):
    image = decode_image(p, size)
    shift = jax.random.randint(step_key, (2,), -options.jitter, options.jitter + 1)
    image = jnp.roll(image, (shift[0], shift[1]), axis=(1, 2))
    image = gaussian_blur(image, options.blur_sigma)
    return -jnp.mean(objective(variables, (image - mean) / std))

  @jax.jit
  def run(params, key):
    def step(carry, step_key):
      p, state = carry
      grads = jax.grad(loss)(p, step_key)
      updates, state = optimizer.update(grads, state, p)
      return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)),
                                  jax.random.split(key, options.steps))
    image = decode_image(params, size)
    return image[0], objective(variables, (image - mean) / std)[0]

  image, value = run(params, keys[0])
  return np.asarray(image), float(value)


# ---------------------------------------------------------------------------- runs
def top_image_indices(run: rundir.Run, layer: str, units: Sequence[int],
                      count: int) -> dict[int, list[tuple[int, float]]]:
  """{unit: [(global image index, activation), ...] best first} from top_images.csv."""
  path = os.path.join(run.result_dir, "top_images.csv")
  wanted = set(int(u) for u in units)
  rows: dict[int, list[tuple[str, float]]] = {u: [] for u in wanted}
  with open(path, encoding="utf-8", newline="") as f:
    for row in csv.DictReader(f):
      unit = int(row["unit"])
      if row["layer"] == layer and unit in wanted and int(row["rank"]) < count:
        rows[unit].append((row["image_id"], float(row["activation"])))
  index_of = {image_id: i for i, image_id in enumerate(run.probe_set.all_image_ids())}
  missing = sorted({i for pairs in rows.values() for i, _ in pairs if i not in index_of})
  if missing:
    raise errors.UserError("results", f"top images {missing[:3]} are not in the probe "
                           f"set {run.config.d_probe}.",
                           "the probe images changed since the run; rerun main.py.")
  return {u: [(index_of[i], a) for i, a in pairs] for u, pairs in rows.items()}


def visualize_units(run: rundir.Run, layer: str, units: Sequence[int], out_dir: str,
                    top: int = 8, maximize_units: bool = False,
                    options: MaximizeOptions = MaximizeOptions()) -> list[dict]:
  """Writes the PNGs of `units` of `layer`; returns one record per unit (paths, the
  best probe activation, and the maximised activation where computed)."""
  info = run.layer_infos[layer]
  transform = run.target.transform
  tops = top_image_indices(run, layer, units, top)
  images = run.probe_set.read_images([i for pairs in tops.values() for i, _ in pairs],
                                     transform)
  records = []
  for unit in units:
    pairs = [(i, a) for i, a in tops[unit] if i in images]
    record = {"layer": layer, "unit": int(unit), "label": run.layers[layer].labels[unit],
              "best_probe_activation": pairs[0][1] if pairs else float("nan")}
    if pairs:
      pixels = np.stack([images[i] for i, _ in pairs])
      maps = images_lib.unit_maps(run.target, info.path, pixels, [unit])
      scale = float(np.max(maps)) if maps is not None else 1.0
      tiles = [images_lib.heat_overlay(images_lib.to_display(p, transform.mean, transform.std),
                            None if maps is None else maps[j, ..., 0], scale)
               for j, p in enumerate(pixels)]
      record["top_png"] = os.path.join(out_dir, _safe(layer), f"unit-{unit}-top.png")
      where = "" if maps is None else "; activation map in yellow"
      images_lib.save_png(
          record["top_png"], images_lib.grid(tiles),
          title=f"{layer} unit {unit} \"{record['label']}\": top {len(pairs)} probe images "
                f"(best activation {pairs[0][1]:.3g}{where})")
    if maximize_units:
      objective = make_unit_objective(run.target, info.path, unit, run.config.pool_mode,
                                      run.config.token_pool)
      image, value = maximize(objective, run.target.variables, transform.output_size,
                              transform.mean, transform.std, options)
      record["maximized_from"] = "noise"
      if value <= record["best_probe_activation"] and pairs:
        # Silent on every noise image (a ReLU unit gets no gradient there): start from
        # its best probe image instead.
        image, value = maximize(objective, run.target.variables, transform.output_size,
                                transform.mean, transform.std, options,
                                init=images_lib.to_display(images[pairs[0][0]], transform.mean,
                                                transform.std))
        record["maximized_from"] = "best probe image"
      record["maximized_activation"] = value
      record["maximized_png"] = os.path.join(out_dir, _safe(layer),
                                             f"unit-{unit}-maximized.png")
      images_lib.save_png(
          record["maximized_png"], np.round(image * 255).astype(np.uint8),
          title=f"{layer} unit {unit} \"{record['label']}\": maximised to {value:.3g} "
                f"from {record['maximized_from']}")
    records.append(record)
    logging.info("Visualised %s unit %d (%s).", layer, unit, record["label"])
  return records


def _safe(name: str) -> str:
  return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def main(argv: Sequence[str] | None = None) -> int:
  parser = common.parser_for(
      "visualize", "Per unit: a PNG grid of its top probe images with its activation "
      "map overlaid, and optionally an activation-maximising image.", units=True)
  parser.add_argument("--top", type=int, default=8, help="top images per unit")
  parser.add_argument("--maximize", action="store_true",
                      help="also optimise an input image for each unit")
  parser.add_argument("--steps", type=int, default=MaximizeOptions.steps)
  parser.add_argument("--learning_rate", type=float, default=MaximizeOptions.learning_rate)
  parser.add_argument("--jitter", type=int, default=MaximizeOptions.jitter)
  parser.add_argument("--blur_sigma", type=float, default=MaximizeOptions.blur_sigma)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="default: DIR/visualize")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  out_dir = args.out or os.path.join(args.results, "visualize")
  options = MaximizeOptions(args.steps, args.learning_rate, args.jitter, args.blur_sigma,
                            args.seed)
  try:
    run = rundir.load_run(args.results)
    selection = common.parse_unit_selection(args.units, run)
    records = []
    for layer, units in selection.items():
      records += visualize_units(run, layer, list(units), out_dir, args.top,
                                 args.maximize, options)
  except errors.UserError as err:
    print(f"error: {err.one_line()}", file=sys.stderr)
    return 2
  columns = ["layer", "unit", "label", "best_probe_activation", "maximized_activation",
             "maximized_from", "top_png", "maximized_png"]
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "visualize.csv")
  temporary = f"{path}.tmp-{os.getpid()}"
  with open(temporary, "w", encoding="utf-8", newline="") as f:
    writer = csv.DictWriter(f, columns, lineterminator="\n")
    writer.writeheader()
    for record in records:
      writer.writerow({k: record.get(k, "") for k in columns})
  os.replace(temporary, path)
  print(f"{len(records)} unit(s) visualised in {out_dir} (index: {path}).")
  return 0


if __name__ == "__main__":
  entry.run(main)

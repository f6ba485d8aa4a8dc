"""Pruning by the dissection: remove a layer's units in the order a criterion gives and
measure probe-set accuracy at each sparsity, against removing random units.

    python -m jaxdissect.applications.pruning --results DIR --layer layer4 \
        [--criterion mean_activation|redundant_label] [--sparsities 0,0.1,...,0.9]

Criteria (removal order):
  mean_activation: the lowest mean pooled activation over the probe set first.
  redundant_label: first the units whose label another unit of the layer carries with
    a higher score (lowest score first; the best unit of each label stays), then the
    rest by label score, lowest first.
Random: units in a seeded random order, averaged over --random_repeats orders.

A removed unit's output is zeroed inside the forward pass (editing.edited_forward);
every sparsity and every random order is evaluated in one pass over the probe images
(vmapped over the unit masks). Accuracy is against the probe labels where the probe
source has them, else against the unpruned model's predictions. Writes pruning.csv and
pruning.png (accuracy against sparsity, criterion beside random).
"""
import csv
import dataclasses
import io
import os
import sys
from typing import Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect import activations as activations_lib
from jaxdissect import entry
from jaxdissect import errors
from jaxdissect import rundir
from jaxdissect.applications import common
from jaxdissect.applications import editing

CRITERIA = ("mean_activation", "redundant_label")
DEFAULT_SPARSITIES = tuple(round(0.1 * i, 1) for i in range(10))
MASK_GROUP = 8  # unit masks evaluated together per batch (memory: group x batch)


def redundant_label_order(labels: Sequence[str], scores: np.ndarray) -> np.ndarray:
  """(num_units,) removal order: units whose label a higher-scoring unit also carries,
  lowest score first, then the others by score, lowest first. Ties: lower unit id."""
  scores = np.asarray(scores, np.float64)
  units = np.arange(len(labels))
  best_of_label = {}
  for unit in sorted(units, key=lambda u: (-scores[u], u)):
    best_of_label.setdefault(labels[unit], unit)
  redundant = [u for u in units if best_of_label[labels[u]] != u]
  kept = [u for u in units if best_of_label[labels[u]] == u]
  by_score = lambda group: sorted(group, key=lambda u: (scores[u], u))  # noqa: E731
  return np.array(by_score(redundant) + by_score(kept), np.int64)


def mean_activation_order(activations) -> np.ndarray:
  """(num_units,) lowest mean activation first; activations: (num_images, num_units),
  read in chunks (it may be memory-mapped). Ties: lower unit id."""
  total = np.zeros(activations.shape[1], np.float64)
  for start in range(0, activations.shape[0], 65536):
    total += np.asarray(activations[start:start + 65536], np.float64).sum(axis=0)
  return np.lexsort((np.arange(len(total)), total / max(1, activations.shape[0])))


def masks_for(order: np.ndarray, num_units: int, sparsities: Sequence[float]) -> np.ndarray:
  """(len(sparsities), num_units) float32: 0 for the first round(s * K) units of order."""
  masks = np.ones((len(sparsities), num_units), np.float32)
  for row, sparsity in enumerate(sparsities):
    masks[row, order[:int(round(sparsity * num_units))]] = 0.0
  return masks


@dataclasses.dataclass
class PruningCurve:
  criterion: str
  sparsities: list[float]
  units_removed: list[int]
  accuracy: np.ndarray  # (sparsities,)
  random_accuracy: np.ndarray  # (repeats, sparsities)
  class_source: str

  def to_csv(self) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["criterion", "sparsity", "units_removed", "accuracy",
                     "random_accuracy_mean", "random_accuracy_std"])
    for i, sparsity in enumerate(self.sparsities):
      writer.writerow([self.criterion, f"{sparsity:g}", self.units_removed[i],
                       f"{self.accuracy[i]:.6f}",
                       f"{self.random_accuracy[:, i].mean():.6f}",
                       f"{self.random_accuracy[:, i].std():.6f}"])
    return out.getvalue()


def masked_predictions(run: rundir.Run, layer: str, masks: np.ndarray,
                       batch_size: int = 128) -> tuple[np.ndarray, np.ndarray, str]:
  """Predictions of the target with each (num_units,) mask applied to the layer's units
  in one pass over the probe images: ((num_masks, num_images) predicted class ids,
  (num_images,) true class ids, where the classes came from)."""
  target, path = run.target, run.layer_infos[layer].path

  @jax.jit
  def predictions(variables, pixels, mask_group):
    def with_mask(mask):
      return jnp.argmax(editing.edited_forward(target, {path: mask})(variables, pixels),
                        axis=-1)
    return jax.vmap(with_mask)(mask_group)

  # An all-ones mask first: the unpruned model's predictions (scaling by 1 is exact),
  # without a second forward pass in every group.
  masks = np.concatenate([np.ones((1, masks.shape[1]), np.float32), masks])
  groups = [masks[i:i + MASK_GROUP] for i in range(0, len(masks), MASK_GROUP)]
  # Equal group shapes: one compile.
  groups[-1] = np.concatenate(
      [groups[-1], np.ones((MASK_GROUP - len(groups[-1]), masks.shape[1]), np.float32)])
  predicted, indices = [], []
  logger = activations_lib.RateLogger(run.probe_set.num_images, "Masked pass",
                                      run.config.log_every_s)
  for batch in common.target_batches(run, batch_size):
    keep = batch["mask"]
    outs = [np.asarray(predictions(target.variables, batch["target_pixels"],
                                   jnp.asarray(g))) for g in groups]
    predicted.append(np.concatenate(outs)[:len(masks), keep])
    indices.append(batch["index"][keep])
    logger.update(int(keep.sum()))
  predicted = np.concatenate(predicted, axis=1)
  unpruned, predicted = predicted[0], predicted[1:]
  class_ids, source = common.class_ids_of_probe(run)
  if class_ids is None:
    class_ids, source = unpruned, "unpruned predictions"
  else:
    class_ids = class_ids[np.concatenate(indices)]
  return predicted, class_ids, source


def masked_accuracies(run: rundir.Run, layer: str, masks: np.ndarray,
                      batch_size: int = 128) -> tuple[np.ndarray, str]:
  """(num_masks,) probe accuracy of the target with each (num_units,) mask applied to
  the layer's units, and where the classes came from."""
  predicted, class_ids, source = masked_predictions(run, layer, masks, batch_size)
  return np.mean(predicted == class_ids[None, :], axis=1), source


def prune(run: rundir.Run, layer: str, criterion: str = "mean_activation",
          sparsities: Sequence[float] = DEFAULT_SPARSITIES, random_repeats: int = 3,
          seed: int = 0, batch_size: int = 128) -> PruningCurve:
  if layer not in run.layers:
    raise errors.UserError("layer", f"{layer!r} was not dissected in this run.",
                           f"use one of {', '.join(run.layers)}.")
  if criterion not in CRITERIA:
    raise errors.UserError("criterion", f"unknown criterion {criterion!r}.",
                           f"use one of {', '.join(CRITERIA)}.")
  bad = [s for s in sparsities if not 0.0 <= s <= 1.0]
  if bad or not sparsities:
    raise errors.UserError("sparsities", f"{bad or 'none'}: sparsities lie in [0, 1].",
                           "e.g. --sparsities 0,0.25,0.5,0.75.")
  num_units = run.layer_infos[layer].num_units
  if criterion == "mean_activation":
    order = mean_activation_order(run.probe().activations[layer])
  else:
    order = redundant_label_order(run.layers[layer].labels, run.layers[layer].scores)
  rng = np.random.default_rng(seed)
  random_orders = [rng.permutation(num_units) for _ in range(random_repeats)]
  masks = np.concatenate([masks_for(o, num_units, sparsities)
                          for o in [order] + random_orders])
  accuracy, source = masked_accuracies(run, layer, masks, batch_size)
  accuracy = accuracy.reshape(1 + random_repeats, len(sparsities))
  return PruningCurve(criterion, list(sparsities),
                      [int(round(s * num_units)) for s in sparsities], accuracy[0],
                      accuracy[1:], source)


def plot(curve: PruningCurve, layer: str, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  figure, axes = plt.subplots(figsize=(5.5, 3.8), dpi=120)
  axes.plot(curve.sparsities, curve.accuracy, "o-", label=curve.criterion)
  mean, std = curve.random_accuracy.mean(0), curve.random_accuracy.std(0)
  axes.plot(curve.sparsities, mean, "s--", color="gray",
            label=f"random ({len(curve.random_accuracy)} orders)")
  axes.fill_between(curve.sparsities, mean - std, mean + std, color="gray", alpha=0.2)
  axes.set_xlabel(f"share of {layer} units removed")
  axes.set_ylabel(f"accuracy ({curve.class_source})")
  axes.set_ylim(-0.02, 1.02)
  axes.grid(alpha=0.3)
  axes.legend()
  figure.tight_layout()
  temporary = f"{path}.tmp-{os.getpid()}.png"
  figure.savefig(temporary)
  plt.close(figure)
  os.replace(temporary, path)


def main(argv: Sequence[str] | None = None) -> int:
  parser = common.parser_for(
      "pruning", "Remove a layer's units by a criterion and plot probe accuracy against "
      "sparsity beside random removal.", units=False)
  parser.add_argument("--layer", required=True, help="a dissected layer")
  parser.add_argument("--criterion", default="mean_activation", choices=CRITERIA)
  parser.add_argument("--sparsities", default=",".join(f"{s:g}" for s in DEFAULT_SPARSITIES),
                      help="comma-separated shares of units to remove")
  parser.add_argument("--random_repeats", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--out", default=None, help="output folder (default: DIR/pruning)")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  try:
    try:
      sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    except ValueError:
      raise errors.UserError("sparsities", f"{args.sparsities!r} is not a list of numbers.",
                             "e.g. --sparsities 0,0.25,0.5.") from None
    run = rundir.load_run(args.results)
    curve = prune(run, args.layer, args.criterion, sparsities, args.random_repeats,
                  args.seed, args.batch_size)
  except errors.UserError as err:
    print(f"error: {err.one_line()}", file=sys.stderr)
    return 2
  out_dir = args.out or os.path.join(args.results, "pruning")
  os.makedirs(out_dir, exist_ok=True)
  stem = f"{args.layer}-{args.criterion}".replace("/", "_")
  csv_path = os.path.join(out_dir, f"{stem}.csv")
  temporary = f"{csv_path}.tmp-{os.getpid()}"
  with open(temporary, "w", encoding="utf-8", newline="") as f:
    f.write(curve.to_csv())
  os.replace(temporary, csv_path)
  plot(curve, args.layer, os.path.join(out_dir, f"{stem}.png"))
  print(curve.to_csv().rstrip())
  print(f"Written {csv_path} and {stem}.png.")
  return 0


if __name__ == "__main__":
  entry.run(main)

"""Neuron editing: ablate or scale units chosen by their label, inside the jitted forward
pass, and measure what it does to each class.

    python -m jaxdissect.applications.editing --results DIR \
        --units 'layer4:label=striped' [--scale 0] [--out edit.csv]

The units' outputs are multiplied by `scale` (0: ablation) where their module returns,
through flax's method interception: no parameter or module is changed, so any flax
target can be edited, and the edit composes with jit. For each class the report gives
the accuracy and the mean logit of the class over its images, before and after. The
class of an image is its probe label where the probe source has them (the synthetic
world, an ImageFolder-style folder), else the unedited model's prediction (then
"accuracy" is agreement with the unedited model).
"""
import csv
import dataclasses
import io
import os
import sys
from typing import Mapping, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect import entry
from jaxdissect import errors
from jaxdissect import rundir
from jaxdissect.applications import common
from jaxdissect.models import targets as targets_lib


def unit_factors(num_units: int, units: Sequence[int], scale: float) -> np.ndarray:
  """(num_units,) float32: `scale` at `units`, 1 elsewhere."""
  factors = np.ones(num_units, np.float32)
  factors[np.asarray(units, np.int64)] = scale
  return factors


def _scaled(output, factors):
  """The module output with its unit axis (last) multiplied by factors; for tuple or
  model outputs, the first array (the activation the dissection read)."""
  if isinstance(output, jax.Array):
    return output * factors.astype(output.dtype)
  if isinstance(output, tuple) and output:
    return (_scaled(output[0], factors),) + tuple(output[1:])
  if hasattr(output, "to_tuple"):
    first = type(output).__dataclass_fields__  # flax.struct / ModelOutput
    key = next(iter(first))
    return output.replace(**{key: _scaled(getattr(output, key), factors)})
  raise TypeError(f"cannot edit a module output of type {type(output).__name__}")


def edited_forward(target: targets_lib.TargetModel,
                   factors_by_path: Mapping[str, jax.Array]):
  """(variables, pixels) -> logits (batch, classes) with the units of each module path
  scaled by its factors (num_units,)."""
  wanted = {tuple(path.split("/")): path for path in factors_by_path}

  def interceptor(next_fun, args, kwargs, context):
    output = next_fun(*args, **kwargs)
    path = wanted.get(tuple(context.module.path))
    if context.method_name == "__call__" and path is not None:
      return _scaled(output, factors_by_path[path])
    return output

  def forward(variables, pixels):
    with nn.intercept_methods(interceptor):
      output, _ = target.forward(variables, pixels)
    return targets_lib.primary_array(output)

  return forward


@dataclasses.dataclass
class ClassEffect:
  """Per class: images, accuracy and mean logit of the class, before and after."""
  class_id: int
  name: str
  num_images: int
  accuracy_before: float
  accuracy_after: float
  logit_before: float
  logit_after: float


@dataclasses.dataclass
class EditReport:
  classes: list[ClassEffect]
  class_source: str  # "probe labels" or "unedited predictions"
  accuracy_before: float
  accuracy_after: float

  def effect(self, name: str) -> ClassEffect:
    return next(c for c in self.classes if c.name == name)

  def to_csv(self) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["class_id", "class", "images", "accuracy_before", "accuracy_after",
                     "accuracy_change", "logit_before", "logit_after", "logit_change"])
    for c in self.classes:
      writer.writerow([c.class_id, c.name, c.num_images, f"{c.accuracy_before:.6f}",
                       f"{c.accuracy_after:.6f}",
                       f"{c.accuracy_after - c.accuracy_before:.6f}",
                       f"{c.logit_before:.6f}", f"{c.logit_after:.6f}",
                       f"{c.logit_after - c.logit_before:.6f}"])
    return out.getvalue()

  def table(self, limit: int = 20) -> str:
    lines = [f"classes from {self.class_source}; accuracy {self.accuracy_before:.3f} -> "
             f"{self.accuracy_after:.3f}",
             f"{'class':<24} {'images':>6} {'acc before':>10} {'acc after':>9} "
             f"{'logit change':>12}"]
    ordered = sorted(self.classes, key=lambda c: c.accuracy_after - c.accuracy_before)
    for c in ordered[:limit]:
      lines.append(f"{c.name[:24]:<24} {c.num_images:>6} {c.accuracy_before:>10.3f} "
                   f"{c.accuracy_after:>9.3f} {c.logit_after - c.logit_before:>12.3f}")
    return "\n".join(lines)


def probe_logits(run: rundir.Run, factors_by_layer: Mapping[str, np.ndarray] | None,
                 batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
  """(num_images, classes) logits of the run's target on its probe images with the
  layers' units scaled (None: unedited), and the (num_images,) global indices read."""
  paths = {}
  for layer, factors in (factors_by_layer or {}).items():
    paths[run.layer_infos[layer].path] = jnp.asarray(factors)
  forward = jax.jit(edited_forward(run.target, paths))
  logits, indices = [], []
  for batch in common.target_batches(run, batch_size):
    out = np.asarray(forward(run.target.variables, batch["target_pixels"]))
    logits.append(out[batch["mask"]])
    indices.append(batch["index"][batch["mask"]])
  return np.concatenate(logits), np.concatenate(indices)


def compare(logits_before: np.ndarray, logits_after: np.ndarray, class_ids: np.ndarray,
            id2label: Mapping[int, str], class_source: str) -> EditReport:
  """Per-class accuracy and class-logit change. class_ids: (num_images,)."""
  predicted_before = logits_before.argmax(axis=1)
  predicted_after = logits_after.argmax(axis=1)
  rows = np.arange(len(class_ids))
  classes = []
  for class_id in sorted(set(class_ids.tolist())):
    of_class = class_ids == class_id
    classes.append(ClassEffect(
        int(class_id), str(id2label.get(class_id, class_id)), int(of_class.sum()),
        float(np.mean(predicted_before[of_class] == class_id)),
        float(np.mean(predicted_after[of_class] == class_id)),
        float(np.mean(logits_before[rows[of_class], class_id])),
        float(np.mean(logits_after[rows[of_class], class_id]))))
  return EditReport(classes, class_source, float(np.mean(predicted_before == class_ids)),
                    float(np.mean(predicted_after == class_ids)))


def edit_run(run: rundir.Run, units: Mapping[str, np.ndarray], scale: float = 0.0,
             batch_size: int = 128, baseline: tuple[np.ndarray, np.ndarray] | None = None
             ) -> EditReport:
  """Scales `units` ({layer: unit ids}) by `scale` and compares with the unedited
  model. baseline: the unedited (logits, indices) when already computed."""
  for layer in units:
    if layer not in run.layer_infos:
      raise errors.UserError("units", f"layer {layer!r} was not dissected in this run.",
                             f"use one of {', '.join(run.layer_infos)}.")
  factors = {layer: unit_factors(run.layer_infos[layer].num_units, ids, scale)
             for layer, ids in units.items()}
  before, indices = baseline if baseline is not None else probe_logits(run, None,
                                                                       batch_size)
  after, _ = probe_logits(run, factors, batch_size)
  class_ids, source = common.class_ids_of_probe(run)
  if class_ids is None:
    logging.info("Classes from the unedited model's predictions (%s).", source)
    class_ids, source = before.argmax(axis=1), "unedited predictions"
  else:
    class_ids = class_ids[indices]
  return compare(before, after, class_ids, run.target.id2label, source)


def main(argv: Sequence[str] | None = None) -> int:
  parser = common.parser_for(
      "editing", "Ablate or scale units chosen by label inside the forward pass and "
      "report per-class accuracy and logit changes on the probe set.", units=True)
  parser.add_argument("--scale", type=float, default=0.0,
                      help="multiply the units' outputs by this (0: ablate)")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--out", default=None,
                      help="CSV of per-class effects (default: DIR/editing.csv)")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  try:
    run = rundir.load_run(args.results)
    units = common.parse_unit_selection(args.units, run)
    report = edit_run(run, units, args.scale, args.batch_size)
  except errors.UserError as err:
    print(f"error: {err.one_line()}", file=sys.stderr)
    return 2
  out = args.out or os.path.join(args.results, "editing.csv")
  temporary = f"{out}.tmp-{os.getpid()}"
  with open(temporary, "w", encoding="utf-8", newline="") as f:
    f.write(report.to_csv())
  os.replace(temporary, out)
  chosen = "; ".join(f"{layer} units {', '.join(map(str, ids))}"
                     for layer, ids in units.items())
  print(f"Scaled by {args.scale:g}: {chosen}\n{report.table()}\nWritten to {out}.")
  return 0


if __name__ == "__main__":
  entry.run(main)

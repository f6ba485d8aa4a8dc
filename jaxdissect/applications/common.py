"""What the applications share: batches of a run's probe images for its target, with
each image's class where the probe source knows it."""
import argparse
from typing import Iterator

from absl import logging
import numpy as np

from jaxdissect import errors
from jaxdissect import rundir


UNITS_HELP = ("LAYER:label=CONCEPT, LAYER:3,17,42 or LAYER:all; several joined by ';'")


def parser_for(module: str, description: str, units: bool) -> argparse.ArgumentParser:
  """The arguments every application takes: --results (and --units)."""
  parser = argparse.ArgumentParser(prog=f"python -m jaxdissect.applications.{module}",
                                   description=description)
  parser.add_argument("--results", required=True, help="a result directory of main.py")
  if units:
    parser.add_argument("--units", required=True, help=UNITS_HELP)
  return parser


def target_batches(run: rundir.Run, batch_size: int, start: int = 0,
                   stop: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """The run's probe images in the target's preprocessing: dicts with target_pixels
  (B, h, w, 3), index (B,) global image index (-1: padding), mask (B,)."""
  transform = run.target.transform
  for batch in run.probe_set.batches(transform, transform, batch_size, start=start,
                                     stop=stop):
    yield {"target_pixels": batch["target_pixels"], "index": batch["index"],
           "mask": batch["mask"]}


def class_ids_of_probe(run: rundir.Run) -> tuple[np.ndarray | None, str]:
  """(num_images,) each probe image's class id in the target's id2label, and where the
  classes came from ("probe labels"); (None, reason) where the probe set has none."""
  id2label = run.target.id2label
  if not id2label:
    raise errors.UserError("target_model", f"{run.target.name} has no class names "
                           "(id2label), so there is no accuracy to report.",
                           "edit a classifier whose config.json has id2label.")
  names = run.probe_set.class_labels()
  if names is None:
    return None, "the probe set has no class labels"
  label2id = {label: i for i, label in id2label.items()}
  unknown = sorted({n for n in names if n not in label2id})
  if unknown:
    logging.warning("Probe class names %s are not classes of the target.", unknown[:5])
    return None, "the probe set's class names are not the target's"
  return np.array([label2id[n] for n in names], np.int64), "probe labels"


def parse_unit_selection(spec: str, run: rundir.Run) -> dict[str, np.ndarray]:
  """'LAYER:label=CONCEPT', 'LAYER:3,17,42' or 'LAYER:all', several joined by ';' ->
  {layer: sorted unit ids}."""
  out: dict[str, set[int]] = {}
  for part in [p.strip() for p in spec.split(";") if p.strip()]:
    layer, sep, what = part.partition(":")
    if not sep or layer not in run.layers:
      raise errors.UserError("units", f"{part!r} names no dissected layer.",
                             f"use LAYER:label=CONCEPT or LAYER:1,2,3 with LAYER one of "
                             f"{', '.join(run.layers)}.")
    labels = run.layers[layer].labels
    if what.startswith("label="):
      concept = what[len("label="):].strip()
      units = {u for u, label in enumerate(labels) if label.lower() == concept.lower()}
      if not units:
        present = sorted(set(labels))
        raise errors.UserError("units", f"no unit of {layer} is labelled {concept!r}.",
                               f"its labels include: {', '.join(present[:20])}.")
    elif what == "all":
      units = set(range(len(labels)))
    else:
      try:
        units = {int(u) for u in what.split(",") if u.strip()}
      except ValueError:
        raise errors.UserError("units", f"{part!r}: unit ids must be integers.",
                               "e.g. layer4:3,17,42 or layer4:label=striped.") from None
      bad = sorted(u for u in units if not 0 <= u < len(labels))
      if bad or not units:
        raise errors.UserError("units", f"{part!r}: {layer} has units 0..{len(labels) - 1}.",
                               "give unit ids in that range.")
    out.setdefault(layer, set()).update(units)
  if not out:
    raise errors.UserError("units", "no unit selected.", "e.g. layer4:label=striped.")
  return {layer: np.array(sorted(units)) for layer, units in out.items()}

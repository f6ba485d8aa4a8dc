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

"""A finished run, reopened from its result directory: what evaluate and the label
applications start from.

main.py writes config.json (the resolved config, the store keys) beside the CSVs; from
it the target model, the probe set and the stored activations and text embeddings are
found again, and the labels are read back from descriptions.csv and
descriptions_topk.csv.
"""
import csv
import dataclasses
import functools
import json
import os
from typing import Any

import ml_collections
import numpy as np

from jaxdissect import errors
from jaxdissect import store


@dataclasses.dataclass
class UnitLabels:
  """One layer's labels as written: labels (num_units,), scores (num_units,),
  alternatives (num_units, num_alternatives) concept strings, best first."""
  labels: list[str]
  scores: np.ndarray
  alternatives: list[list[str]]


@dataclasses.dataclass
class Run:
  result_dir: str
  config: ml_collections.ConfigDict
  meta: dict[str, Any]  # config.json as written
  layers: dict[str, UnitLabels]

  @functools.cached_property
  def target(self):
    from jaxdissect.models import targets as targets_lib  # pylint: disable=g-import-not-at-top
    return targets_lib.load_target(self.config.target_model,
                                   class_names=self.config.get("class_names", ""))

  @functools.cached_property
  def layer_infos(self):
    """{layer name: targets.LayerInfo} of the dissected layers."""
    infos = self.target.resolve_layers(list(self.layers))
    return {info.name: info for info in infos}

  @functools.cached_property
  def clip(self):
    from jaxdissect.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
    return clip_lib.load_clip(self.config.clip_model)

  @functools.cached_property
  def probe_set(self):
    from jaxdissect.data import probe as probe_lib  # pylint: disable=g-import-not-at-top
    return probe_lib.probe_set_from_config(self.config)

  def probe(self):
    """The stored probe pass (memory-mapped), or a UserError saying how to get it."""
    key = self.meta.get("probe_key", "")
    probe = store.load_probe(self.config.activation_dir, key, mmap=True) if key else None
    if probe is None:
      raise errors.UserError(
          "results", f"the stored activations of this run (key {key or '?'}) are not in "
          f"{self.config.activation_dir}.",
          "rerun main.py with the same config: it recomputes and stores them.")
    return probe

  def text(self) -> tuple[np.ndarray, list[str]]:
    key = self.meta.get("text_key", "")
    found = store.load_text(self.config.activation_dir, key) if key else None
    if found is None:
      raise errors.UserError(
          "results", f"the stored concept embeddings (key {key or '?'}) are not in "
          f"{self.config.activation_dir}.", "rerun main.py with the same config.")
    return found


def _read_csv(path: str) -> list[dict[str, str]]:
  with open(path, encoding="utf-8", newline="") as f:
    return list(csv.DictReader(f))


def load_run(result_dir: str, field: str = "results") -> Run:
  """Reads config.json and the label CSVs of a result directory."""
  config_path = os.path.join(result_dir, "config.json")
  if not os.path.isfile(config_path):
    raise errors.UserError(field, f"{result_dir!r} has no config.json.",
                           "give a result directory written by main.py "
                           "(<workdir>/results by default).")
  with open(config_path, encoding="utf-8") as f:
    meta = json.load(f)
  config = ml_collections.ConfigDict(meta["config"])
  layers: dict[str, UnitLabels] = {}
  for row in _read_csv(os.path.join(result_dir, "descriptions.csv")):
    layer = layers.setdefault(row["layer"], UnitLabels([], [], []))
    if int(row["unit"]) != len(layer.labels):
      raise errors.UserError(field, f"descriptions.csv of {result_dir!r} is out of order "
                             f"at layer {row['layer']} unit {row['unit']}.",
                             "rerun main.py; do not edit its CSVs.")
    layer.labels.append(row["description"])
    layer.scores.append(float(row["similarity"]))
    layer.alternatives.append([])
  topk_path = os.path.join(result_dir, "descriptions_topk.csv")
  if os.path.isfile(topk_path):
    for row in _read_csv(topk_path):
      layers[row["layer"]].alternatives[int(row["unit"])].append(row["concept"])
  for layer in layers.values():
    layer.scores = np.asarray(layer.scores)
  return Run(os.path.abspath(result_dir), config, meta, layers)

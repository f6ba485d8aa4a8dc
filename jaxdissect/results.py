"""The result of a dissection and the files a run writes, atomically.

Files (docs/DESIGN.md): descriptions.csv (layer,unit,description,similarity — the official
tool's format), descriptions_topk.csv, top_images.csv, config.json, report/.
"""
import csv
import ctypes
import dataclasses
import errno
import glob
import importlib.metadata
import io
import json
import os
import shutil
import tempfile
import platform
from typing import Any, Callable, Sequence

from absl import logging
import jax
import numpy as np

from jaxdissect import errors
from jaxdissect import resources


def _fmt(value: float) -> str:
  return f"{float(value):.6f}"


def _fmt_or_empty(value: float) -> str:
  return "" if value != value else _fmt(value)  # NaN: undefined (dead unit)


@dataclasses.dataclass
class DissectionResult:
  """Labels of every unit of every dissected layer.

  concepts: the concept set (num_concepts,). image_ids: probe image ids (num_images,).
  layers: layer name -> LayerLabels. scores: layer name -> (num_units, num_concepts).
  trust: layer name -> trust.UnitTrust (per-unit AUC, permutation p-value, label
    stability and each alternative's share of the bootstrap resamples).
  visibility: the concepts the probe images show (visibility.ConceptVisibility), the
    ones the explanations choose among; None where not computed.
  """
  concepts: list[str]
  image_ids: list[str]
  layers: dict[str, Any]  # labeling.LayerLabels
  scores: dict[str, Any] = dataclasses.field(default_factory=dict)
  trust: dict[str, Any] = dataclasses.field(default_factory=dict)
  visibility: Any = None  # visibility.ConceptVisibility: the concepts the probe shows

  def description_rows(self) -> list[dict[str, Any]]:
    return [{"layer": name, "unit": unit, "description": layer.labels[unit],
             "similarity": float(layer.label_scores[unit])}
            for name, layer in self.layers.items() for unit in range(layer.num_units)]

  def to_dataframe(self):
    """descriptions.csv as a pandas DataFrame."""
    import pandas as pd  # pylint: disable=g-import-not-at-top
    return pd.DataFrame(self.description_rows(),
                        columns=["layer", "unit", "description", "similarity"])

  def descriptions_csv(self) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["layer", "unit", "description", "similarity"])
    for row in self.description_rows():
      writer.writerow([row["layer"], row["unit"], row["description"],
                       _fmt(row["similarity"])])
    return out.getvalue()

  def trust_csv(self) -> str:
    """unit_trust.csv: each label beside its AUC, p-value, stability, correlation label,
    its linear explanation's held-out simulation and whether that is significant
    (explained: true/false); empty where undefined or not computed."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["layer", "unit", "description", "similarity", "auc", "p_value",
                     "stability", "correlation_label", "simulation", "explained"])
    for name, layer in self.layers.items():
      unit_trust = self.trust[name]
      stability = unit_trust.stability_or_nan()
      correlation = unit_trust.correlation_label
      explained = unit_trust.explanations
      for unit in range(layer.num_units):
        writer.writerow([name, unit, layer.labels[unit], _fmt(layer.label_scores[unit]),
                         _fmt_or_empty(unit_trust.auc[unit]),
                         _fmt_or_empty(unit_trust.p_value[unit]),
                         _fmt_or_empty(stability[unit]),
                         "" if correlation is None or correlation[unit] < 0
                         else self.concepts[correlation[unit]],
                         "" if explained is None
                         else _fmt_or_empty(explained.simulation[unit]),
                         "" if explained is None or layer.dead[unit] or layer.invalid[unit]
                         else str(bool(explained.explained[unit])).lower()])
    return out.getvalue()

  def extra_files(self) -> dict[str, str]:
    """{file name: contents} of the explanation files this result has."""
    files = {"explanations.csv": self.explanations_csv(),
             "explanations_simulator.csv": self.explanations_csv(simulator=True),
             "compositional.csv": self.compositional_csv(),
             "concept_visibility.csv": (None if self.visibility is None
                                        else self.visibility.to_csv(self.concepts))}
    return {name: text for name, text in files.items() if text is not None}

  def compositional_csv(self) -> str | None:
    """compositional.csv: layer,unit,expression,score,selection_share, each live unit's
    best expression (a concept, "X AND Y", "X OR Y" or the prompt "X Y"), its held-out
    correlation and the share of the bootstrap resamples that choose it again (empty
    without trust_bootstrap); None where no layer has them."""
    layers = {name: t.explanations.compositions for name, t in self.trust.items()
              if t.explanations is not None and t.explanations.compositions is not None}
    if not layers:
      return None
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["layer", "unit", "expression", "score", "selection_share"])
    for name in self.layers:
      if name in layers:
        found = layers[name]
        for unit, expression in enumerate(found.expression):
          if expression:
            writer.writerow([name, unit, expression, _fmt_or_empty(found.score[unit]),
                             "" if found.selection_share is None
                             else _fmt_or_empty(found.selection_share[unit])])
    return out.getvalue()

  def explanations_csv(self, simulator: bool = False) -> str | None:
    """explanations.csv (with simulator=True explanations_simulator.csv, fitted on the
    simulator's P): layer,unit,rank,concept,weight,selection_share, one row per
    concept of each unit's linear explanation (rank 1 = largest |weight|; weight
    multiplies the raw column of P; selection_share: the share of bootstrap resamples
    whose explanation also chooses the concept, empty where not computed); None where
    no layer has them."""
    layers = {name: t.explanations for name, t in self.trust.items()
              if t.explanations is not None}
    if simulator:
      layers = {name: found.simulator for name, found in layers.items()
                if found.simulator is not None}
    if not layers:
      return None
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["layer", "unit", "rank", "concept", "weight", "selection_share"])
    for name in self.layers:
      if name in layers:
        ids, weights = layers[name].linear.concept_ids, layers[name].linear.weights
        shares = layers[name].selection_share
        if shares is None:
          shares = np.full(ids.shape, np.nan)
        for unit in range(len(ids)):
          for rank in np.flatnonzero(ids[unit] >= 0):
            writer.writerow([name, unit, int(rank) + 1, self.concepts[ids[unit, rank]],
                             f"{float(weights[unit, rank]):.6g}",
                             _fmt_or_empty(shares[unit, rank])])
    return out.getvalue()

  def topk_csv(self) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["layer", "unit", "rank", "concept", "similarity", "resample_share"])
    for name, layer in self.layers.items():
      unit_trust = self.trust.get(name)
      shares = None if unit_trust is None else unit_trust.alternative_shares
      if shares is None:
        shares = np.full(layer.alternative_ids.shape, np.nan)
      for unit in range(layer.num_units):
        for rank, (cid, score) in enumerate(zip(layer.alternative_ids[unit],
                                                layer.alternative_scores[unit])):
          writer.writerow([name, unit, rank, self.concepts[cid], _fmt(score),
                           _fmt_or_empty(shares[unit, rank])])
    return out.getvalue()

  def top_images_csv(self) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["layer", "unit", "rank", "image_id", "activation"])
    for name, layer in self.layers.items():
      for unit in range(layer.num_units):
        for rank, (iid, value) in enumerate(zip(layer.top_image_ids[unit],
                                                layer.top_image_activations[unit])):
          writer.writerow([name, unit, rank, self.image_ids[iid], _fmt(value)])
    return out.getvalue()


def check_result_dir(result_dir: str, overwrite: bool) -> None:
  """Refuses a non-empty result_dir unless overwrite, and a place it cannot be written;
  called before any work. Puts back results that a replacement interrupted on a system
  without atomic exchange left aside."""
  _restore_interrupted(os.path.abspath(result_dir))
  if os.path.isfile(result_dir):
    raise errors.UserError("result_dir", f"{result_dir!r} is a file.",
                           "give a directory path.")
  if os.path.isdir(result_dir) and os.listdir(result_dir) and not overwrite:
    raise errors.UserError(
        "result_dir", f"{result_dir!r} already holds results.",
        "choose another --config.result_dir, or pass --config.overwrite=True to "
        "replace them.")
  check_writable(os.path.dirname(os.path.abspath(result_dir)), "result_dir",
                 shown=os.path.abspath(result_dir))


def check_output_dirs(config) -> None:
  """result_dir and activation_dir, before any model loads (see check_result_dir)."""
  check_result_dir(config.result_dir, config.overwrite)
  check_writable(config.activation_dir, "activation_dir")


def _check_writable_url(directory: str, field: str) -> None:
  """check_writable for a tf.io.gfile path (gs://...): a small file written and removed."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  probe_path = resources.join_path(directory, f".write-check-{os.getpid()}")
  try:
    tf.io.gfile.makedirs(directory)
    with tf.io.gfile.GFile(probe_path, "wb") as f:
      f.write(b"x")
    tf.io.gfile.remove(probe_path)
  except Exception as err:  # pylint: disable=broad-except
    message = " ".join(str(err).split())[:200]
    raise errors.UserError(field, f"cannot write to {directory} ({type(err).__name__}: "
                           f"{message}).", f"give a writable --config.{field} (for gs://, "
                           "credentials with write access to the bucket).") from None


def check_writable(directory: str, field: str, shown: str | None = None) -> None:
  """That files can be created in `directory` (made if missing); a UserError naming
  the cause (a file in the way, not writable, disk full) otherwise, about the path
  `shown` (default: directory). tf.io.gfile paths (gs://...) are checked through it."""
  if resources.is_url(directory):
    _check_writable_url(directory, field)
    return
  shown = shown or directory
  probe_path = directory
  while not os.path.exists(probe_path):
    probe_path = os.path.dirname(probe_path)
  if not os.path.isdir(probe_path):
    where = ("is a file" if probe_path == shown
             else f"is under {probe_path!r}, which is a file")
    raise errors.UserError(field, f"{shown!r} {where}.",
                           f"point --config.{field} at a directory path.")
  try:
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-") as f:
      f.write(b"x")
      f.flush()
  except OSError as err:
    raise errors.from_os_error(field, err, "writing a first file") from None


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: str, b: str) -> bool:
  """Swaps two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where
  the system or filesystem cannot."""
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):
    return False
  if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  code = ctypes.get_errno()
  if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
    return False
  raise OSError(code, os.strerror(code), b)


def _aside_prefix(result_dir: str) -> str:
  return os.path.join(os.path.dirname(result_dir), f".{os.path.basename(result_dir)}.old-")


def _restore_interrupted(result_dir: str) -> None:
  if os.path.exists(result_dir):
    return
  for aside in sorted(glob.glob(_aside_prefix(result_dir) + "*/previous")):
    os.rename(aside, result_dir)
    logging.warning("Restored %s: a replacement of it was interrupted.", result_dir)
    shutil.rmtree(os.path.dirname(aside), ignore_errors=True)
    return


def write_result_dir(result_dir: str, overwrite: bool,
                     write_contents: Callable[[str], None]) -> str:
  """Writes into a temp dir beside result_dir, then swaps it into place: at every
  instant either the old or the new results are whole at result_dir."""
  result_dir = os.path.abspath(result_dir)
  check_result_dir(result_dir, overwrite)
  parent = os.path.dirname(result_dir)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(result_dir)}.tmp-", dir=parent)
  try:
    write_contents(tmp)
    os.chmod(tmp, 0o755)
    if not os.path.isdir(result_dir):
      os.rename(tmp, result_dir)
    elif _exchange(tmp, result_dir):
      shutil.rmtree(tmp, ignore_errors=True)  # now the old results
    else:  # two renames; check_result_dir puts the old back if killed between them
      old = tempfile.mkdtemp(prefix=os.path.basename(_aside_prefix(result_dir)), dir=parent)
      os.rename(result_dir, os.path.join(old, "previous"))
      os.rename(tmp, result_dir)
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return result_dir


def write_files(directory: str, result: DissectionResult, config_json: dict[str, Any],
                write_report: Callable[[str, DissectionResult], None] | None,
                skipped: Sequence[tuple[int, str, str]] = ()) -> None:
  """Every result file into `directory`; skipped: (global index, image id, reason) of
  the probe images that could not be used (skipped_images.csv, only when there are
  some)."""
  with open(os.path.join(directory, "descriptions.csv"), "w", encoding="utf-8",
            newline="") as f:
    f.write(result.descriptions_csv())
  with open(os.path.join(directory, "descriptions_topk.csv"), "w", encoding="utf-8",
            newline="") as f:
    f.write(result.topk_csv())
  with open(os.path.join(directory, "top_images.csv"), "w", encoding="utf-8",
            newline="") as f:
    f.write(result.top_images_csv())
  if result.trust and set(result.trust) >= set(result.layers):
    with open(os.path.join(directory, "unit_trust.csv"), "w", encoding="utf-8",
              newline="") as f:
      f.write(result.trust_csv())
    for name, text in result.extra_files().items():
      with open(os.path.join(directory, name), "w", encoding="utf-8", newline="") as f:
        f.write(text)
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config_json, f, indent=2, sort_keys=True, default=str)
  if skipped:
    with open(os.path.join(directory, "skipped_images.csv"), "w", encoding="utf-8",
              newline="") as f:
      writer = csv.writer(f, lineterminator="\n")
      writer.writerow(["index", "id", "reason"])
      writer.writerows(skipped)
  if write_report is not None:
    write_report(os.path.join(directory, "report"), result)


def environment() -> dict[str, Any]:
  """Package versions and devices, for config.json."""
  import flax  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  versions = {"python": platform.python_version(), "jax": jax.__version__,
              "flax": flax.__version__, "transformers": transformers.__version__,
              "numpy": np.__version__}
  # Read from the installed distribution, not by importing it: a run that never used
  # tf.data (the synthetic default) spent 3.4 s importing TensorFlow here.
  for distribution in ("tensorflow", "tensorflow-cpu"):
    try:
      versions["tensorflow"] = importlib.metadata.version(distribution)
      break
    except importlib.metadata.PackageNotFoundError:
      pass
  return {"versions": versions, "devices": [str(d) for d in jax.devices()],
          "process_count": jax.process_count()}

"""The activation store: probe activations and text embeddings keyed by a fingerprint.

Layout under activation_dir:
  probe-<key>/manifest.json, image_embeddings.npy, image_ids.json, layer-<i>.npy,
      top-<i>-{values,ids,minimum,maximum,finite}.npy (the running top-k of layer i)
  partial-<key>/chunk-<start>-<stop>/ the same files for the images start..stop-1,
      saved while the probe pass runs and deleted once probe-<key> is written
  text-<key>/manifest.json, text_embeddings.npy, concepts.json
The key is a hash of everything that changes the stored values (models and their
weights, layers, pooling, probe identity, preprocessing, counts, format version), so a
stale entry can never be returned. Entries are written to a temporary directory and
renamed into place, so a killed run leaves no half-written entry; the manifest holds a
sha256 per file and a damaged entry is recomputed, never read.

activation_dir may be any tf.io.gfile path (gs://bucket/dir on TPU VMs): an entry is
written locally, then uploaded file by file with its manifest last (an entry without a
manifest does not exist), and read through a verified local copy under
JAXDISSECT_CACHE/store, which is memory-mapped like a local entry.
"""
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

from absl import logging
import numpy as np

from jaxdissect import resources
from jaxdissect import topk as topk_lib

FORMAT_VERSION = 2
TOP_FIELDS = ("values", "ids", "minimum", "maximum", "finite")


@dataclasses.dataclass
class ProbeActivations:
  """Everything the similarity needs from the images.

  image_embeddings: (num_images, dim) L2-normalised CLIP image embeddings.
  activations: layer name -> (num_images, num_units) pooled activations.
  image_ids: (num_images,) ids in global index order.
  skipped: global indices of probe images that could not be decoded (not in the rows).
  top: layer name -> the running top-k and statistics (global image ids), or {} when
    not kept (then computed from the activations, see top_for).
  """
  image_embeddings: np.ndarray
  activations: dict[str, np.ndarray]
  image_ids: list[str]
  skipped: list[int] = dataclasses.field(default_factory=list)
  top: dict[str, topk_lib.RunningTopK] = dataclasses.field(default_factory=dict)

  def top_for(self, layer: str, k: int) -> topk_lib.RunningTopK:
    """The layer's top-k with ids as rows of `activations` (skipped images removed)."""
    running = self.top.get(layer)
    if running is None or running.k < k:
      # Not kept, or fewer than asked for: from the stored matrix, read in chunks.
      return topk_lib.from_activations(self.activations[layer], k)
    return topk_lib.RunningTopK(running.values[:k], topk_lib.rows_of(
        running.ids[:k].astype(np.int64), self.skipped).astype(np.int32),
                            running.minimum, running.maximum, running.finite)


def fingerprint(parts: dict[str, Any]) -> str:
  blob = json.dumps({"format_version": FORMAT_VERSION, **parts}, sort_keys=True,
                    default=str)
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def listdir(root: str) -> list[str]:
  """Names in a store directory, local or remote; [] where it does not exist."""
  try:
    if resources.is_url(root):
      return [n.rstrip("/") for n in _gfile().listdir(root)]
    return os.listdir(root)
  except Exception:  # pylint: disable=broad-except
    return []


def _remove(path: str) -> None:
  if resources.is_url(path):
    try:
      _gfile().rmtree(path)
    except Exception:  # pylint: disable=broad-except
      pass
  else:
    shutil.rmtree(path, ignore_errors=True)


def _local_mirror(root: str, name: str) -> str:
  """Where the local, verified copy of a remote entry lives."""
  digest = hashlib.sha256(root.rstrip("/").encode("utf-8")).hexdigest()[:16]
  return os.path.join(resources.cache_root(), "store", digest, name)


def _upload(local: str, remote: str) -> None:
  gfile = _gfile()
  if gfile.exists(resources.join_path(remote, "manifest.json")):
    return  # another run sharing the store finished the same entry (same contents)
  gfile.makedirs(remote)
  names = sorted(os.listdir(local), key=lambda n: n == "manifest.json")  # manifest last
  for filename in names:
    gfile.copy(os.path.join(local, filename), resources.join_path(remote, filename), overwrite=True)


def _download(remote: str, local: str) -> None:
  """Copies a remote entry to `local` (replacing an older copy), manifest last."""
  gfile = _gfile()
  parent = os.path.dirname(local)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(local)}-", dir=parent)
  try:
    names = sorted((n.rstrip("/") for n in gfile.listdir(remote)),
                   key=lambda n: n == "manifest.json")
    for filename in names:
      gfile.copy(resources.join_path(remote, filename), os.path.join(tmp, filename), overwrite=True)
    shutil.rmtree(local, ignore_errors=True)
    os.rename(tmp, local)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _write_entry(root: str, name: str, arrays: dict[str, Any],
                 jsons: dict[str, Any], meta: dict[str, Any]) -> str:
  """Writes files into a temp dir beside the entry, then renames it into place (remote
  roots: written locally, then uploaded with the manifest last).

  arrays: file name -> an array, or a callable writer(path) that writes the .npy file
  itself (to stream an array too large for memory).
  """
  if resources.is_url(root):
    local = _local_mirror(root, name)
    _write_entry(os.path.dirname(local), name, arrays, jsons, meta)
    _upload(local, resources.join_path(root, name))
    return resources.join_path(root, name)
  os.makedirs(root, exist_ok=True)
  final = os.path.join(root, name)
  tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root)
  try:
    files = {}
    for filename, array in arrays.items():
      path = os.path.join(tmp, filename)
      if callable(array):
        array(path)
      else:
        np.save(path, np.ascontiguousarray(array), allow_pickle=False)
      files[filename] = resources.sha256_of(path)
    for filename, value in jsons.items():
      path = os.path.join(tmp, filename)
      with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f)
      files[filename] = resources.sha256_of(path)
    with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
      json.dump({"format_version": FORMAT_VERSION, "files": files, **meta}, f, indent=1)
    try:
      os.rename(tmp, final)
    except OSError:
      if not os.path.isdir(final):
        raise
      # Another run sharing the store finished the same entry first (same key: same
      # contents); its copy stands.
      shutil.rmtree(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return final


def _read_entry(root: str, name: str,
                verify: bool = True) -> tuple[str, dict[str, Any]] | None:
  """Returns (dir, manifest) if the entry exists and (verify) every checksum matches;
  for a remote root, dir is the verified local copy."""
  if resources.is_url(root):
    return _read_remote_entry(root, name, verify)
  entry = os.path.join(root, name)
  manifest_path = os.path.join(entry, "manifest.json")
  if not os.path.isfile(manifest_path):
    return None
  try:
    with open(manifest_path, encoding="utf-8") as f:
      manifest = json.load(f)
    for filename, digest in manifest["files"].items():
      if verify and resources.sha256_of(os.path.join(entry, filename)) != digest:
        raise ValueError(f"checksum mismatch in {filename}")
  except (OSError, ValueError, KeyError) as err:
    logging.warning("Store entry %s is damaged (%s); recomputing it.", entry, err)
    shutil.rmtree(entry, ignore_errors=True)
    return None
  return entry, manifest


def _read_remote_entry(root: str, name: str,
                       verify: bool) -> tuple[str, dict[str, Any]] | None:
  remote = resources.join_path(root, name)
  try:
    with _gfile().GFile(resources.join_path(remote, "manifest.json"), "rb") as f:
      remote_manifest = f.read()
  except Exception:  # pylint: disable=broad-except
    return None  # not there (or not finished: the manifest is uploaded last)
  local = _local_mirror(root, name)
  manifest_path = os.path.join(local, "manifest.json")
  fresh = False
  if not (os.path.isfile(manifest_path) and open(manifest_path, "rb").read() ==
          remote_manifest):
    _download(remote, local)
    fresh = True
  found = _read_entry(os.path.dirname(local), name, verify or fresh)
  if found is None:
    logging.warning("Store entry %s is damaged; recomputing it.", remote)
    _remove(remote)
  return found


def _save_probe_entry(root: str, name: str, probe: ProbeActivations,
                      meta: dict[str, Any]) -> str:
  layer_names = list(probe.activations)
  arrays = {"image_embeddings.npy": probe.image_embeddings}
  for i, layer in enumerate(layer_names):
    arrays[f"layer-{i}.npy"] = probe.activations[layer]
    if layer in probe.top:
      arrays.update(_top_arrays(i, probe.top[layer]))
  return _write_entry(root, name, arrays, {"image_ids.json": probe.image_ids,
                                           "skipped.json": probe.skipped},
                      {"layers": layer_names, **meta})


def _top_arrays(i: int, top: topk_lib.RunningTopK) -> dict[str, np.ndarray]:
  return {f"top-{i}-{field}.npy": getattr(top, field) for field in TOP_FIELDS}


def save_probe(root: str, key: str, probe: ProbeActivations,
               meta: dict[str, Any]) -> str:
  return _save_probe_entry(root, f"probe-{key}", probe, meta)


def load_probe(root: str, key: str,
               mmap: bool = False) -> ProbeActivations | None:
  return _load_probe_entry(root, f"probe-{key}", mmap)


def _chunk_root(root: str, key: str) -> str:
  return resources.join_path(root, f"partial-{key}")


def _chunk_name(start: int, stop: int) -> str:
  return f"chunk-{start:012d}-{stop:012d}"


def save_probe_chunk(root: str, key: str, start: int, stop: int,
                     probe: ProbeActivations) -> str:
  """Saves images start..stop-1 of an unfinished pass; raises OSError if it cannot
  (the caller checks whether another run sharing the store finished the pass)."""
  return _save_probe_entry(_chunk_root(root, key), _chunk_name(start, stop), probe,
                           {"start": start, "stop": stop})


def load_probe_chunk(root: str, key: str, start: int, stop: int,
                     mmap: bool = False) -> ProbeActivations | None:
  return _load_probe_entry(_chunk_root(root, key), _chunk_name(start, stop), mmap)


def remove_probe_chunks(root: str, key: str) -> None:
  """Removes the finished chunks of a pass whose entry is written. Another run sharing
  the store may be writing a chunk of the same pass (a .tmp-* directory): that one is
  left alone, and so is the folder holding it."""
  folder = _chunk_root(root, key)
  for name in listdir(folder):
    if name.startswith("chunk-"):
      _remove(resources.join_path(folder, name))
      if resources.is_url(root):
        shutil.rmtree(_local_mirror(folder, name), ignore_errors=True)
  if resources.is_url(root):
    if not listdir(folder):
      _remove(folder)
  else:
    try:
      os.rmdir(folder)
    except OSError:
      pass  # not empty (another run's chunk in progress), or gone


def _load_probe_entry(root: str, name: str, mmap: bool = False,
                      verify: bool = True) -> ProbeActivations | None:
  """mmap: the (num_images, ...) arrays stay on disk (np.memmap), read as they are used.
  verify=False skips the checksums, for an entry this process has just written."""
  found = _read_entry(root, name, verify)
  if found is None:
    return None
  entry, manifest = found
  mode = "r" if mmap else None
  embeddings = np.load(os.path.join(entry, "image_embeddings.npy"), mmap_mode=mode)
  layers = {name: np.load(os.path.join(entry, f"layer-{i}.npy"), mmap_mode=mode)
            for i, name in enumerate(manifest["layers"])}
  top = {}
  for i, layer in enumerate(manifest["layers"]):
    if f"top-{i}-ids.npy" in manifest["files"]:
      top[layer] = topk_lib.RunningTopK(**{
          field: np.load(os.path.join(entry, f"top-{i}-{field}.npy"))
          for field in TOP_FIELDS})
  with open(os.path.join(entry, "image_ids.json"), encoding="utf-8") as f:
    image_ids = json.load(f)
  skipped = []
  if "skipped.json" in manifest["files"]:
    with open(os.path.join(entry, "skipped.json"), encoding="utf-8") as f:
      skipped = json.load(f)
  return ProbeActivations(embeddings, layers, image_ids, skipped, top)


def assemble_probe(root: str, key: str, chunks: list[tuple[int, int]],
                   meta: dict[str, Any]) -> ProbeActivations:
  """Writes probe-<key> from its saved chunks, one chunk in memory at a time, and
  returns it memory-mapped: a million-image pass never holds its matrices in RAM.
  Every chunk must be saved (save_probe_chunk) before."""
  existing = _load_probe_entry(root, f"probe-{key}", mmap=True)
  if existing is not None:  # another run sharing the store assembled it first
    return existing

  parts = []
  for start, stop in chunks:
    # Each chunk is verified once and memory-mapped; the writers read it from there.
    part = load_probe_chunk(root, key, start, stop, mmap=True)
    if part is None:
      # Another run sharing the store may have finished the pass and removed its chunks.
      existing = _load_probe_entry(root, f"probe-{key}", mmap=True)
      if existing is not None:
        return existing
      raise FileNotFoundError(f"chunk {start}..{stop - 1} of probe-{key} is missing")
    parts.append(part)
  layer_names = list(parts[0].activations)
  image_ids = [image_id for part in parts for image_id in part.image_ids]
  skipped = [index for part in parts for index in part.skipped]
  num_rows = len(image_ids)

  def writer(get):
    """A writer that copies one array of every chunk into one .npy, in order."""
    def write(path):
      out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                      shape=(num_rows, *get(parts[0]).shape[1:]))
      row = 0
      for part in parts:
        block = get(part)
        out[row:row + len(block)] = block
        row += len(block)
      out.flush()
      del out
    return write

  arrays = {"image_embeddings.npy": writer(lambda p: p.image_embeddings)}
  for i, name in enumerate(layer_names):
    arrays[f"layer-{i}.npy"] = writer(lambda p, name=name: p.activations[name])
    arrays.update(_top_arrays(i, topk_lib.merge([part.top[name] for part in parts])))
  _write_entry(root, f"probe-{key}", arrays, {"image_ids.json": image_ids,
                                               "skipped.json": skipped},
               {"layers": layer_names, **meta})
  # Its checksums were just computed from these files, and the chunks it was copied from
  # were verified: reading every byte again would only cost time.
  return _load_probe_entry(root, f"probe-{key}", mmap=True, verify=False)


def save_text(root: str, key: str, embeddings: np.ndarray, concepts: list[str],
              meta: dict[str, Any]) -> str:
  return _write_entry(root, f"text-{key}", {"text_embeddings.npy": embeddings},
                      {"concepts.json": concepts}, meta)


def load_text(root: str, key: str) -> tuple[np.ndarray, list[str]] | None:
  found = _read_entry(root, f"text-{key}")
  if found is None:
    return None
  entry, _ = found
  with open(os.path.join(entry, "concepts.json"), encoding="utf-8") as f:
    concepts = json.load(f)
  return np.load(os.path.join(entry, "text_embeddings.npy")), concepts

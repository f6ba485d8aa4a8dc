"""Probe image sources and the one-pass tf.data pipeline that feeds the probe step.

Sources: `tfds:NAME[:VERSION]:SPLIT` (tfds.load, honouring TFDS_DATA_DIR), `folder:PATH`
(recursive, the extensions of decode.IMAGE_EXTENSIONS, sorted by relative path; PATH
may be any tf.io.gfile path such as gs://bucket/dir), and in-memory arrays (Python API).
Each image is decoded once (data/decode.py: upright, RGB, as PIL shows it) and passed
through two transforms (CLIP's and the target's);
batches have a fixed size, the last one padded, with a mask that marks real images.
Every image carries its global index (position in the concatenated sources) and an id
(relative file name or TFDS key) that ends up in top_images.csv.
"""
import collections
import concurrent.futures
import dataclasses
import os
import re
from typing import Any, Callable, Iterator, Sequence

from absl import logging
import numpy as np

from jaxdissect import errors
from jaxdissect import resources
from jaxdissect import sharding
from jaxdissect.data import broden
from jaxdissect.data import decode
from jaxdissect.data import preprocessing

IMAGE_EXTENSIONS = decode.IMAGE_EXTENSIONS
_TFDS_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


@dataclasses.dataclass
class ProbeSource:
  """One source of probe images.

  Attributes:
    description: the spec it came from, e.g. "folder:/data/probe".
    num_images: how many images it yields.
    identity: what the activation-store fingerprint hashes for it.
    make_dataset: () -> tf.data.Dataset of records {"image_id": str, payload_key: ...},
      not yet decoded, so that skipping records (a resumed chunk, another shard) costs
      no decode.
    payload_key: the record field that `load` reads.
    load: (that field as NumPy, decode.Limits) -> an RGB image (PIL or uint8 (H, W, 3)),
      run in Python; a record it fails on raises decode.BadImage with the reason, and
      is skipped and reported, not fatal.
    image_ids: every image's id where known before reading (file names), else None.
    class_labels: every image's class name where the source knows it (the synthetic
      world's shape; a folder's class subfolder), else None. Only the label
      applications read it (accuracy under editing and pruning).
    annotations: (words, (num_images, len(words)) float32, 1 where the image shows the
      word) where the source knows what each image shows (the synthetic world), else
      None. evaluation.json's ground truth for every layer ("gt_" keys) reads it.
  """
  description: str
  num_images: int
  identity: dict[str, Any]
  make_dataset: Callable[[], Any]
  payload_key: str
  load: Callable[[Any, decode.Limits], Any]
  image_ids: Sequence[str] | None = None
  class_labels: Sequence[str] | None = None
  annotations: tuple[list[str], np.ndarray] | None = None


# The paper's probe sets by name. Broden has no TFDS builder: its directory comes from
# the BRODEN_DIR environment variable.
NAMED_PROBE_SETS = {
    "imagenet_val": "tfds:imagenet2012:validation",
    "cifar100_train": "tfds:cifar100:train",
    "places365_val": "tfds:places365_small:validation",
    "broden": "broden:$BRODEN_DIR",
    "imagenet_broden": "imagenet_val+broden",
}
_KINDS = ("tfds", "folder", "broden", "synthetic")
# A "+" joins sources only where a source starts after it, so paths may hold "+".
_UNION = re.compile(r"\+(?=(?:%s):|(?:%s)(?:$|[+,]))" % (
    "|".join(_KINDS), "|".join(NAMED_PROBE_SETS)))


def expand_probe_spec(spec: str, field: str = "d_probe") -> list[str]:
  """d_probe -> one spec per source: "," or "+" separate sources, named sets expand."""
  parts = []
  for piece in str(spec).split(","):
    for part in _UNION.split(piece):
      part = part.strip()
      if part in NAMED_PROBE_SETS:
        parts.extend(expand_probe_spec(NAMED_PROBE_SETS[part], field))
      elif part:
        parts.append(part)
  expanded = []
  for part in parts:
    if "$BRODEN_DIR" in part:
      broden_dir = os.environ.get("BRODEN_DIR", "")
      if not broden_dir:
        raise errors.UserError(field, "the named probe set needs Broden, and BRODEN_DIR "
                               "is not set.", "download broden1_224 (NetDissect) and "
                               "export BRODEN_DIR=/path/to/broden1_224, or use broden:PATH.")
      part = part.replace("$BRODEN_DIR", broden_dir)
    expanded.append(part)
  return expanded


def parse_probe_spec(spec: str, field: str = "d_probe") -> list[ProbeSource]:
  """Sources joined by "," or "+" (and the named sets of NAMED_PROBE_SETS) ->
  ProbeSource list, in order."""
  parts = expand_probe_spec(spec, field)
  if not parts:
    raise errors.UserError(field, "no probe source given.",
                           "use tfds:NAME:SPLIT or folder:PATH (comma-separated).")
  sources = []
  for part in parts:
    kind, _, rest = part.partition(":")
    if kind == "folder" and rest:
      sources.append(folder_source(rest, field))
    elif kind == "broden" and rest:
      sources.append(broden_source(rest, field))
    elif kind == "synthetic" and rest:
      sources.append(synthetic_source(rest, field))
    elif kind == "tfds" and rest:
      name, _, split = rest.partition(":")
      head, _, tail = split.partition(":")
      if _TFDS_VERSION.match(head) and tail:
        name, split = f"{name}:{head}", tail
      if not name or not split:
        raise errors.UserError(field, f"{part!r} is not tfds:NAME:SPLIT.",
                               "e.g. tfds:imagenet2012:validation.")
      sources.append(tfds_source(name, split, field))
    else:
      raise errors.UserError(field, f"unknown probe source {part!r}.",
                             "use tfds:NAME:SPLIT, folder:PATH, broden:PATH, "
                             "synthetic:SET:N or a named set "
                             f"({', '.join(NAMED_PROBE_SETS)}), joined by , or +.")
  return sources


def printable(name: str) -> str:
  """A file name as text: bytes that are not UTF-8 (os's surrogate escapes) as \\xNN."""
  return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _walk(root: str):
  if resources.is_url(root):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return ((d, sorted(dirs), files) for d, dirs, files in tf.io.gfile.walk(root))
  return os.walk(root)  # symlinked directories are not followed


def list_image_files(root: str) -> list[str]:
  """Relative paths ("/"-separated) of the images under root, recursively, sorted."""
  return _list_files(root)[0]


def _list_files(root: str) -> tuple[list[str], collections.Counter, collections.Counter]:
  """(image paths, their count by extension, other files' count by extension)."""
  found, kept, ignored = [], collections.Counter(), collections.Counter()
  for directory, dirnames, filenames in _walk(root):
    dirnames.sort()
    for filename in filenames:
      extension = os.path.splitext(filename)[1].lower()
      if extension in IMAGE_EXTENSIONS:
        found.append(resources.join_path(directory, filename)[len(root):].lstrip("/" + os.sep))
        kept[extension] += 1
      else:
        ignored[extension or "(none)"] += 1
  return sorted(p.replace(os.sep, "/") for p in found), kept, ignored


def _counts(counter: collections.Counter) -> str:
  return ", ".join(f"{n} {ext}" for ext, n in sorted(counter.items(), key=lambda e: -e[1]))


def folder_source(path: str, field: str = "d_probe") -> ProbeSource:
  root = path if resources.is_url(path) else os.path.abspath(os.path.expanduser(path))
  if resources.is_url(root):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    root = root.rstrip("/")
    exists = tf.io.gfile.isdir(root)
  else:
    exists = os.path.isdir(root)
  if not exists:
    raise errors.UserError(field, f"probe folder {path!r} does not exist or is not a "
                           "directory.", "give folder:PATH of an existing directory of "
                           "images.")
  try:
    files, kept, ignored = _list_files(root)
  except OSError as err:
    raise errors.UserError(field, f"cannot list probe folder {path!r} ({err}).",
                           "make it readable.") from None
  if not files:
    raise errors.UserError(field, f"probe folder {path!r} holds no image files "
                           f"({'/'.join(IMAGE_EXTENSIONS)}).",
                           "put images in it (subfolders are searched) or use another "
                           "source.")
  logging.info("Probe folder %s: %d image file(s) (%s)%s.", path, len(files), _counts(kept),
               f"; {sum(ignored.values())} other file(s) ignored ({_counts(ignored)})"
               if ignored else "")
  source = _files_source(root, files, f"folder:{path}", "folder")
  # ImageFolder layout (root/CLASS/image.jpg): the subfolder names the class.
  if all("/" in rel for rel in files):
    source.class_labels = [printable(rel.split("/", 1)[0]) for rel in files]
  return source


def _stat(path: str) -> tuple[int, int]:
  """(size, mtime in ns) identifying a file without reading it; (-1, -1) where the path
  cannot be stat'ed (the pass will skip it with the reason)."""
  try:
    if resources.is_url(path):
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      info = tf.io.gfile.stat(path)
      return int(info.length), int(info.mtime_nsec)
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns
  except Exception:  # pylint: disable=broad-except
    return -1, -1


def _files_source(root: str, files: Sequence[str], description: str,
                  kind: str) -> ProbeSource:
  """Image files under root (relative paths, in probe order)."""
  paths = [resources.join_path(root, rel) for rel in files]
  ids = [printable(rel) for rel in files]
  if resources.is_url(root):
    # One request per file on a bucket: many at once, not a million in a row.
    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
      stats = list(pool.map(_stat, paths))
  else:
    stats = [_stat(path) for path in paths]
  listing = [[image_id, *stat] for image_id, stat in zip(ids, stats)]

  def make_dataset():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    # Only positions travel through TF: any file name (not UTF-8, say) stays in Python.
    return tf.data.Dataset.from_tensor_slices({
        "file": tf.range(len(paths), dtype=tf.int64), "image_id": ids})

  def load(position, limits: decode.Limits):
    return decode.decode_file(paths[int(position)], limits)

  return ProbeSource(description=description, num_images=len(files),
                     identity={"kind": kind, "root": printable(root), "files": listing},
                     make_dataset=make_dataset, payload_key="file", load=load,
                     image_ids=ids)


def broden_source(path: str, field: str = "d_probe") -> ProbeSource:
  """The images of a Broden dataset (Bau et al.; broden1_224 / broden1_227), in the order
  of its index.csv, whose `image` column names files under PATH/images. Only the images
  are read: CLIP-Dissect needs no segmentation labels."""
  root = os.path.abspath(os.path.expanduser(path))
  index = os.path.join(root, "index.csv")
  if not os.path.isfile(index):
    raise errors.UserError(field, f"no index.csv in Broden directory {path!r}.",
                           "give broden:PATH of an unpacked Broden dataset (e.g. "
                           "broden1_224, which holds index.csv and images/).")
  listed = broden.csv_column(index, "image", field, "index.csv")
  files = ["images/" + name for name in listed if name]
  if not files:
    raise errors.UserError(field, f"{index} lists no images.", "give a complete Broden "
                           "dataset.")
  missing = [rel for rel in files if not os.path.isfile(os.path.join(root, rel))]
  if missing:
    raise errors.UserError(field, f"{len(missing)} image(s) listed in {index} are "
                           f"missing, e.g. {missing[0]}.", "unpack the whole Broden "
                           "dataset.")
  return _files_source(root, files, f"broden:{path}", "broden")


def tfds_source(name: str, split: str, field: str = "d_probe") -> ProbeSource:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = os.environ.get("TFDS_DATA_DIR")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
      builder.download_and_prepare()
    num_images = builder.info.splits[split].num_examples
  except Exception as err:  # pylint: disable=broad-except
    message = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    raise errors.UserError(
        field, f"TFDS dataset {name!r} split {split!r} is not available "
        f"({type(err).__name__}: {message}).",
        "prepare it with `tfds build` (manual downloads go to TFDS_DATA_DIR/downloads/"
        "manual) and set TFDS_DATA_DIR, or use folder:PATH.") from None
  image_keys = [k for k, v in builder.info.features.items()
                if type(v).__name__ == "Image"]
  if not image_keys:
    raise errors.UserError(field, f"TFDS dataset {name!r} has no image feature.",
                           "use an image dataset.")
  image_key = "image" if "image" in image_keys else image_keys[0]

  def make_dataset():
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            read_config=tfds.ReadConfig(add_tfds_id=True),
                            decoders={image_key: tfds.decode.SkipDecoding()})
    return ds.map(lambda x: {"encoded": x[image_key], "image_id": x["tfds_id"]})

  return ProbeSource(
      description=f"tfds:{name}:{split}", num_images=int(num_images),
      identity={"kind": "tfds", "name": builder.info.full_name, "split": split,
                "num_examples": int(num_images)},
      make_dataset=make_dataset, payload_key="encoded", load=decode.decode_bytes)


def synthetic_source(spec: str, field: str = "d_probe") -> ProbeSource:
  """synthetic:SET:N[:SEED]: N rendered scenes of the synthetic world (SET: in_dist,
  shifted), ids synthetic-SET-SEED-i."""
  from jaxdissect.synthetic import world  # pylint: disable=g-import-not-at-top
  parts = spec.split(":")
  if (len(parts) not in (2, 3) or parts[0] not in world.PROBE_SETS
      or not all(p.isdigit() for p in parts[1:]) or int(parts[1]) < 1):
    raise errors.UserError(field, f"synthetic:{spec} is not synthetic:SET:N[:SEED].",
                           f"SET is one of {sorted(world.PROBE_SETS)}, e.g. "
                           "synthetic:in_dist:2000.")
  name, count = parts[0], int(parts[1])
  seed = int(parts[2]) if len(parts) == 3 else 0
  images, scenes, _ = world.render_probe_set(name, count, seed)
  source = array_source(images, [f"synthetic-{name}-{seed}-{i}" for i in range(count)],
                        description=f"synthetic:{spec}")
  # The shape classifier's class: the first object's shape.
  source.class_labels = [scene.objects[0].shape for scene in scenes]
  words = list(world.ATTRIBUTE_WORDS)
  source.annotations = (words, world.annotation_matrix(scenes, words))
  source.identity = {"kind": "synthetic", "spec": spec, "sha256":
                     source.identity["sha256"]}
  return source


def array_source(images: np.ndarray, image_ids: Sequence[str] | None = None,
                 description: str = "array") -> ProbeSource:
  """In-memory images (N, H, W, 3) uint8 (or float in [0, 1]) as a probe source."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
    raise errors.UserError("images", f"expected (N, H, W, 3) images, got {images.shape}.",
                           "pass an array of RGB images, channels last.")
  if images.dtype != np.uint8:
    if images.min() < 0 or images.max() > 1.0:
      raise errors.UserError("images", "float images must lie in [0, 1].",
                             "pass uint8 images or floats scaled to [0, 1].")
    images = np.round(images * 255).astype(np.uint8)
  if image_ids is None:
    image_ids = [str(i) for i in range(len(images))]
  image_ids = [str(i) for i in image_ids]
  if len(image_ids) != len(images):
    raise errors.UserError("image_ids", f"{len(image_ids)} ids for {len(images)} images.",
                           "give one id per image.")
  import hashlib  # pylint: disable=g-import-not-at-top
  digest = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
  # As PIL's convert("RGB"): grayscale repeated, alpha dropped.
  images = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images[..., :3]

  def make_dataset():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf.data.Dataset.from_tensor_slices({
        "row": tf.range(len(images), dtype=tf.int64), "image_id": image_ids})

  def load(row, limits: decode.Limits):
    del limits  # already in memory
    return images[int(row)]

  return ProbeSource(description=description, num_images=len(images),
                     identity={"kind": "array", "sha256": digest, "ids": image_ids},
                     make_dataset=make_dataset, payload_key="row", load=load,
                     image_ids=image_ids)


@dataclasses.dataclass
class ProbeSet:
  """The concatenation of sources, with global image indices; `limits` bound what one
  file may cost to read and decode."""
  sources: list[ProbeSource]
  limits: decode.Limits = decode.Limits()

  @property
  def num_images(self) -> int:
    return sum(s.num_images for s in self.sources)

  @property
  def identity(self) -> list[dict[str, Any]]:
    return [s.identity for s in self.sources]

  def class_labels(self) -> list[str] | None:
    """Every image's class name, if every source knows them."""
    if any(s.class_labels is None for s in self.sources):
      return None
    return [label for s in self.sources for label in s.class_labels]

  def annotations(self) -> tuple[list[str], np.ndarray] | None:
    """(words, (num_images, len(words))) if every source annotates the same words."""
    parts = [s.annotations for s in self.sources]
    if not parts or any(p is None or p[0] != parts[0][0] for p in parts):
      return None
    return parts[0][0], np.concatenate([p[1] for p in parts])

  def describe(self, index: int) -> str:
    """The id of image `index` where it is known without reading it, else its source."""
    for source in self.sources:
      if index < source.num_images:
        if source.image_ids is not None:
          return str(source.image_ids[index])
        return f"{source.description} #{index}"
      index -= source.num_images
    raise IndexError(index)

  def all_image_ids(self) -> list[str]:
    """Every image's id in global index order; sources that do not list their ids
    (TFDS) are read for them, without decoding any image."""
    ids = []
    for source in self.sources:
      if source.image_ids is not None:
        ids.extend(str(i) for i in source.image_ids)
      else:
        records = source.make_dataset().map(lambda x: x["image_id"])
        ids.extend(raw.decode("utf-8") for raw in records.as_numpy_iterator())
    return ids

  def _records(self, indices: Sequence[int]) -> Iterator[tuple[int, ProbeSource, Any]]:
    """(global index, its source, its payload) for `indices`, in index order; other
    records are skipped before decoding."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    wanted = sorted({int(i) for i in indices})
    offset = 0
    for source in self.sources:
      local = [i - offset for i in wanted if offset <= i < offset + source.num_images]
      if local:
        keep = tf.constant(local, tf.int64)
        part = source.make_dataset().enumerate().filter(
            lambda i, x, keep=keep: tf.reduce_any(tf.equal(i, keep))).map(
                lambda i, x, key=source.payload_key: (i, x[key]))
        for i, payload in part.as_numpy_iterator():
          yield int(i) + offset, source, payload
      offset += source.num_images

  def read_images(self, indices: Sequence[int],
                  transform: preprocessing.ImageTransform) -> dict[int, np.ndarray]:
    """{global index: (h, w, 3) float32 pixels after `transform`} for `indices`;
    undecodable images are left out."""
    out: dict[int, np.ndarray] = {}
    for index, source, payload in self._records(indices):
      try:
        out[index] = preprocessing.apply_transform(source.load(payload, self.limits),
                                                   transform)
      except decode.BadImage:
        pass
    return out

  def skip_reasons(self, indices: Sequence[int]) -> dict[int, str]:
    """{global index: why it cannot be used} for images the probe pass skipped, found
    by reading each again."""
    reasons = {int(i): "not found in its source" for i in indices}
    for index, source, payload in self._records(indices):
      try:
        source.load(payload, self.limits)
        reasons[index] = "could not be read during the pass (it can be now)"
      except decode.BadImage as err:
        reasons[index] = str(err)
    return reasons

  def batches(self, clip_transform: preprocessing.ImageTransform,
              target_transform: preprocessing.ImageTransform, batch_size: int,
              num_parallel_calls: int = -1, shard_index: int = 0,
              num_shards: int = 1, start: int = 0,
              stop: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-size batches: clip_pixels, target_pixels (B, h, w, 3) float32, index (B,)
    int64 global image index (-1 for padding), mask (B,) bool, image_id (B,) bytes.

    Only images start..stop-1 are read (a chunk of a resumable pass); the images before
    start are skipped before decoding. With num_shards > 1, batch_size is this
    process's share of a global batch of num_shards x batch_size consecutive images,
    and the process reads its slice of each (sharding.shard_offsets), padded to the
    same number of batches as every other shard. An image that cannot be decoded keeps
    its place as a masked blank row, so no image's batch position depends on another
    image's file.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    for name, transform in (("clip_model", clip_transform),
                            ("target_model", target_transform)):
      if transform.output_size is None:
        raise errors.UserError(name, "its image transform has no fixed output size.",
                               "its preprocessor_config.json needs crop_size or an exact "
                               "size.")
    stop = self.num_images if stop is None else min(stop, self.num_images)
    if not 0 <= start < stop:
      raise ValueError(f"empty image range [{start}, {stop}) of {self.num_images} images")
    count = stop - start
    global_batch = batch_size * num_shards
    num_batches = -(-count // global_batch)
    local_count = len(sharding.shard_offsets(count, batch_size, shard_index, num_shards))
    parallel = tf.data.AUTOTUNE if num_parallel_calls in (None, -1) else num_parallel_calls
    limits = self.limits
    blank = [np.zeros((*t.output_size, 3), np.float32)
             for t in (clip_transform, target_transform)]

    def prepare(x, source):
      def decode_and_transform(payload):
        # Python (PIL releases the GIL while it decodes and resizes): one decode, two
        # transforms. A bad file gives ok=False and is dropped below.
        try:
          image = source.load(payload, limits)
        except decode.BadImage:
          return (*blank, False)
        return (preprocessing.apply_transform(image, clip_transform),
                preprocessing.apply_transform(image, target_transform), True)

      clip_pixels, target_pixels, ok = tf.numpy_function(
          decode_and_transform, [x[source.payload_key]], [tf.float32, tf.float32, tf.bool],
          stateful=False)
      return {
          "clip_pixels": tf.ensure_shape(clip_pixels, (*clip_transform.output_size, 3)),
          "target_pixels": tf.ensure_shape(target_pixels,
                                           (*target_transform.output_size, 3)),
          "index": tf.cast(x["index"], tf.int64),
          "image_id": x["image_id"],
          "mask": tf.ensure_shape(ok, ()),
      }

    ds, offset = None, 0
    for source in self.sources:
      lo, hi = max(start, offset), min(stop, offset + source.num_images)
      if lo < hi:
        # Index, range and shard are taken on undecoded records; decoding comes last.
        part = source.make_dataset().enumerate(start=offset).map(
            lambda i, x: {**x, "index": i}).skip(lo - offset).take(hi - lo)
        if num_shards > 1:
          part = part.filter(lambda x: (x["index"] - start) % global_batch // batch_size
                             == shard_index)
        part = part.map(lambda x, source=source: prepare(x, source),
                        num_parallel_calls=parallel, deterministic=True)
        ds = part if ds is None else ds.concatenate(part)
      offset += source.num_images
    # A record that cannot be decoded stays as a masked row (mask False): the probe step
    # ignores it and reports it as skipped. Padding without end, cut at num_batches,
    # gives every shard the same batch count.
    padding = {
        "clip_pixels": tf.zeros((*clip_transform.output_size, 3), tf.float32),
        "target_pixels": tf.zeros((*target_transform.output_size, 3), tf.float32),
        "index": tf.constant(-1, tf.int64),
        "image_id": tf.constant(""),
        "mask": tf.constant(False),
    }
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
    ds = ds.batch(batch_size, drop_remainder=True).take(num_batches).prefetch(2)
    logging.info("Probe images %d..%d: %d images in %d batches of %d (%d padding rows).",
                 start, stop - 1, local_count, num_batches, batch_size,
                 num_batches * batch_size - local_count)
    return ds.as_numpy_iterator()


def probe_set_from_config(config) -> ProbeSet:
  """config.d_probe with the config's decode limits (the defaults where a config written
  before they existed lacks them)."""
  defaults = decode.Limits()
  limits = decode.Limits(int(config.get("max_image_bytes", defaults.max_bytes)),
                         int(config.get("max_image_pixels", defaults.max_pixels)))
  return ProbeSet(parse_probe_spec(config.d_probe), limits)


def as_probe_set(images, image_ids=None) -> "ProbeSet":
  """A ProbeSet from what dissect() accepts: a set, a source, a spec, or uint8 images."""
  if isinstance(images, ProbeSet):
    return images
  if isinstance(images, ProbeSource):
    return ProbeSet([images])
  if isinstance(images, str):
    return ProbeSet(parse_probe_spec(images, "images"))
  return ProbeSet([array_source(images, image_ids)])

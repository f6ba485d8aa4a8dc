"""Named resources of the paper's setup: pinned by URL and sha256, fetched once, cached.

A config field whose value names a resource (`clip_dissect:20k`, `torchvision:resnet50`)
gets a local file: a copy the user points at (the resource's environment variable, or
the file put at its cache path) is used as given, with a warning if its sha256 differs
from the pin; otherwise the file is downloaded into the cache. Downloads go to
`<file>.partial`, resume where a broken one stopped (HTTP Range), and are renamed into
place only once their sha256 matches the pin: a corrupt or truncated download is refused
and fetched again. A field overridden with a path or another value is not a resource
and is neither fetched nor checked.

Environment:
  JAXDISSECT_CACHE     cache root (default ~/.cache/jaxdissect)
  JAXDISSECT_OFFLINE   1: never download; a missing resource is an error at once
  CLIP_DISSECT_DATA    a directory with the authors' data/ files (20k.txt, ...)
  JAXDISSECT_RESNET50  torchvision's resnet50-0676ba61.pth, or a directory it was
                       converted to (python -m jaxdissect.models.torchvision)
"""
import dataclasses
import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request

from absl import logging

from jaxdissect import errors

# The authors' repository at the commit that added their published results.
CLIP_DISSECT_COMMIT = "21e7697feaea3bf7d7bc2d2cc8e4047d5f5fd502"
_CLIP_DISSECT_RAW = ("https://raw.githubusercontent.com/Trustworthy-ML-Lab/CLIP-dissect/"
                     f"{CLIP_DISSECT_COMMIT}/data/")


@dataclasses.dataclass(frozen=True)
class Resource:
  """A file pinned by URL and sha256.

  Attributes:
    name: what a config field says after the scheme (`clip_dissect:20k`).
    url: where it is downloaded from.
    sha256: its pinned digest.
    filename: its name in the cache (and in the environment variable's directory).
    env: the environment variable naming a local copy (a file, or a directory holding
      `filename`), or "".
    description: what it is, for messages.
  """
  name: str
  url: str
  sha256: str
  filename: str
  env: str = ""
  description: str = ""

  @property
  def cache_path(self) -> str:
    scheme = self.name.split(":")[0]
    return os.path.join(cache_root(), scheme, self.filename)


def _authors_file(key: str, filename: str, sha256: str, description: str) -> Resource:
  return Resource(f"clip_dissect:{key}", _CLIP_DISSECT_RAW + filename, sha256, filename,
                  "CLIP_DISSECT_DATA", description)


RESOURCES = {r.name: r for r in (
    _authors_file("20k", "20k.txt",
                  "4ed6e5336d7760d281f7e72df31827da880c861363e820d8c65666b0f10d9ac0",
                  "the authors' 20k word concept set"),
    _authors_file("10k", "10k.txt",
                  "d6b3e04f1ac30be6525d41474166c0bff28486ecd8c48dcb0ab9c7c9cc05ed86",
                  "the authors' 10k word concept set"),
    _authors_file("3k", "3k.txt",
                  "425845cf228cf91200e25cbf0361cc078502ce1cc2f9d4558b29abe78096afe1",
                  "the authors' 3k word concept set"),
    _authors_file("broden_labels", "broden_labels_clean.txt",
                  "603036d4b138c66455e1285bd915f6cdcdf4728df7a5563843d1f89c9babe64b",
                  "the authors' Broden label concept set"),
    _authors_file("imagenet_labels", "imagenet_labels.txt",
                  "8b243a5b56f530010b42d64d8ef33c2660224447aded823f4d9de2cb1902a70e",
                  "the authors' ImageNet class names"),
    _authors_file("places365_labels", "categories_places365.txt",
                  "2affba635eb657e7ca95f4e6cc69bd9fac29ef4c32aeb83cafdfcd06ec6a1ea6",
                  "the authors' Places365 class names"),
    Resource("clip_dissect:resnet50_imagenet_broden",
             _CLIP_DISSECT_RAW + "CLIP_Dissect_results/resnet50_imagenet_broden.csv",
             "a0c70fd97000a8ca278a14f4adb0f5afdb6fef1b3dd19bd064cbd39699f0635f",
             "resnet50_imagenet_broden.csv", "CLIP_DISSECT_DATA",
             "the authors' published ResNet-50 labels"),
    Resource("clip_dissect:resnet18_places_imagenet_broden",
             _CLIP_DISSECT_RAW + "CLIP_Dissect_results/resnet18_places_imagenet_broden.csv",
             "9fb69f315fc98a5249ba236fc6d32f08f4950f75b9198266cd820047b26c5263",
             "resnet18_places_imagenet_broden.csv", "CLIP_DISSECT_DATA",
             "the authors' published ResNet-18 (Places365) labels"),
    # torchvision's IMAGENET1K_V1 weights; torchvision itself checks the first 8 hex
    # digits of this digest (the file name), 102,530,333 bytes.
    Resource("torchvision:resnet50", "https://download.pytorch.org/models/resnet50-0676ba61.pth",
             "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a",
             "resnet50-0676ba61.pth", "JAXDISSECT_RESNET50",
             "torchvision's ResNet-50 IMAGENET1K_V1 weights"),
)}
SCHEMES = ("clip_dissect:", "torchvision:")


def is_url(path: str) -> bool:
  """A path that tf.io.gfile reads (gs://, ram://, s3://), not the local filesystem."""
  return "://" in path


def join_path(root: str, name: str) -> str:
  """root/name for a local path or a tf.io.gfile URL alike."""
  return f"{root.rstrip('/')}/{name}" if is_url(root) else os.path.join(root, name)


def cache_root() -> str:
  return os.path.expanduser(os.environ.get("JAXDISSECT_CACHE") or "~/.cache/jaxdissect")


def is_resource(spec) -> bool:
  return isinstance(spec, str) and spec.strip().startswith(SCHEMES)


def lookup(spec: str, field: str) -> Resource:
  resource = RESOURCES.get(spec.strip())
  if resource is None:
    known = ", ".join(sorted(RESOURCES))
    raise errors.UserError(field, f"unknown resource {spec!r}.", f"use one of {known}, "
                           "or give a local file instead.")
  return resource


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _user_copy(resource: Resource) -> str | None:
  """The local copy the user supplied (variable, then cache path), or None."""
  candidates = []
  value = os.environ.get(resource.env, "") if resource.env else ""
  if value:
    value = os.path.expanduser(value)
    candidates.append(os.path.join(value, resource.filename) if os.path.isdir(value)
                      else value)
  candidates.append(resource.cache_path)
  for path in candidates:
    if os.path.isfile(path):
      return path
  return None


def available_locally(spec: str) -> bool:
  """Whether the resource is here already (a user's copy or the cache): no download."""
  resource = RESOURCES.get(spec.strip())
  if resource is None:
    return False
  value = os.environ.get(resource.env, "") if resource.env else ""
  converted = bool(value) and os.path.isfile(os.path.join(os.path.expanduser(value),
                                                          "config.json"))
  return converted or _user_copy(resource) is not None


def local_path(spec: str, field: str) -> str:
  """The file behind a resource spec: the user's copy, the cache, or a download."""
  resource = lookup(spec, field)
  path = _user_copy(resource)
  if path is not None:
    digest = sha256_of(path)
    if digest != resource.sha256:
      logging.warning("%s: %s at %s has sha256 %s, not the pinned %s; used as given.",
                      field, resource.description, path, digest[:12], resource.sha256[:12])
    return path
  if os.environ.get("JAXDISSECT_OFFLINE", "") not in ("", "0"):
    raise missing(resource, field, "JAXDISSECT_OFFLINE is set")
  try:
    return download(resource.url, resource.cache_path, resource.sha256,
                    resource.description)
  except DownloadError as err:
    raise missing(resource, field, str(err)) from None


def missing(resource: Resource, field: str, why: str) -> errors.UserError:
  where = f"put it at {resource.cache_path}"
  if resource.env:
    where += f" or set {resource.env} to it" + (
        " (or to the directory holding it)" if resource.env == "CLIP_DISSECT_DATA" else "")
  return errors.UserError(
      field, f"{resource.name} ({resource.description}) is not on this machine and "
      f"could not be downloaded from {resource.url} ({why}).",
      f"download the file on a machine with network access and {where}; or override "
      f"--config.{field} with a local copy.")


class DownloadError(Exception):
  pass


def download(url: str, dest: str, sha256: str | None, description: str = "",
             attempts: int = 3, timeout_s: float = 60.0, log_every_s: float = 10.0) -> str:
  """url -> dest, atomically: bytes go to dest.partial (resumed with a Range request
  after a broken transfer), which is renamed to dest once its sha256 equals `sha256`.
  A download with another digest is deleted and fetched again; raises DownloadError
  when every attempt fails."""
  os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
  partial = dest + ".partial"
  last_error = "no attempt made"
  for _ in range(attempts):
    have = os.path.getsize(partial) if os.path.isfile(partial) else 0
    headers = {"User-Agent": "jaxdissect"}
    if have:
      headers["Range"] = f"bytes={have}-"
    try:
      with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                  timeout=timeout_s) as response:
        if have and response.status != 206:  # the server ignored the range: restart
          have = 0
        total = response.headers.get("Content-Length")
        total = int(total) + have if total is not None else None
        logging.info("Downloading %s from %s%s.", description or dest, url,
                     " (resuming at byte %d)" % have if have else "")
        with open(partial, "ab" if have else "wb") as f:
          done, last_log = have, time.monotonic()
          for block in iter(lambda: response.read(1 << 20), b""):
            f.write(block)
            done += len(block)
            if time.monotonic() - last_log > log_every_s:
              last_log = time.monotonic()
              logging.info("  %s: %.1f of %s MB", os.path.basename(dest), done / 1e6,
                           f"{total / 1e6:.1f}" if total else "?")
        if total is not None and done < total:
          raise http.client.IncompleteRead(b"", total - done)
    except urllib.error.HTTPError as err:
      if err.code == 416 and have:  # nothing left to send: check what we have
        pass
      else:
        last_error = f"HTTP {err.code} {err.reason}"
        if err.code in (401, 403, 404, 410):
          break
        continue
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
      last_error = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
      continue  # a broken transfer resumes from what dest.partial holds
    digest = sha256_of(partial)
    if sha256 is None or digest == sha256:
      os.replace(partial, dest)
      return dest
    os.remove(partial)
    last_error = f"the download's sha256 {digest[:12]} is not the pinned {sha256[:12]}"
    logging.warning("%s: %s; fetching it again.", url, last_error)
  raise DownloadError(last_error)



def fetch_required(config, fields) -> None:
  """Fetches every resource the `fields` of `config` name, before any model loads; one
  UserError names the first that is missing, and the others after it."""
  problems = []
  for field in fields:
    spec = config[field]
    if is_resource(spec):
      try:
        local_path(spec, field)
      except errors.UserError as err:
        problems.append((err, lookup(spec, field)))
  if not problems:
    return
  first, _ = problems[0]
  fix = first.fix
  if len(problems) > 1:
    fix += " Also missing: " + "; ".join(
        f"{err.field} ({r.url} -> {r.cache_path})" for err, r in problems[1:]) + "."
  raise errors.UserError(first.field, first.problem, fix)

"""Shared checks for model locations (HF hub id or local directory)."""
import os

from jaxdissect import errors


def looks_like_hub_id(name: str) -> bool:
  """'org/name' or 'name' with no path syntax: something the hub could resolve."""
  if name.startswith((".", "/", "~")) or "\\" in name:
    return False
  parts = name.split("/")
  return 1 <= len(parts) <= 2 and all(parts)


def check_location(name: str, field: str, example: str) -> str:
  """Returns the expanded local path or the hub id; raises UserError if neither."""
  if not name or not name.strip():
    raise errors.UserError(field, "is empty.", f"give an HF id (e.g. {example}) or a "
                           "local directory written by save_pretrained.")
  expanded = os.path.expanduser(name)
  if os.path.isdir(expanded):
    return expanded
  if os.path.exists(expanded):
    raise errors.UserError(field, f"{name!r} is a file, not a model directory.",
                           "give the directory that holds config.json.")
  if looks_like_hub_id(name):
    return name
  raise errors.UserError(field, f"directory {name!r} does not exist.",
                         f"give an HF id (e.g. {example}) or an existing directory "
                         "written by save_pretrained.")


def first_line(err: BaseException) -> str:
  lines = str(err).strip().splitlines()
  return lines[0][:300] if lines else ""


def load_or_explain(load, field: str, what: str, fix: str):
  """Calls load(); any failure becomes a one-line UserError naming `field` and `fix`."""
  try:
    return load()
  except errors.UserError:
    raise
  except Exception as err:  # pylint: disable=broad-except
    raise errors.UserError(field, f"cannot load {what} ({type(err).__name__}: "
                           f"{first_line(err)}).", fix) from None


def load_config(location: str, field: str):
  import transformers  # pylint: disable=g-import-not-at-top
  return load_or_explain(lambda: transformers.AutoConfig.from_pretrained(location), field,
                         f"a model config from {location!r}",
                         "give an HF id or a local directory holding config.json.")

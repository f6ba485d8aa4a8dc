"""Flax weights from every checkpoint format a user brings, never through torch.

A model directory (or hub repository) holds one of:
  flax_model.msgpack (or shards + flax_model.msgpack.index.json)   Flax, as saved from Flax
  model.safetensors (or shards + model.safetensors.index.json)     metadata format "flax"
                                                                   or "pt" (saved from
                                                                   PyTorch: most hub repos)
  pytorch_model.bin (or shards)                                    a pickle: refused with the
                                                                   one-time conversion
                                                                   command below
transformers' Flax from_pretrained reads the first kinds but fails on PyTorch-format
safetensors when asked not to initialise random weights, and reads no sharded
safetensors at all; here the tensors are read with safetensors and renamed/transposed by
transformers' own PyTorch -> Flax key map, checked against the model's parameter tree.

    python -m jaxdissect.models.checkpoints DIR   # pytorch_model.bin -> model.safetensors
"""
import json
import os
import re
import sys
import types
from typing import Any

from absl import logging
import numpy as np

from jaxdissect import entry
from jaxdissect import errors
from jaxdissect.models import loading

FLAX_WEIGHTS = "flax_model.msgpack"
FLAX_INDEX = "flax_model.msgpack.index.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
# Preference order when a directory holds several.
_KINDS = ((FLAX_WEIGHTS, "flax_msgpack"), (FLAX_INDEX, "flax_msgpack"),
          (SAFE_WEIGHTS, "safetensors"), (SAFE_INDEX, "safetensors"),
          (TORCH_WEIGHTS, "torch_pickle"), (TORCH_INDEX, "torch_pickle"))
_HUB_PATTERNS = {FLAX_WEIGHTS: [FLAX_WEIGHTS], FLAX_INDEX: ["flax_model-*.msgpack"],
                 SAFE_WEIGHTS: [SAFE_WEIGHTS], SAFE_INDEX: ["model-*.safetensors"]}


def conversion_command(directory: str) -> str:
  return f"python -m jaxdissect.models.checkpoints {directory}"


def find_weights(files) -> str | None:
  """The weights file (or index) to read among `files` (names), by preference."""
  names = set(files)
  return next((name for name, _ in _KINDS if name in names), None)


def local_directory(location: str, field: str) -> str:
  """A local directory as it is; a hub id downloaded (config, tokenizer, processor and
  the one weights format that will be read) into the HF cache."""
  if os.path.isdir(location):
    return location
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  try:
    files = huggingface_hub.list_repo_files(location)
  except Exception:  # pylint: disable=broad-except
    files = None  # offline: a cached snapshot is all there is
  chosen = find_weights(files or ())
  if files is not None and chosen not in _HUB_PATTERNS:
    found = f"only {chosen}" if chosen else "no weights file"
    raise errors.UserError(
        field, f"the hub repository {location!r} holds {found}, which loads only "
        "through torch.", f"download it once (huggingface-cli download {location} "
        f"--local-dir DIR), convert it without torch ({conversion_command('DIR')}) and "
        "give DIR.")
  patterns = ["*.json", "*.txt", "*.model"] + (_HUB_PATTERNS[chosen] if chosen else [])
  try:
    return huggingface_hub.snapshot_download(location, allow_patterns=patterns,
                                             local_files_only=files is None)
  except Exception as err:  # pylint: disable=broad-except
    raise errors.UserError(
        field, f"cannot fetch {location!r} from the Hugging Face hub and it is not in "
        f"the local cache ({type(err).__name__}).",
        "run once with network access, or download the model elsewhere and give its "
        "local directory (written by save_pretrained).") from None


def _files_of(directory: str) -> list[str]:
  return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def read_safetensors(directory: str, name: str) -> tuple[dict[str, np.ndarray], str]:
  """Every tensor of model.safetensors (or of the shards its index lists) as float32
  NumPy arrays where floating, and the file's format metadata ("pt", "flax", ...)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  if name == SAFE_INDEX:
    with open(os.path.join(directory, name), encoding="utf-8") as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
  else:
    shards = [name]
  tensors, formats = {}, set()
  for shard in shards:
    path = os.path.join(directory, shard)
    if not os.path.isfile(path):
      raise ValueError(f"{name} lists {shard}, which is missing")
    with safe_open(path, framework="flax") as f:
      formats.add((f.metadata() or {}).get("format"))
      for key in f.keys():
        array = np.asarray(f.get_tensor(key))
        tensors[key] = array.astype(np.float32) if array.dtype.kind == "f" or \
            array.dtype.name == "bfloat16" else array
  if len(formats) != 1:
    raise ValueError(f"its shards disagree on the format metadata ({sorted(map(str, formats))})")
  return tensors, formats.pop()


def _flatten(tree, prefix=()) -> dict[tuple, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) or hasattr(value, "items"):
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _unflatten(flat: dict[tuple, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def _torch_style(path: tuple) -> tuple:
  """("layer", "layer_0", ...) -> ("layer", "0", ...): flax's list naming undone."""
  return tuple(re.sub(rf"^{re.escape(path[i - 1])}_(\d+)$", r"\1", key) if i else key
               for i, key in enumerate(path))


def _params_from_safetensors(model, directory: str, name: str) -> dict:
  """The model's variables from (sharded) safetensors in Flax or PyTorch layout."""
  from flax.core import unfreeze  # pylint: disable=g-import-not-at-top
  tensors, kind = read_safetensors(directory, name)
  expected = _flatten(unfreeze(model.params_shape_tree))
  if kind == "flax":
    flat = {tuple(key.split(".")): value for key, value in tensors.items()}
    prefix = model.base_model_prefix
    if not any(path in expected for path in flat):  # base weights into a head model
      flat = {(p[0], prefix, *p[1:]) if p[0] in ("params", "batch_stats") else
              (prefix, *p): v for p, v in flat.items()}
  elif kind == "pt":
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax  # pylint: disable=g-import-not-at-top
    # The converter matches PyTorch names against the Flax tree's, but flax names a
    # list attribute's modules `layer_0` where PyTorch says `layer.0` (FlaxResNet): it
    # is given the tree under PyTorch-style names, and its output mapped back.
    flax_name = {_torch_style(path): path for path in expected}
    shapes = types.SimpleNamespace(params=_unflatten(dict(zip(flax_name, expected.values()))),
                                   base_model_prefix=model.base_model_prefix)
    flat = {flax_name.get(path, path): value for path, value in
            _flatten(convert_pytorch_state_dict_to_flax(tensors, shapes)).items()}
  else:
    raise ValueError(f"its format metadata is {kind!r}, not 'pt' or 'flax' (save it "
                     "with save_pretrained)")
  missing = sorted(".".join(p) for p in expected if p not in flat)
  if missing:
    raise ValueError(f"{len(missing)} of the model's {len(expected)} parameters are not "
                     f"in it, e.g. {missing[:3]}")
  wrong = [".".join(p) for p in expected
           if tuple(np.shape(flat[p])) != tuple(expected[p].shape)]
  if wrong:
    raise ValueError(f"{len(wrong)} parameters have other shapes than the config says, "
                     f"e.g. {wrong[:3]}")
  ignored = sorted(".".join(p) for p in flat if p not in expected)
  if ignored:
    logging.info("%s: %d tensors the Flax model does not use (e.g. %s).", name,
                 len(ignored), ignored[:3])
  return _unflatten({p: np.asarray(flat[p], dtype=expected[p].dtype) for p in expected})


def load_flax_pretrained(cls, location: str, config, field: str, **model_kwargs):
  """(model, params) of transformers Flax class `cls` from any supported checkpoint.

  model is created without random weights; params holds every variable collection
  ({"params": ...[, "batch_stats": ...]} for batch-norm models, else the params tree).
  """
  directory = local_directory(location, field)
  files = _files_of(directory)
  name = find_weights(files)
  if name is None:
    raise errors.UserError(
        field, f"{location!r} holds no weights file (found: {', '.join(files) or 'no files'}).",
        f"give a directory written by save_pretrained, with {FLAX_WEIGHTS} or "
        f"{SAFE_WEIGHTS} (or their sharded forms).")
  if name in (TORCH_WEIGHTS, TORCH_INDEX):
    raise errors.UserError(
        field, f"{location!r} holds only PyTorch pickle weights ({name}), which need "
        "torch to read safely.", f"convert them once, without torch: "
        f"{conversion_command(directory)} (writes {SAFE_WEIGHTS} beside them).")
  what = f"{os.path.join(directory, name)}"
  if name in (FLAX_WEIGHTS, FLAX_INDEX):
    return loading.load_or_explain(
        lambda: cls.from_pretrained(directory, config=config, _do_init=False,
                                    **model_kwargs),
        field, f"the Flax weights {what}",
        "re-save the model with save_pretrained; the file may be truncated.")
  model = cls(config, _do_init=False, **model_kwargs)
  params = loading.load_or_explain(
      lambda: _params_from_safetensors(model, directory, name), field,
      f"the weights {what}",
      "check that the file matches the model's config.json, or re-save it with "
      "save_pretrained.")
  logging.info("Read %s (%s).", what, "safetensors")
  return model, params


def convert_pickle_checkpoint(directory: str) -> str:
  """pytorch_model.bin (or its shards) -> model.safetensors (format "pt"), no torch:
  tensors are rebuilt by a restricted unpickler that refuses any other object."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from jaxdissect.models import torchvision  # pylint: disable=g-import-not-at-top
  files = _files_of(directory)
  if TORCH_INDEX in files:
    with open(os.path.join(directory, TORCH_INDEX), encoding="utf-8") as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
  elif TORCH_WEIGHTS in files:
    shards = [TORCH_WEIGHTS]
  else:
    raise errors.UserError("directory", f"no {TORCH_WEIGHTS} in {directory}.",
                           "give the model directory that holds it.")
  state = {}
  for shard in shards:
    state.update(torchvision.read_state_dict(os.path.join(directory, shard), "directory"))
  out = os.path.join(directory, SAFE_WEIGHTS)
  tmp = out + ".partial"
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, tmp,
            metadata={"format": "pt"})
  os.replace(tmp, out)
  return out


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 1 or argv[0].startswith("-"):
    print(__doc__)
    return 2
  try:
    out = convert_pickle_checkpoint(argv[0])
  except errors.UserError as err:
    print(f"error: {err.one_line()}", file=sys.stderr)
    return 2
  print(f"Wrote {out}: the directory now loads without torch.")
  return 0


if __name__ == "__main__":
  entry.run(main)

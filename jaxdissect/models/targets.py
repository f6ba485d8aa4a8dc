"""Target networks: a registry of loaders, friendly layer names, and layer capture.

A TargetModel is a flax.linen module, its variables and its image transform. Layers are
module paths ("resnet/encoder/stages/3"); friendly names (conv1, layer1..layer4, fc for
ResNets as in torchvision) are aliases. Activations are captured with flax's
capture_intermediates, filtered to the requested paths, inside the jitted step.
"""
import dataclasses
import hashlib
import importlib
import os
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect import errors
from jaxdissect import resources
from jaxdissect.data import preprocessing
from jaxdissect.models import checkpoints
from jaxdissect.models import loading
from jaxdissect.models import torchvision

DEFAULT_TRANSFORM = preprocessing.ImageTransform(resize_shortest_edge=256,
                                                 crop_size=(224, 224),
                                                 resample="bilinear")


@dataclasses.dataclass
class LayerInfo:
  name: str  # as the user names it (friendly name or module path)
  path: str  # module path, "/"-separated
  shape: tuple[int, ...]  # output shape for a batch of one, e.g. (1, 7, 7, 2048)

  @property
  def num_units(self) -> int:
    return int(self.shape[-1])


@dataclasses.dataclass
class TargetModel:
  """A vision network to dissect.

  Attributes:
    name: identity for logs and fingerprints (HF id, directory or python: spec).
    module: the flax.linen module; called as module.apply(variables, pixels, **call_kwargs)
      with NHWC float pixels.
    variables: its variables ({"params": ..., "batch_stats": ...}).
    transform: its own preprocessing.
    layer_aliases: friendly name -> module path.
    id2label: class names of its output units, if it is a classifier.
    call_kwargs: extra keyword arguments of the forward pass (e.g. deterministic=True).
    path_prefix: the base-model prefix ("resnet", "vit") tried in front of module
      paths the user gives relative to the base model.
    ground_truth: friendly layer name -> the true label of each of its units, where
      known (a classifier's fc: its class names).
  """
  name: str
  module: Any
  variables: Any
  transform: preprocessing.ImageTransform = DEFAULT_TRANSFORM
  layer_aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
  id2label: Mapping[int, str] | None = None
  call_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  path_prefix: str = ""
  ground_truth: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)

  def truth_for(self, info: "LayerInfo") -> list[str] | None:
    """The true unit labels of a resolved layer, whichever name it was requested by."""
    if info.name in self.ground_truth:
      return list(self.ground_truth[info.name])
    for alias, path in self.layer_aliases.items():
      if path == info.path and alias in self.ground_truth:
        return list(self.ground_truth[alias])
    return None

  def forward(self, variables, pixels, capture: Callable | bool = False):
    """Returns (output, intermediates) of a forward pass capturing `capture` modules."""
    if capture is False:
      return self.module.apply(variables, pixels, **self.call_kwargs), {}
    output, state = self.module.apply(variables, pixels, capture_intermediates=capture,
                                      mutable=["intermediates"], **self.call_kwargs)
    return output, state.get("intermediates", {})

  def module_paths(self) -> dict[str, tuple[int, ...]]:
    """Every capturable module path -> its output shape (batch of one), no compute."""
    size = self.transform.output_size
    if size is None:
      raise errors.UserError(
          "target_model", f"the transform of {self.name} has no fixed output size.",
          "its preprocessor_config.json needs a crop_size or an exact size.")
    dummy = jax.ShapeDtypeStruct((1, *size, 3), jnp.float32)
    _, intermediates = jax.eval_shape(lambda v, x: self.forward(v, x, capture=True),
                                      self.variables, dummy)
    table = {}
    for path, output in _walk_intermediates(intermediates):
      array = primary_array(output)
      if array is not None and path:
        table[path] = tuple(array.shape)
    return table

  def layer_table(self) -> list[LayerInfo]:
    """Friendly names first, then every module path: what --list_layers prints."""
    paths = self.module_paths()
    rows = [LayerInfo(alias, path, paths[path]) for alias, path in self.layer_aliases.items()
            if path in paths]
    rows += [LayerInfo(path.replace("/", "."), path, shape) for path, shape in paths.items()]
    return rows

  def resolve_layers(self, names: Sequence[str]) -> list[LayerInfo]:
    """Maps each requested name to a module path; unknown names list the valid ones."""
    paths = self.module_paths()
    resolved = []
    for name in names:
      path = self._find_path(name, paths)
      if path is None:
        friendly = [a for a, p in self.layer_aliases.items() if p in paths]
        examples = [p.replace("/", ".") for p in list(paths)[:12]]
        raise errors.UserError(
            "target_layers", f"unknown layer {name!r} in {self.name}.",
            f"use one of the friendly names {friendly} or a module path such as "
            f"{examples} (python main.py --config ... --list_layers prints them all).")
      resolved.append(LayerInfo(name, path, paths[path]))
    seen = set()
    for info in resolved:
      if info.name in seen:
        raise errors.UserError("target_layers", f"layer {info.name!r} is listed twice.",
                               "list each layer once.")
      seen.add(info.name)
    return resolved

  def _find_path(self, name: str, paths: Mapping[str, Any]) -> str | None:
    if name in self.layer_aliases and self.layer_aliases[name] in paths:
      return self.layer_aliases[name]
    candidate = name.strip().replace(".", "/").strip("/")
    for option in (candidate, f"{self.path_prefix}/{candidate}" if self.path_prefix else None):
      if option and option in paths:
        return option
    return None


def primary_array(output):
  """The activation array of a module output (first array of tuples / model outputs)."""
  if isinstance(output, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
    return output
  if isinstance(output, (tuple, list)) and output:
    return primary_array(output[0])
  if hasattr(output, "to_tuple"):
    values = output.to_tuple()
    return primary_array(values[0]) if values else None
  return None


def _walk_intermediates(tree, prefix=()):
  for key, value in tree.items():
    if key == "__call__":
      yield "/".join(prefix), value[0] if isinstance(value, tuple) and len(value) == 1 \
          else value
    elif isinstance(value, Mapping):
      yield from _walk_intermediates(value, prefix + (key,))


def capture_filter(paths: Sequence[str]) -> Callable:
  """A capture_intermediates filter that keeps only the __call__ outputs of `paths`."""
  wanted = frozenset(tuple(p.split("/")) for p in paths)

  def keep(module, method_name):
    return method_name == "__call__" and tuple(module.path) in wanted

  return keep


def get_intermediate(intermediates, path: str):
  node = intermediates
  for key in path.split("/"):
    node = node[key]
  value = node["__call__"]
  return primary_array(value[0] if isinstance(value, tuple) and len(value) == 1 else value)


def pool(array, pool_mode: str, token_pool: str):
  """Reduces a layer output to (batch, units).

  (B, H, W, C) feature maps: mean or max over H, W. (B, T, C) token sequences: the first
  (CLS) token, or with token_pool="avg_patches" the mean of the other tokens.
  (B, C): as it is.
  """
  if array.ndim == 2:
    return array
  if array.ndim == 3:
    if token_pool == "cls":
      return array[:, 0, :]
    return jnp.mean(array[:, 1:, :], axis=1)
  axes = tuple(range(1, array.ndim - 1))
  if pool_mode == "max":
    return jnp.max(array, axis=axes)
  return jnp.mean(array, axis=axes)


def params_fingerprint(variables) -> str:
  """sha256 over every leaf's path, dtype, shape and bytes: identity of the weights."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    array = np.asarray(leaf)
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(f"{array.dtype}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def read_class_names(spec: str) -> list[str]:
  """One name a line, in output order; blank lines dropped, repeated names kept."""
  path = (resources.local_path(spec, "class_names") if resources.is_resource(spec)
          else os.path.expanduser(spec))
  if not os.path.isfile(path):
    raise errors.UserError("class_names", f"no file {path!r}.",
                           "give a text file with one class name a line.")
  with open(path, encoding="utf-8-sig") as f:
    return [line.strip() for line in f.read().splitlines() if line.strip()]


def name_classes(target: TargetModel, spec: str) -> TargetModel:
  """The target named by the class-name list `spec` ("" : as it is). A list that cannot
  be had only costs fc its metrics: a warning, and the dissection goes on."""
  spec = str(spec or "").strip()
  if not spec:
    return target
  try:
    names = read_class_names(spec)
  except errors.UserError as err:
    logging.warning("No class names, so fc gets no accuracy against its classes: %s",
                    err.one_line())
    return target
  return with_class_names(target, names, spec)


# ------------------------------------------------------------------ loaders
def load_target(spec: str, field: str = "target_model",
                class_names: str = "") -> TargetModel:
  """`python:pkg.module:factory`, `torchvision:resnet50`, or an HF id / local directory
  of a Flax vision model; `class_names` (a file or resource, see name_classes) names
  its outputs."""
  return name_classes(_load_target(spec, field), class_names)


def _load_target(spec: str, field: str) -> TargetModel:
  if spec.startswith("python:"):
    return _load_python_target(spec, field)
  if resources.is_resource(spec):
    location = torchvision.converted_torchvision(spec, field)
  else:
    location = loading.check_location(spec, field, "microsoft/resnet-50")
  location = checkpoints.local_directory(location, field)
  config = loading.load_config(location, field)
  model_type = getattr(config, "model_type", None)
  loader = _HF_LOADERS.get(model_type)
  if loader is None:
    raise errors.UserError(
        field, f"{spec!r} is a {model_type!r} model; supported: {sorted(_HF_LOADERS)}.",
        "use an HF Flax ResNet or ViT, or wrap any flax module as "
        "python:pkg.module:factory.")
  target = loader(location, config, field)
  target.name = spec
  logging.info("Loaded target %s (%s), image transform %s.", spec, model_type,
               target.transform)
  return target


def _from_pretrained(cls, location, config, field, **kwargs):
  model, params = checkpoints.load_flax_pretrained(cls, location, config, field, **kwargs)
  return model, _variables_of(params)


def _variables_of(params) -> dict:
  if isinstance(params, Mapping) and "params" in params:
    return dict(params)
  return {"params": params}


def _id2label(config) -> dict[int, str] | None:
  labels = getattr(config, "id2label", None)
  if not labels:
    return None
  labels = {int(k): str(v) for k, v in labels.items()}
  if is_placeholder(labels):
    return None
  return labels


def is_placeholder(id2label) -> bool:
  """PretrainedConfig's LABEL_k and a converter's class_k name no class: never truth."""
  return all(v in (f"LABEL_{k}", f"class_{k}") for k, v in id2label.items())


def with_class_names(target: TargetModel, names, source: str) -> TargetModel:
  """The target with its output units named `names` (a class-name list such as the
  authors' imagenet_labels.txt): id2label and the fc truth."""
  fc = target.layer_aliases.get("fc")
  shapes = target.module_paths()
  num_outputs = shapes[fc][-1] if fc in shapes else None
  if num_outputs != len(names):
    raise errors.UserError(
        "class_names", f"{source} lists {len(names)} class names but {target.name} has "
        f"{num_outputs if num_outputs is not None else 'no classifier'} outputs.",
        "give the class-name list of this model, in the order of its outputs.")
  target.id2label = dict(enumerate(names))
  target.ground_truth = {**target.ground_truth, **_class_truth(target.id2label)}
  return target


def _class_truth(id2label) -> dict[str, list[str]]:
  """A classifier's fc units are its classes."""
  if not id2label:
    return {}
  return {"fc": [id2label[i] for i in range(len(id2label))]}


def _load_hf_target(location: str, config, field: str, classifier_cls, base_cls,
                    prefix: str,
                    base_aliases: Callable[[str], dict[str, str]],
                    fallback: preprocessing.ImageTransform, **base_kwargs) -> TargetModel:
  """The classification model (its base under `prefix`, plus `fc`) unless the config
  names the base model. base_aliases(path prefix) gives the friendly names of the base."""
  architectures = getattr(config, "architectures", None) or []
  is_classifier = not architectures or any("Classification" in a for a in architectures)
  if is_classifier:
    model, variables = _from_pretrained(classifier_cls, location, config, field)
  else:
    model, variables = _from_pretrained(base_cls, location, config, field, **base_kwargs)
    prefix = ""
  aliases = base_aliases(f"{prefix}/" if prefix else "")
  if is_classifier:
    aliases["fc"] = "classifier"
  id2label = _id2label(config) if is_classifier else None
  return TargetModel(name=location, module=model.module, variables=variables,
                     transform=preprocessing.load_transform(location, fallback),
                     layer_aliases=aliases, id2label=id2label,
                     call_kwargs={"deterministic": True}, path_prefix=prefix,
                     ground_truth=_class_truth(id2label))


def _load_hf_resnet(location: str, config, field: str) -> TargetModel:
  import transformers  # pylint: disable=g-import-not-at-top

  def aliases(base):
    names = {"conv1": f"{base}embedder/embedder/convolution"}
    for i in range(len(config.hidden_sizes)):
      names[f"layer{i + 1}"] = f"{base}encoder/stages/{i}"
    return names

  return _load_hf_target(location, config, field,
                         transformers.FlaxResNetForImageClassification,
                         transformers.FlaxResNetModel, "resnet", aliases,
                         DEFAULT_TRANSFORM)


def _load_hf_vit(location: str, config, field: str) -> TargetModel:
  import transformers  # pylint: disable=g-import-not-at-top

  def aliases(base):
    # torchvision vit_b_16 style names for the encoder blocks.
    names = {f"encoder_layer_{i}": f"{base}encoder/layer/{i}"
             for i in range(config.num_hidden_layers)}
    names.update({f"encoder.layers.encoder_layer_{i}": f"{base}encoder/layer/{i}"
                  for i in range(config.num_hidden_layers)})
    names["ln"] = names["encoder.ln"] = f"{base}layernorm"
    names["conv_proj"] = f"{base}embeddings/patch_embeddings/projection"
    return names

  fallback = preprocessing.ImageTransform(resize_to=(config.image_size,) * 2,
                                          resample="bilinear", mean=(0.5, 0.5, 0.5),
                                          std=(0.5, 0.5, 0.5))
  target = _load_hf_target(location, config, field,
                           transformers.FlaxViTForImageClassification,
                           transformers.FlaxViTModel, "vit", aliases, fallback,
                           add_pooling_layer=False)
  if "fc" in target.layer_aliases:  # torchvision calls the classifier heads.head
    target.layer_aliases = {**target.layer_aliases, "heads": "classifier",
                            "heads.head": "classifier"}
  return target


_HF_LOADERS = {"resnet": _load_hf_resnet, "vit": _load_hf_vit}


def _load_python_target(spec: str, field: str) -> TargetModel:
  """python:pkg.module:factory -> factory() returning a TargetModel or (module, variables)."""
  target = spec[len("python:"):]
  module_name, _, attr = target.partition(":")
  if not module_name or not attr:
    raise errors.UserError(field, f"{spec!r} is not of the form python:pkg.module:factory.",
                           "e.g. python:my_models.nets:make_target.")
  try:
    factory = getattr(importlib.import_module(module_name), attr)
  except (ImportError, AttributeError) as err:
    raise errors.UserError(field, f"cannot import {target!r} ({type(err).__name__}: "
                           f"{loading.first_line(err)}).",
                           "make the module importable (PYTHONPATH) and check the "
                           "factory name.") from None
  result = as_target_model(factory(), spec)
  if result is None:
    raise errors.UserError(field, f"{spec} did not return a TargetModel.",
                           "the factory must return a jaxdissect TargetModel or a "
                           "(module, variables[, transform]) tuple.")
  return result


def as_target_model(made, name: str) -> TargetModel | None:
  """A TargetModel as it is, or one built from (module, variables[, transform]); else None."""
  if isinstance(made, TargetModel):
    if made.name in ("", None):
      made.name = name
    return made
  if isinstance(made, tuple) and len(made) in (2, 3):
    module, variables, *rest = made
    return TargetModel(name=name, module=module, variables=variables,
                       transform=rest[0] if rest else DEFAULT_TRANSFORM)
  return None


def as_target(target) -> TargetModel:
  """A TargetModel from what dissect() accepts: itself, a spec, or (module, variables[,
  transform])."""
  if isinstance(target, str):
    return load_target(target)
  name = type(target[0]).__name__ if isinstance(target, tuple) and target else "target"
  made = as_target_model(target, name)
  if made is not None:
    return made
  raise errors.UserError("target", f"cannot use a {type(target).__name__} as a target.",
                         "pass a TargetModel, an HF id / directory, or (module, variables"
                         "[, transform]).")

"""torchvision ResNet and ViT checkpoints into the HF Flax ResNet / ViT, without torch.

The paper dissects torchvision's ResNet-50 (ImageNet) and ResNet-18 (Places365). Their
weights are torchvision state dicts: read here from safetensors, or from a torch
zip-format .pth/.pt file by a restricted unpickler (tensors rebuilt into NumPy; nothing
else in the pickle is allowed), then mapped onto transformers' FlaxResNetForImageClassification
so the friendly layer names (conv1, layer1..layer4, fc) apply:

  conv1 / bn1                      -> resnet.embedder.embedder.{convolution,normalization}
  layerL.i.convJ / bnJ             -> resnet.encoder.stages.(L-1).layers.i.layer.X
                                      (X: layer_(J-1) in basic blocks, J-1 in bottlenecks)
  layerL.i.downsample.{0,1}        -> resnet.encoder.stages.(L-1).layers.i.shortcut
  fc                               -> classifier.1
Conv kernels go from OIHW to HWIO, the fc matrix is transposed, and batch norm's
weight/bias/running_mean/running_var become scale/bias and the batch_stats mean/var.
torchvision (v1.5) strides the 3x3 conv of a bottleneck, which is HF's
downsample_in_bottleneck=False; the architecture is read from the tensor shapes.

ViT (vit_b_16 and the other torchvision VisionTransformers without a pre-logits
layer) goes onto transformers' FlaxViTForImageClassification: class_token, conv_proj
(OIHW -> HWIO), pos_embedding, each encoder_layer_N's ln_1 / ln_2, the packed attention
in_proj split into query / key / value, out_proj, mlp, the final encoder.ln and
heads.head; LayerNorm epsilon 1e-6 as in torchvision. The torchvision layer names
(encoder_layer_N, conv_proj, heads) are friendly names of the loaded ViT.

    python -m jaxdissect.models.torchvision --weights resnet50.pth --out DIR \
        [--class_names classes.txt] [--image_size 224]

writes a directory that target_model accepts (config, Flax weights, the torchvision
eval transform: resize 256, centre crop 224, ImageNet mean/std). Old non-zip .pth files
(torch < 1.6) need torch once: `python -c "import torch, safetensors.torch as s;
s.save_file(torch.load('f.pth', map_location='cpu'), 'f.safetensors')"`.
"""
import argparse
import collections
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from typing import Sequence

from absl import logging
import numpy as np

from jaxdissect import entry
from jaxdissect import errors
from jaxdissect import registry
from jaxdissect import resources

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "BFloat16Storage": None,
}


class _StorageType:
  def __init__(self, name):
    self.name = name


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """torch._utils._rebuild_tensor_v2 for a NumPy storage."""
  del unused
  if not size:
    return storage[offset].copy()
  itemsize = storage.dtype.itemsize
  return np.lib.stride_tricks.as_strided(
      storage[offset:], shape=tuple(size),
      strides=tuple(s * itemsize for s in stride)).copy()


class _TorchlessUnpickler(pickle.Unpickler):
  """Rebuilds tensors from the archive's raw storages; refuses every other global, so
  a checkpoint cannot run code."""

  def __init__(self, file, archive, prefix):
    super().__init__(file)
    self.archive, self.prefix = archive, prefix

  def find_class(self, module, name):
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weights file")

  def persistent_load(self, pid):
    kind, storage_type, key, _, _ = pid
    if kind != "storage" or not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
    dtype = _STORAGE_DTYPES[storage_type.name]
    if dtype is None:
      raise pickle.UnpicklingError("bfloat16 storages are not supported; save as float32")
    raw = self.archive.read(f"{self.prefix}/data/{key}")
    return np.frombuffer(raw, dtype=dtype)


def read_torch_zip(path: str) -> dict[str, np.ndarray]:
  """A torch zip-format checkpoint (torch.save since 1.6) as NumPy arrays, no torch."""
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if not pickles:
      raise ValueError("no data.pkl in the archive")
    prefix = pickles[0][:-len("/data.pkl")]
    with archive.open(pickles[0]) as f:
      state = _TorchlessUnpickler(f, archive, prefix).load()
  if isinstance(state, dict) and "state_dict" in state:  # training checkpoints
    state = state["state_dict"]
  return {re.sub(r"^module\.", "", k): np.asarray(v) for k, v in state.items()}


def read_state_dict(path: str, field: str = "target_model") -> dict[str, np.ndarray]:
  """A torchvision state dict from .safetensors, or a zip-format .pth / .pt."""
  if not os.path.isfile(path):
    raise errors.UserError(field, f"no weights file at {path}.",
                           "give the path of a torchvision .pth or .safetensors file.")
  try:
    if path.endswith(".safetensors"):
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
      return load_file(path)
    if zipfile.is_zipfile(path):
      return read_torch_zip(path)
  except (ValueError, pickle.UnpicklingError, KeyError, OSError) as err:
    raise errors.UserError(field, f"cannot read {path} as a torchvision state dict "
                           f"({err}).", "give a torchvision ResNet .pth or "
                           ".safetensors file.") from None
  raise errors.UserError(
      field, f"{path} is a legacy (pre-1.6, non-zip) torch file, which needs torch.",
      "convert it once where torch is installed: python -c \"import torch, "
      "safetensors.torch as s; s.save_file(torch.load('IN.pth', map_location='cpu'), "
      "'OUT.safetensors')\".")


def resnet_config(state: dict[str, np.ndarray], class_names: Sequence[str] | None = None):
  """The transformers ResNetConfig that state's shapes describe."""
  from transformers import ResNetConfig  # pylint: disable=g-import-not-at-top
  bottleneck = "layer1.0.conv3.weight" in state
  depths, hidden_sizes = [], []
  for stage in range(1, 5):
    blocks = {int(m.group(1)) for k in state
              if (m := re.match(rf"layer{stage}\.(\d+)\.conv1\.weight$", k))}
    if not blocks:
      raise ValueError(f"no layer{stage} blocks: not a torchvision ResNet state dict")
    depths.append(len(blocks))
    last = "conv3" if bottleneck else "conv2"
    hidden_sizes.append(int(state[f"layer{stage}.0.{last}.weight"].shape[0]))
  num_labels = int(state["fc.weight"].shape[0])
  names = list(class_names) if class_names else [f"class_{i}" for i in range(num_labels)]
  if len(names) != num_labels:
    raise ValueError(f"{len(names)} class names for a {num_labels}-way fc layer")
  return ResNetConfig(
      num_channels=3, embedding_size=int(state["conv1.weight"].shape[0]),
      hidden_sizes=hidden_sizes, depths=depths,
      layer_type="bottleneck" if bottleneck else "basic", hidden_act="relu",
      downsample_in_first_stage=False, downsample_in_bottleneck=False,
      num_labels=num_labels, id2label=dict(enumerate(names)),
      label2id={n: i for i, n in enumerate(names)})


def _conv(weight):
  return np.transpose(weight, (2, 3, 1, 0))  # OIHW -> HWIO


def convert_resnet(state: dict[str, np.ndarray], config) -> dict:
  """{"params": ..., "batch_stats": ...} of FlaxResNetForImageClassification."""
  params, stats, used = {}, {}, set()

  def put(tree, path, value):
    for key in path[:-1]:
      tree = tree.setdefault(key, {})
    tree[path[-1]] = np.asarray(value, np.float32)

  def take(name):
    used.add(name)
    return state[name]

  def conv_bn(torch_conv, torch_bn, path):
    put(params, path + ("convolution", "kernel"), _conv(take(f"{torch_conv}.weight")))
    put(params, path + ("normalization", "scale"), take(f"{torch_bn}.weight"))
    put(params, path + ("normalization", "bias"), take(f"{torch_bn}.bias"))
    put(stats, path + ("normalization", "mean"), take(f"{torch_bn}.running_mean"))
    put(stats, path + ("normalization", "var"), take(f"{torch_bn}.running_var"))
    used.add(f"{torch_bn}.num_batches_tracked")

  conv_bn("conv1", "bn1", ("resnet", "embedder", "embedder"))
  convs = 3 if config.layer_type == "bottleneck" else 2
  for stage, depth in enumerate(config.depths):
    for block in range(depth):
      torch_block = f"layer{stage + 1}.{block}"
      path = ("resnet", "encoder", "stages", str(stage), "layers", str(block))
      for j in range(convs):
        # transformers names a basic block's convs layer_0, layer_1 and a
        # bottleneck's 0, 1, 2.
        conv_bn(f"{torch_block}.conv{j + 1}", f"{torch_block}.bn{j + 1}",
                path + ("layer", str(j) if convs == 3 else f"layer_{j}"))
      if f"{torch_block}.downsample.0.weight" in state:
        conv_bn(f"{torch_block}.downsample.0", f"{torch_block}.downsample.1",
                path + ("shortcut",))
  put(params, ("classifier", "1", "kernel"), take("fc.weight").T)
  put(params, ("classifier", "1", "bias"), take("fc.bias"))
  unused = sorted(k for k in state if k not in used)
  if unused:
    raise ValueError(f"{len(unused)} tensors not mapped, e.g. {unused[:3]}")
  return {"params": params, "batch_stats": stats}


def save_flax_resnet(state: dict[str, np.ndarray], out_dir: str,
                     class_names: Sequence[str] | None = None,
                     image_size: int = 224) -> str:
  """Writes an HF Flax ResNet directory (loadable as target_model) from state."""
  import jax  # pylint: disable=g-import-not-at-top
  from transformers import ConvNextImageProcessor, FlaxResNetForImageClassification  # pylint: disable=g-import-not-at-top
  config = resnet_config(state, class_names)
  variables = convert_resnet(state, config)
  model = FlaxResNetForImageClassification(config, input_shape=(1, image_size,
                                                                image_size, 3))
  expected = jax.tree.map(np.shape, model.params)
  got = jax.tree.map(np.shape, variables)
  if expected != got:
    raise ValueError("the converted parameters do not match the Flax ResNet's tree")
  model.params = variables
  model.save_pretrained(out_dir)
  # torchvision's eval transform: Resize(256) (bilinear), CenterCrop(224), normalise.
  ConvNextImageProcessor(size={"shortest_edge": image_size}, crop_pct=224 / 256,
                         resample=2, image_mean=list(registry.IMAGENET_MEAN),
                         image_std=list(registry.IMAGENET_STD)).save_pretrained(out_dir)
  return out_dir


# ------------------------------------------------------------------------ ViT
VIT_LAYER_NORM_EPS = 1e-6  # torchvision's; transformers' ViT default is 1e-12


def is_vit(state: dict[str, np.ndarray]) -> bool:
  return "conv_proj.weight" in state and "class_token" in state


def _vit_layer_indices(state) -> list[int]:
  return sorted({int(m.group(1)) for k in state
                 if (m := re.match(r"encoder\.layers\.encoder_layer_(\d+)\.", k))})


def _mlp_names(state, prefix: str) -> tuple[str, str]:
  """torchvision's MLPBlock is saved as mlp.0 / mlp.3 (new) or mlp.linear_1 / linear_2."""
  if f"{prefix}.mlp.0.weight" in state:
    return f"{prefix}.mlp.0", f"{prefix}.mlp.3"
  return f"{prefix}.mlp.linear_1", f"{prefix}.mlp.linear_2"


def vit_config(state: dict[str, np.ndarray], class_names: Sequence[str] | None = None,
               num_heads: int | None = None):
  """The transformers ViTConfig that a torchvision VisionTransformer state describes.
  The head count is not in the tensors (attention is packed): every torchvision ViT
  has 64-dimensional heads, the default here."""
  from transformers import ViTConfig  # pylint: disable=g-import-not-at-top
  hidden, _, patch, _ = state["conv_proj.weight"].shape
  layers = _vit_layer_indices(state)
  if not layers:
    raise ValueError("no encoder layers: not a torchvision ViT state dict")
  num_tokens = int(state["encoder.pos_embedding"].shape[1])
  side = int(round(np.sqrt(num_tokens - 1)))
  first = f"encoder.layers.encoder_layer_{layers[0]}"
  mlp_in, _ = _mlp_names(state, first)
  if "heads.head.weight" not in state:
    raise ValueError("no heads.head: a ViT with a pre-logits layer is not supported")
  num_labels = int(state["heads.head.weight"].shape[0])
  names = list(class_names) if class_names else [f"class_{i}" for i in range(num_labels)]
  if len(names) != num_labels:
    raise ValueError(f"{len(names)} class names for a {num_labels}-way head")
  if num_heads is None:
    if hidden % 64:
      raise ValueError(f"hidden size {hidden} is no multiple of 64: give the head count")
    num_heads = hidden // 64
  return ViTConfig(
      hidden_size=int(hidden), num_hidden_layers=len(layers),
      num_attention_heads=int(num_heads),
      intermediate_size=int(state[f"{mlp_in}.weight"].shape[0]),
      image_size=int(side * patch), patch_size=int(patch), num_channels=3,
      hidden_act="gelu", layer_norm_eps=VIT_LAYER_NORM_EPS, qkv_bias=True,
      num_labels=num_labels, id2label=dict(enumerate(names)),
      label2id={n: i for i, n in enumerate(names)})


def convert_vit(state: dict[str, np.ndarray], config) -> dict:
  """{"params": ...} of FlaxViTForImageClassification from a torchvision ViT state."""
  used = set()

  def take(name):
    used.add(name)
    return np.asarray(state[name], np.float32)

  def dense(name):
    return {"kernel": take(f"{name}.weight").T, "bias": take(f"{name}.bias")}

  def norm(name):
    return {"scale": take(f"{name}.weight"), "bias": take(f"{name}.bias")}

  d = config.hidden_size
  layers = {}
  for out_index, index in enumerate(_vit_layer_indices(state)):
    prefix = f"encoder.layers.encoder_layer_{index}"
    qkv_w = take(f"{prefix}.self_attention.in_proj_weight")
    qkv_b = take(f"{prefix}.self_attention.in_proj_bias")
    attention = {name: {"kernel": qkv_w[i * d:(i + 1) * d].T, "bias": qkv_b[i * d:(i + 1) * d]}
                 for i, name in enumerate(("query", "key", "value"))}
    mlp_in, mlp_out = _mlp_names(state, prefix)
    layers[str(out_index)] = {
        "layernorm_before": norm(f"{prefix}.ln_1"),
        "attention": {"attention": attention,
                      "output": {"dense": dense(f"{prefix}.self_attention.out_proj")}},
        "layernorm_after": norm(f"{prefix}.ln_2"),
        "intermediate": {"dense": dense(mlp_in)},
        "output": {"dense": dense(mlp_out)},
    }
  params = {
      "vit": {
          "embeddings": {
              "cls_token": take("class_token"),
              "position_embeddings": take("encoder.pos_embedding"),
              "patch_embeddings": {"projection": {
                  "kernel": _conv(take("conv_proj.weight")),
                  "bias": take("conv_proj.bias")}},
          },
          "encoder": {"layer": layers},
          "layernorm": norm("encoder.ln"),
      },
      "classifier": dense("heads.head"),
  }
  unused = sorted(k for k in state if k not in used)
  if unused:
    raise ValueError(f"{len(unused)} tensors not mapped, e.g. {unused[:3]}")
  return {"params": params}


def save_flax_vit(state: dict[str, np.ndarray], out_dir: str,
                  class_names: Sequence[str] | None = None,
                  num_heads: int | None = None) -> str:
  """Writes an HF Flax ViT directory (target_model) with torchvision's eval transform."""
  import jax  # pylint: disable=g-import-not-at-top
  from transformers import ConvNextImageProcessor, FlaxViTForImageClassification  # pylint: disable=g-import-not-at-top
  config = vit_config(state, class_names, num_heads)
  variables = convert_vit(state, config)
  model = FlaxViTForImageClassification(config)
  if jax.tree.map(np.shape, model.params) != jax.tree.map(np.shape, variables["params"]):
    raise ValueError("the converted parameters do not match the Flax ViT's tree")
  model.params = variables["params"]
  model.save_pretrained(out_dir)
  # torchvision's ViT_B_16 eval transform: Resize(256) bilinear, CenterCrop(224).
  size = config.image_size
  ConvNextImageProcessor(size={"shortest_edge": size}, crop_pct=size / (size * 256 / 224),
                         resample=2, image_mean=list(registry.IMAGENET_MEAN),
                         image_std=list(registry.IMAGENET_STD)).save_pretrained(out_dir)
  return out_dir


def converted_torchvision(spec: str, field: str) -> str:
  """A Flax model directory made from torchvision weights, converted once and cached
  (keyed by the weights' sha256); the variable may also name a converted directory."""
  resource = resources.lookup(spec, field)
  value = os.path.expanduser(os.environ.get(resource.env, "")) if resource.env else ""
  if value and os.path.isfile(os.path.join(value, "config.json")):
    return value  # already converted
  weights = resources.local_path(spec, field)
  out = os.path.join(resources.cache_root(), "converted", f"{resource.filename}-{resources.sha256_of(weights)[:16]}")
  if os.path.isfile(os.path.join(out, "config.json")):
    return out
  logging.info("Converting %s to a Flax model in %s (once).", weights, out)
  state = read_state_dict(weights, field)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".converting-", dir=os.path.dirname(out))
  try:
    if is_vit(state):
      save_flax_vit(state, tmp)
    else:
      save_flax_resnet(state, tmp)
    os.replace(tmp, out)
  except OSError:
    if not os.path.isfile(os.path.join(out, "config.json")):  # not a concurrent run's
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--weights", required=True, help=".pth, .pt or .safetensors")
  parser.add_argument("--out", required=True)
  parser.add_argument("--class_names", default=None,
                      help="text file, one class name a line, in the fc layer's order")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--num_heads", type=int, default=None,
                      help="ViT attention heads (default: hidden size / 64)")
  args = parser.parse_args(argv)
  names = None
  if args.class_names:
    with open(args.class_names, encoding="utf-8") as f:
      names = [line.strip() for line in f if line.strip()]
  try:
    state = read_state_dict(args.weights, "weights")
    if is_vit(state):
      path = save_flax_vit(state, args.out, names, args.num_heads)
    else:
      path = save_flax_resnet(state, args.out, names, args.image_size)
  except errors.UserError as err:
    raise SystemExit(f"error: {err.one_line()}") from None
  except ValueError as err:
    raise SystemExit(f"error: weights: {err}. Fix: give a torchvision ResNet or ViT "
                     "state dict (and as many class names as outputs).") from None
  print(f"Wrote {path}: use it as --config.target_model={path}")


if __name__ == "__main__":
  entry.run(main)

"""torchvision-layout ResNet weights converted to Flax equal a NumPy forward pass that
reads the torchvision arrays directly (basic and bottleneck blocks)."""
import collections
import io
import os
import pickle
import subprocess
import sys
import tempfile
import types
import zipfile

from absl.testing import absltest
from absl.testing import parameterized
import pytest
import numpy as np

from jaxdissect import errors
from jaxdissect.models import targets
from jaxdissect.models import torchvision

EPS = 1e-5


# ---------------------------------------------------------------- torchvision layout
def make_state(kind: str, seed: int = 0) -> dict[str, np.ndarray]:
  """A random torchvision ResNet state dict: basic [8,16,16,24] x [1,2,1,1] or
  bottleneck planes [4,4,8,8] (x4 out) x [1,2,1,1], 5 classes."""
  rng = np.random.default_rng(seed)
  state = {}

  def conv(name, out_ch, in_ch, size):
    fan_in = in_ch * size * size
    state[f"{name}.weight"] = (rng.standard_normal((out_ch, in_ch, size, size)) *
                               np.sqrt(2.0 / fan_in)).astype(np.float32)

  def bn(name, ch):
    state[f"{name}.weight"] = rng.uniform(0.5, 1.5, ch).astype(np.float32)
    state[f"{name}.bias"] = rng.normal(0, 0.1, ch).astype(np.float32)
    state[f"{name}.running_mean"] = rng.normal(0, 0.1, ch).astype(np.float32)
    state[f"{name}.running_var"] = rng.uniform(0.5, 2.0, ch).astype(np.float32)
    state[f"{name}.num_batches_tracked"] = np.array(100, np.int64)

  conv("conv1", 8, 3, 7)
  bn("bn1", 8)
  in_ch = 8
  planes, depths = ([8, 16, 16, 24] if kind == "basic" else [4, 4, 8, 8]), [1, 2, 1, 1]
  for stage, (width, depth) in enumerate(zip(planes, depths), 1):
    out_ch = width if kind == "basic" else width * 4
    for block in range(depth):
      name = f"layer{stage}.{block}"
      stride = 2 if stage > 1 and block == 0 else 1
      if kind == "basic":
        conv(f"{name}.conv1", width, in_ch, 3)
        bn(f"{name}.bn1", width)
        conv(f"{name}.conv2", width, width, 3)
        bn(f"{name}.bn2", width)
      else:
        conv(f"{name}.conv1", width, in_ch, 1)
        bn(f"{name}.bn1", width)
        conv(f"{name}.conv2", width, width, 3)
        bn(f"{name}.bn2", width)
        conv(f"{name}.conv3", out_ch, width, 1)
        bn(f"{name}.bn3", out_ch)
      if stride != 1 or in_ch != out_ch:
        conv(f"{name}.downsample.0", out_ch, in_ch, 1)
        bn(f"{name}.downsample.1", out_ch)
      in_ch = out_ch
  state["fc.weight"] = rng.normal(0, 0.3, (5, in_ch)).astype(np.float32)
  state["fc.bias"] = rng.normal(0, 0.1, 5).astype(np.float32)
  return state


def np_conv(x, weight, stride=1):
  """NCHW x OIHW, padding size // 2, in float64."""
  size = weight.shape[2]
  pad = size // 2
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  windows = np.lib.stride_tricks.sliding_window_view(x, (size, size), axis=(2, 3))
  windows = windows[:, :, ::stride, ::stride]  # (N, C, H', W', kh, kw)
  return np.einsum("nchwij,ocij->nohw", windows, weight.astype(np.float64))


def np_bn(x, state, name):
  scale = state[f"{name}.weight"] / np.sqrt(state[f"{name}.running_var"] + EPS)
  shift = state[f"{name}.bias"] - state[f"{name}.running_mean"] * scale
  return x * scale[None, :, None, None] + shift[None, :, None, None]


def np_maxpool(x):
  x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
  windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))
  return windows[:, :, ::2, ::2].max(axis=(-1, -2))


def np_forward(state, pixels_nchw):
  """torchvision's ResNet forward from its own arrays: (logits, [layer1..layer4])."""
  relu = lambda v: np.maximum(v, 0)  # noqa: E731
  bottleneck = "layer1.0.conv3.weight" in state
  x = relu(np_bn(np_conv(pixels_nchw, state["conv1.weight"], 2), state, "bn1"))
  x = np_maxpool(x)
  stages = []
  for stage in range(1, 5):
    block = 0
    while f"layer{stage}.{block}.conv1.weight" in state:
      name = f"layer{stage}.{block}"
      stride = 2 if stage > 1 and block == 0 else 1
      if bottleneck:
        out = relu(np_bn(np_conv(x, state[f"{name}.conv1.weight"]), state, f"{name}.bn1"))
        out = relu(np_bn(np_conv(out, state[f"{name}.conv2.weight"], stride), state,
                         f"{name}.bn2"))
        out = np_bn(np_conv(out, state[f"{name}.conv3.weight"]), state, f"{name}.bn3")
      else:
        out = relu(np_bn(np_conv(x, state[f"{name}.conv1.weight"], stride), state,
                         f"{name}.bn1"))
        out = np_bn(np_conv(out, state[f"{name}.conv2.weight"]), state, f"{name}.bn2")
      if f"{name}.downsample.0.weight" in state:
        x = np_bn(np_conv(x, state[f"{name}.downsample.0.weight"], stride), state,
                  f"{name}.downsample.1")
      x = relu(out + x)
      block += 1
    stages.append(x)
  pooled = x.mean(axis=(2, 3))
  return pooled @ state["fc.weight"].T.astype(np.float64) + state["fc.bias"], stages


# ------------------------------------------------ a torch zip file written without torch
class _Storage:
  def __init__(self, array):
    self.array = np.ascontiguousarray(array)


class _Tensor:
  def __init__(self, array):
    self.array = np.ascontiguousarray(array)

  def __reduce__(self):
    strides = tuple(s // self.array.itemsize for s in self.array.strides)
    return (_FAKE_TORCH_UTILS._rebuild_tensor_v2,
            (_Storage(self.array), 0, self.array.shape, strides, False,
             collections.OrderedDict()))


def _fake_rebuild(*args):
  return args


_FAKE_TORCH = types.ModuleType("torch")
_FAKE_TORCH_UTILS = types.ModuleType("torch._utils")
_fake_rebuild.__module__, _fake_rebuild.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
_FAKE_TORCH_UTILS._rebuild_tensor_v2 = _fake_rebuild
_STORAGE_CLASSES = {}
for _name, _dtype in (("FloatStorage", np.float32), ("LongStorage", np.int64)):
  _cls = type(_name, (), {"__module__": "torch"})
  setattr(_FAKE_TORCH, _name, _cls)
  _STORAGE_CLASSES[np.dtype(_dtype)] = _cls


def write_torch_zip(path, state):
  """The layout torch.save writes: archive/data.pkl + archive/data/<key> storages."""
  storages = []

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, _Storage):
        storages.append(obj.array)
        key = str(len(storages) - 1)
        return ("storage", _STORAGE_CLASSES[obj.array.dtype], key, "cpu", obj.array.size)
      return None

  saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
  sys.modules.update({"torch": _FAKE_TORCH, "torch._utils": _FAKE_TORCH_UTILS})
  try:
    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(collections.OrderedDict(
        (k, _Tensor(v)) for k, v in state.items()))
  finally:
    for name, module in saved.items():
      if module is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = module
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", buffer.getvalue())
    for key, array in enumerate(storages):
      archive.writestr(f"archive/data/{key}", array.tobytes())


class ConversionTest(parameterized.TestCase):

  @parameterized.product(kind=["basic", "bottleneck"], fmt=["safetensors", "pth"])
  @pytest.mark.slow
  def test_converted_flax_equals_numpy_reference(self, kind, fmt):
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    from transformers import FlaxResNetForImageClassification  # pylint: disable=g-import-not-at-top
    state = make_state(kind, seed=1 if kind == "basic" else 2)
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, f"weights.{fmt}")
    if fmt == "safetensors":
      save_file(state, path)
    else:
      write_torch_zip(path, state)
    read = torchvision.read_state_dict(path)
    self.assertCountEqual(read, state)
    names = ["apple", "boat", "cat", "dog", "egg"]
    out = torchvision.save_flax_resnet(read, os.path.join(tmp, "flax"), names,
                                       image_size=48)
    model = FlaxResNetForImageClassification.from_pretrained(out)
    pixels = np.random.default_rng(3).standard_normal((2, 3, 48, 48)).astype(np.float32)
    outputs = model(pixels, output_hidden_states=True)
    logits, stages = np_forward(state, pixels.astype(np.float64))
    np.testing.assert_allclose(np.asarray(outputs.logits), logits, rtol=1e-4, atol=1e-4)
    for got, expected in zip(outputs.hidden_states[1:], stages):
      np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)
    # The friendly names of the paper's layers resolve on the converted model.
    target = targets.load_target(out)
    self.assertEqual(target.id2label, dict(enumerate(names)))
    self.assertEqual([i.num_units for i in target.resolve_layers(["layer4", "fc"])],
                     [state["fc.weight"].shape[1], 5])

  def test_checkpoint_globals_other_than_tensors_are_refused(self):
    path = os.path.join(tempfile.mkdtemp(), "evil.pth")
    with zipfile.ZipFile(path, "w") as archive:
      archive.writestr("archive/data.pkl", pickle.dumps({"x": os.system}))
    with self.assertRaisesRegex(errors.UserError, "posix.system|os.system|not allowed"):
      torchvision.read_state_dict(path)

  def test_legacy_pth_names_the_conversion(self):
    path = os.path.join(tempfile.mkdtemp(), "old.pth")
    with open(path, "wb") as f:
      f.write(pickle.dumps({"not": "zip"}))
    with self.assertRaisesRegex(errors.UserError, "needs torch.*safetensors"):
      torchvision.read_state_dict(path)

  @pytest.mark.slow
  def test_cli_writes_a_target_directory(self):
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    tmp = tempfile.mkdtemp()
    save_file(make_state("basic"), os.path.join(tmp, "r18.safetensors"))
    proc = subprocess.run(
        [sys.executable, "-m", "jaxdissect.models.torchvision", "--weights",
         os.path.join(tmp, "r18.safetensors"), "--out", os.path.join(tmp, "out")],
        capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    self.assertIn("--config.target_model=", proc.stdout)
    # Without --class_names the outputs are named class_0.., which are never truth;
    # config.class_names names them.
    target = targets.load_target(os.path.join(tmp, "out"))
    self.assertIsNone(target.id2label)
    self.assertEqual(target.ground_truth, {})
    names = os.path.join(tmp, "names.txt")
    with open(names, "w", encoding="utf-8") as f:
      f.write("\n".join(f"thing {i}" for i in range(5)))
    target = targets.load_target(os.path.join(tmp, "out"), class_names=names)
    self.assertEqual(target.id2label[0], "thing 0")
    self.assertEqual(target.ground_truth["fc"][4], "thing 4")
    with open(names, "a", encoding="utf-8") as f:
      f.write("\none too many\n")
    with self.assertRaisesRegex(errors.UserError, "6 class names but .* has 5 outputs"):
      targets.load_target(os.path.join(tmp, "out"), class_names=names)


if __name__ == "__main__":
  absltest.main()

"""Checkpoints as users bring them, loaded without torch, checked against torch itself.

Tiny CLIP, ResNet and ViT models are built and saved by transformers' PyTorch classes
(PyTorch-format safetensors, sharded safetensors, pickle-only), by its Flax classes
(msgpack and Flax-format safetensors), and loaded through jaxdissect's loaders; CLIP
embeddings and every target layer's activations must equal PyTorch's forward pass.
torch is only the reference here (skipped with a reason where it is not installed).
"""
import os

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from jaxdissect import errors
from jaxdissect import tiny_models
from jaxdissect.models import checkpoints
from jaxdissect.models import clip as clip_lib
from jaxdissect.models import targets

try:
  import torch  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover - CI installs the CPU wheel
  torch = None

TOLERANCE = 1e-4
NUM_LABELS = 5


def _clip_config():
  import transformers  # pylint: disable=g-import-not-at-top
  vocab_size = 2 * 256 + 2
  return transformers.CLIPConfig(
      text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2,
                       max_position_embeddings=32, bos_token_id=vocab_size - 2,
                       eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, image_size=32, patch_size=8),
      projection_dim=16)


def _labels():
  return {i: f"thing {i}" for i in range(NUM_LABELS)}


def _resnet_config(layer_type):
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.ResNetConfig(
      embedding_size=8, hidden_sizes=[8, 16, 16, 24], depths=[1, 2, 1, 1],
      layer_type=layer_type, num_labels=NUM_LABELS, id2label=_labels(),
      label2id={v: k for k, v in _labels().items()},
      architectures=["ResNetForImageClassification"])


def _vit_config():
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.ViTConfig(
      image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
      num_attention_heads=2, intermediate_size=64, num_labels=NUM_LABELS,
      id2label=_labels(), label2id={v: k for k, v in _labels().items()},
      architectures=["ViTForImageClassification"])


def _randomise_batch_norm(model):
  """Non-trivial running statistics, so that a wrong batch_stats mapping shows."""
  generator = torch.Generator().manual_seed(0)
  for module in model.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
      module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
      module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
      module.bias.data.copy_(torch.randn(module.num_features, generator=generator))


def torch_layer_outputs(model, modules: dict, pixels_nchw: np.ndarray) -> dict:
  """{name: output of module (NHWC for feature maps)} from one torch forward pass."""
  outputs, handles = {}, []
  for name, module in modules.items():
    def hook(_, __, output, name=name):
      output = output[0] if isinstance(output, tuple) else output
      array = output.detach().numpy()
      outputs[name] = array.transpose(0, 2, 3, 1) if array.ndim == 4 else array
    handles.append(module.register_forward_hook(hook))
  with torch.no_grad():
    model(pixel_values=torch.from_numpy(pixels_nchw))
  for handle in handles:
    handle.remove()
  return outputs


def flax_layer_outputs(target, names, pixels_nhwc) -> dict:
  infos = target.resolve_layers(names)
  _, intermediates = target.forward(target.variables, pixels_nhwc,
                                    capture=targets.capture_filter([i.path for i in infos]))
  return {i.name: np.asarray(targets.get_intermediate(intermediates, i.path))
          for i in infos}


@absltest.skipIf(torch is None, "torch (CPU) is the reference here and is not installed; "
                 ".ci/run installs it")
class PyTorchCheckpointTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = self.create_tempdir().full_path
    torch.manual_seed(0)
    self.pixels = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(
        np.float32)

  def _save(self, model, name, **kwargs) -> str:
    path = os.path.join(self.tmp, name)
    model.save_pretrained(path, **kwargs)
    return path

  def _torch_clip(self):
    import transformers  # pylint: disable=g-import-not-at-top
    model = transformers.CLIPModel(_clip_config()).eval()
    with torch.no_grad():  # spread the image embeddings (as tiny_models does)
      for name, param in model.named_parameters():
        if "vision_model" in name and name.endswith("weight") and param.ndim > 1:
          param.mul_(8.0)
    return model

  @parameterized.named_parameters(("safetensors", {}),
                                  ("sharded", {"max_shard_size": "40KB"}))
  def test_pytorch_clip_equals_torch(self, save_kwargs):
    model = self._torch_clip()
    path = self._save(model, "clip", **save_kwargs)
    tiny_models.write_clip_tokenizer(path)
    if save_kwargs:
      self.assertTrue(os.path.isfile(os.path.join(path, checkpoints.SAFE_INDEX)))
    clip = clip_lib.load_clip(path)
    ours = np.asarray(jax.jit(clip.image_embeddings)(clip.params, self.pixels))
    with torch.no_grad():
      theirs = model.get_image_features(
          pixel_values=torch.from_numpy(self.pixels.transpose(0, 3, 1, 2))).numpy()
    theirs /= np.linalg.norm(theirs, axis=1, keepdims=True)
    np.testing.assert_allclose(ours, theirs, atol=TOLERANCE)
    texts = ["red", "a striped dog", "x"]
    ids, mask = clip.tokenize(texts)
    with torch.no_grad():
      theirs = model.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                       attention_mask=torch.from_numpy(mask).long()).numpy()
    theirs /= np.linalg.norm(theirs, axis=1, keepdims=True)
    np.testing.assert_allclose(clip_lib.embed_texts(clip, texts), theirs, atol=TOLERANCE)

  @parameterized.parameters("basic", "bottleneck")
  def test_pytorch_resnet_layers_equal_torch(self, layer_type):
    import transformers  # pylint: disable=g-import-not-at-top
    model = transformers.ResNetForImageClassification(_resnet_config(layer_type)).eval()
    _randomise_batch_norm(model)
    path = self._save(model, f"resnet-{layer_type}", max_shard_size="30KB")
    target = targets.load_target(path)
    names = ["conv1", "layer1", "layer2", "layer3", "layer4", "fc"]
    modules = {"conv1": model.resnet.embedder.embedder.convolution,
               "fc": model.classifier}
    modules.update({f"layer{i + 1}": stage
                    for i, stage in enumerate(model.resnet.encoder.stages)})
    expected = torch_layer_outputs(model, modules, self.pixels.transpose(0, 3, 1, 2))
    ours = flax_layer_outputs(target, names, self.pixels)
    for name in names:
      np.testing.assert_allclose(ours[name], expected[name], atol=TOLERANCE,
                                 rtol=TOLERANCE, err_msg=name)
    self.assertEqual(target.ground_truth["fc"], [f"thing {i}" for i in range(NUM_LABELS)])

  def test_pytorch_vit_layers_equal_torch(self):
    import transformers  # pylint: disable=g-import-not-at-top
    model = transformers.ViTForImageClassification(_vit_config()).eval()
    path = self._save(model, "vit")
    target = targets.load_target(path)
    names = ["conv_proj", "encoder_layer_0", "encoder_layer_1", "fc"]
    modules = {"conv_proj": model.vit.embeddings.patch_embeddings.projection,
               "encoder_layer_0": model.vit.encoder.layer[0],
               "encoder_layer_1": model.vit.encoder.layer[1], "fc": model.classifier}
    expected = torch_layer_outputs(model, modules, self.pixels.transpose(0, 3, 1, 2))
    ours = flax_layer_outputs(target, names, self.pixels)
    for name in names:
      np.testing.assert_allclose(ours[name], expected[name], atol=TOLERANCE,
                                 rtol=TOLERANCE, err_msg=name)

  def test_pickle_only_directory_names_the_conversion_and_it_works(self):
    import transformers  # pylint: disable=g-import-not-at-top
    model = transformers.ResNetForImageClassification(_resnet_config("basic")).eval()
    _randomise_batch_norm(model)
    path = self._save(model, "pickled", safe_serialization=False)
    self.assertEqual(checkpoints.find_weights(os.listdir(path)), checkpoints.TORCH_WEIGHTS)
    with self.assertRaises(errors.UserError) as caught:
      targets.load_target(path)
    message = caught.exception.one_line()
    self.assertIn(checkpoints.TORCH_WEIGHTS, message)
    self.assertIn(f"python -m jaxdissect.models.checkpoints {path}", message)
    self.assertEqual(checkpoints.main([path]), 0)
    target = targets.load_target(path)
    expected = torch_layer_outputs(model, {"fc": model.classifier},
                                   self.pixels.transpose(0, 3, 1, 2))
    np.testing.assert_allclose(flax_layer_outputs(target, ["fc"], self.pixels)["fc"],
                               expected["fc"], atol=TOLERANCE, rtol=TOLERANCE)


class FlaxCheckpointTest(parameterized.TestCase):
  """Flax-saved formats need no torch at all."""

  @parameterized.named_parameters(("msgpack", False), ("flax_safetensors", True))
  def test_flax_formats_load_identically(self, safetensors):
    import transformers  # pylint: disable=g-import-not-at-top
    tmp = self.create_tempdir().full_path
    model = transformers.FlaxResNetForImageClassification(_resnet_config("bottleneck"),
                                                          seed=3)
    path = os.path.join(tmp, "resnet")
    model.save_pretrained(path, safe_serialization=safetensors)
    self.assertEqual(checkpoints.find_weights(os.listdir(path)),
                     checkpoints.SAFE_WEIGHTS if safetensors else checkpoints.FLAX_WEIGHTS)
    target = targets.load_target(path)
    chex_equal = jax.tree.map(lambda a, b: np.testing.assert_array_equal(
        np.asarray(a), np.asarray(b)), target.variables, dict(model.params))
    del chex_equal

  def test_problems_name_the_file(self):
    import transformers  # pylint: disable=g-import-not-at-top
    tmp = self.create_tempdir().full_path
    config = _resnet_config("basic")
    config.save_pretrained(tmp)
    with self.assertRaisesRegex(errors.UserError, "holds no weights file.*config.json"):
      targets.load_target(tmp)
    # A checkpoint of another shape: the error names the file and the mismatch.
    other = transformers.FlaxResNetForImageClassification(_resnet_config("bottleneck"))
    other.save_pretrained(tmp, safe_serialization=True)
    config.save_pretrained(tmp)
    with self.assertRaisesRegex(errors.UserError, "model.safetensors.*(not in it|shapes)"):
      targets.load_target(tmp)
    with open(os.path.join(tmp, "model.safetensors"), "r+b") as f:
      f.truncate(100)
    with self.assertRaisesRegex(errors.UserError, "model.safetensors"):
      targets.load_target(tmp)


if __name__ == "__main__":
  absltest.main()

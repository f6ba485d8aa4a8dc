"""Target loading, layer names and capture: the jitted probe step against direct forwards."""
import dataclasses
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import transformers

from jaxdissect import activations
from jaxdissect import errors
from jaxdissect import sharding
from jaxdissect.data import preprocessing
from jaxdissect.models import clip as clip_lib
from jaxdissect.models import targets
import tiny_fixtures


class TinyConvNet(nn.Module):
  """A plain flax module used as a python:pkg.module:factory target."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3), name="conv")(x))
    return nn.Dense(4, name="head")(jnp.mean(x, axis=(1, 2)))


def make_tiny_conv_target():
  module = TinyConvNet()
  variables = module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  return module, variables, preprocessing.ImageTransform(resize_to=(16, 16))


def pool_np(array, mode):
  array = np.asarray(array)
  if array.ndim == 2:
    return array
  return array.max(axis=(1, 2)) if mode == "max" else array.mean(axis=(1, 2))


class ModelsTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.clip_dir = tiny_fixtures.clip()
    cls.basic_dir = tiny_fixtures.resnet("basic")
    cls.bottleneck_dir = tiny_fixtures.resnet("bottleneck", safetensors=True)
    cls.vit_dir = tiny_fixtures.vit()
    cls.clip = clip_lib.load_clip(cls.clip_dir)

  def _probe_step(self, target, names, pool_mode="avg", token_pool="cls"):
    infos = target.resolve_layers(names)
    step = activations.make_probe_step(self.clip, target, infos, pool_mode, token_pool)
    rng = np.random.default_rng(0)
    size = target.transform.output_size
    target_pixels = rng.standard_normal((3, *size, 3)).astype(np.float32)
    clip_pixels = rng.standard_normal((3, 32, 32, 3)).astype(np.float32)
    embeddings, pooled, _ = step(self.clip.params, target.variables, clip_pixels,
                                 target_pixels, np.arange(3, dtype=np.int32),
                                 np.ones(3, bool), activations.initial_state(infos))
    return infos, target_pixels, np.asarray(embeddings), pooled

  @parameterized.product(kind=["basic", "bottleneck"], pool_mode=["avg", "max"])
  def test_resnet_capture_equals_direct_forward(self, kind, pool_mode):
    path = self.basic_dir if kind == "basic" else self.bottleneck_dir
    target = targets.load_target(path)
    names = ["conv1", "layer1", "layer2", "layer3", "layer4", "fc"]
    infos, pixels, _, pooled = self._probe_step(target, names, pool_mode)
    # Independent references: HF's own forward (stage outputs, logits) and the stem
    # convolution computed with lax.conv from its kernel.
    hf = transformers.FlaxResNetForImageClassification.from_pretrained(path)
    out = hf(pixels.transpose(0, 3, 1, 2), output_hidden_states=True)
    stages = [np.asarray(h).transpose(0, 2, 3, 1) for h in out.hidden_states[1:]]
    kernel = target.variables["params"]["resnet"]["embedder"]["embedder"]["convolution"][
        "kernel"]
    conv1 = jax.lax.conv_general_dilated(pixels, kernel, (2, 2), ((3, 3), (3, 3)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
    expected = {"conv1": pool_np(conv1, pool_mode), "fc": np.asarray(out.logits)}
    for i, stage in enumerate(stages):
      expected[f"layer{i + 1}"] = pool_np(stage, pool_mode)
    for info in infos:
      self.assertEqual(pooled[info.name].shape, (3, info.num_units))
      np.testing.assert_allclose(np.asarray(pooled[info.name]), expected[info.name],
                                 rtol=1e-4, atol=1e-4, err_msg=info.name)

  @parameterized.parameters("cls", "avg_patches")
  def test_vit_tokens_and_module_paths(self, token_pool):
    target = targets.load_target(self.vit_dir)
    names = ["encoder_layer_1", "encoder.layer.0.intermediate", "fc"]
    infos, pixels, _, pooled = self._probe_step(target, names, token_pool=token_pool)
    self.assertEqual([i.path for i in infos], ["vit/encoder/layer/1",
                                                "vit/encoder/layer/0/intermediate",
                                                "classifier"])
    hf = transformers.FlaxViTForImageClassification.from_pretrained(self.vit_dir)
    out = hf(pixels.transpose(0, 3, 1, 2), output_hidden_states=True)
    block = np.asarray(out.hidden_states[2])
    expected = block[:, 0] if token_pool == "cls" else block[:, 1:].mean(axis=1)
    np.testing.assert_allclose(np.asarray(pooled["encoder_layer_1"]), expected, rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(np.asarray(pooled["fc"]), np.asarray(out.logits), rtol=1e-4,
                               atol=1e-4)
    self.assertEqual(pooled["encoder.layer.0.intermediate"].shape, (3, 32))

  def test_clip_embeddings_match_hf_and_are_normalised(self):
    hf = transformers.FlaxCLIPModel.from_pretrained(self.clip_dir)
    pixels = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    ours = np.asarray(self.clip.image_embeddings(self.clip.params, pixels))
    theirs = np.asarray(hf.get_image_features(pixels.transpose(0, 3, 1, 2)))
    theirs = theirs / np.linalg.norm(theirs, axis=1, keepdims=True)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    texts = ["red", "a striped dog", ""]
    tokenizer = transformers.AutoTokenizer.from_pretrained(self.clip_dir)
    encoded = tokenizer(texts, padding="max_length", max_length=32, return_tensors="np")
    theirs = np.asarray(hf.get_text_features(encoded["input_ids"],
                                             encoded["attention_mask"]))
    theirs = theirs / np.linalg.norm(theirs, axis=1, keepdims=True)
    np.testing.assert_allclose(clip_lib.embed_texts(self.clip, texts, batch_size=2),
                               theirs, rtol=1e-4, atol=1e-5)

  def test_text_batches_take_few_shapes_and_compile_once_each(self):
    self.assertEqual([sharding.compiled_batch_rows(n, 256) for n in (1, 2, 3, 56, 64, 65,
                                                                      206, 256, 257, 20000)],
                     [1, 2, 4, 64, 64, 128, 256, 256, 256, 256])
    self.assertEqual(sharding.compiled_batch_rows(5, 3), 3)
    clip = dataclasses.replace(self.clip)  # its own jitted step, nothing compiled yet
    texts = ["red", "a striped dog", "", "blue", "green"]
    whole = clip_lib.embed_texts(clip, texts)
    # 3 texts run as a batch of 4, as the 5 ran in a batch of 8: two compiled shapes,
    # and more calls of those shapes compile nothing.
    part = clip_lib.embed_texts(clip, texts[:3])
    np.testing.assert_allclose(part, whole[:3], rtol=1e-5, atol=1e-6)
    self.assertEqual(clip.jitted_text_embeddings._cache_size(), 2)
    clip_lib.embed_texts(clip, texts[1:4])
    clip_lib.embed_texts(clip, texts[:1] * 7)
    self.assertEqual(clip.jitted_text_embeddings._cache_size(), 2)

  def test_unknown_layer_lists_valid_names(self):
    target = targets.load_target(self.basic_dir)
    with self.assertRaises(errors.UserError) as ctx:
      target.resolve_layers(["layer9"])
    self.assertEqual(ctx.exception.field, "target_layers")
    for name in ("layer9", "conv1", "layer4", "fc", "--list_layers"):
      self.assertIn(name, ctx.exception.one_line())

  def test_layer_table_lists_friendly_names_and_paths(self):
    table = targets.load_target(self.basic_dir).layer_table()
    names = [row.name for row in table]
    self.assertEqual(names[:6], ["conv1", "layer1", "layer2", "layer3", "layer4", "fc"])
    self.assertIn("resnet.encoder.stages.1.layers.0.shortcut", names)
    self.assertEqual(dict((r.name, r.num_units) for r in table)["layer4"], 24)

  def test_id2label_and_placeholder_names(self):
    self.assertEqual(targets.load_target(self.basic_dir).id2label[2], "cat")
    with tempfile.TemporaryDirectory() as tmp:
      config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 8, 8],
                                         depths=[1, 1, 1, 1], num_labels=3)
      transformers.FlaxResNetForImageClassification(config).save_pretrained(tmp)
      self.assertIsNone(targets.load_target(tmp).id2label)

  def test_python_factory_target(self):
    target = targets.load_target("python:models_test:make_tiny_conv_target")
    infos, pixels, _, pooled = self._probe_step(target, ["conv", "head"], "max")
    # The captured "conv" output is the convolution before the relu.
    kernel = target.variables["params"]["conv"]["kernel"]
    bias = target.variables["params"]["conv"]["bias"]
    direct = jax.lax.conv_general_dilated(pixels, kernel, (1, 1), "SAME",
                                          dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
    np.testing.assert_allclose(np.asarray(pooled["conv"]), pool_np(direct, "max"),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(pooled["head"]),
                               np.asarray(TinyConvNet().apply(target.variables, pixels)),
                               rtol=1e-5, atol=1e-5)

  def test_bad_model_locations_are_user_errors(self):
    with self.assertRaises(errors.UserError) as ctx:
      targets.load_target(os.path.join(self.tmp, "missing"))
    self.assertEqual(ctx.exception.field, "target_model")
    with self.assertRaises(errors.UserError) as ctx:
      targets.load_target(self.clip_dir)  # a CLIP is not a supported target
    self.assertIn("clip", ctx.exception.one_line())
    with self.assertRaises(errors.UserError) as ctx:
      clip_lib.load_clip(self.basic_dir)
    self.assertEqual(ctx.exception.field, "clip_model")
    with self.assertRaises(errors.UserError):
      targets.load_target("python:no_such_module_xyz:factory")

  def test_params_fingerprint_sees_every_weight(self):
    target = targets.load_target(self.basic_dir)
    before = targets.params_fingerprint(target.variables)
    changed = jax.tree_util.tree_map(np.array, target.variables)
    changed["batch_stats"]["resnet"]["embedder"]["embedder"]["normalization"]["mean"][0] += 1
    self.assertNotEqual(before, targets.params_fingerprint(changed))
    self.assertEqual(before, targets.params_fingerprint(target.variables))


if __name__ == "__main__":
  absltest.main()

"""Our TF transforms against the HF image processors' NumPy/PIL output."""
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np
import tensorflow as tf
from transformers import CLIPImageProcessor, ConvNextImageProcessor, ViTImageProcessor

from jaxdissect import tiny_models
from jaxdissect.data import preprocessing
from jaxdissect.models import clip as clip_lib

PROCESSORS = {
    "clip": lambda: CLIPImageProcessor(size={"shortest_edge": 224},
                                       crop_size={"height": 224, "width": 224}),
    "convnext_resnet": lambda: ConvNextImageProcessor(
        size={"shortest_edge": 224}, crop_pct=0.875, resample=3,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
    "convnext_large": lambda: ConvNextImageProcessor(size={"shortest_edge": 384}),
    "vit": lambda: ViTImageProcessor(size={"height": 224, "width": 224}, resample=2),
}
SHAPES = [(300, 400), (500, 333), (100, 120), (224, 224), (37, 300)]


def natural_image(shape, seed):
  """Smooth gradients plus texture: resampling differences show up as in photos."""
  rng = np.random.default_rng(seed)
  h, w = shape
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  image = np.stack([128 + 100 * np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)],
                   axis=-1)
  image += rng.normal(0, 20, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


class PreprocessingParityTest(parameterized.TestCase):

  @parameterized.product(name=sorted(PROCESSORS), shape=SHAPES)
  def test_matches_hf_processor(self, name, shape):
    processor = PROCESSORS[name]()
    transform = preprocessing.transform_from_processor_config(processor.to_dict())
    image = natural_image(shape, seed=len(name) + shape[0])
    expected = processor(images=image, return_tensors="np")["pixel_values"][0]
    expected = expected.transpose(1, 2, 0)
    ours = preprocessing.apply_transform(tf.constant(image), transform).numpy()
    self.assertEqual(ours.shape, expected.shape)
    # In uint8 levels: PIL's fixed-point weights and TF's float ones round differently
    # by one level at most for nearly every pixel (measured: bicubic mean < 0.002).
    levels = np.abs(ours - expected) * np.asarray(transform.std) * 255
    self.assertLessEqual(levels.max(), 2.01)
    self.assertLessEqual(np.mean(levels > 1.01), 1e-3)
    self.assertLess(levels.mean(), 0.3)

  def test_convnext_crop_pct_resizes_then_crops(self):
    transform = preprocessing.transform_from_processor_config(
        PROCESSORS["convnext_resnet"]().to_dict())
    self.assertEqual(transform.resize_shortest_edge, 256)
    self.assertEqual(transform.crop_size, (224, 224))
    self.assertEqual(transform.resample, "bicubic")

  def test_clip_embeddings_agree(self):
    with tempfile.TemporaryDirectory() as tmp:
      path = tiny_models.make_tiny_clip(os.path.join(tmp, "clip"), image_size=32)
      clip = clip_lib.load_clip(path)
      processor = CLIPImageProcessor.from_pretrained(path)
    images = [natural_image(s, seed=i) for i, s in enumerate(SHAPES)]
    expected = np.stack([processor(images=im, return_tensors="np")["pixel_values"][0]
                         .transpose(1, 2, 0) for im in images])
    ours = np.stack([preprocessing.apply_transform(tf.constant(im), clip.transform).numpy()
                     for im in images])
    embed = jax.jit(clip.image_embeddings)
    cosine = np.sum(np.asarray(embed(clip.params, ours)) *
                    np.asarray(embed(clip.params, expected)), axis=1)
    self.assertGreaterEqual(cosine.min(), 0.999)

  def test_missing_processor_config_falls_back(self):
    with tempfile.TemporaryDirectory() as tmp:
      fallback = preprocessing.ImageTransform(resize_to=(8, 8))
      self.assertEqual(preprocessing.load_transform(tmp, fallback), fallback)


if __name__ == "__main__":
  absltest.main()

"""Our transforms and decoding against the HF image processors and PIL."""
import glob
import io
import json
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np
from PIL import Image
from transformers import AutoImageProcessor
from transformers import CLIPImageProcessor, ConvNextImageProcessor, ViTImageProcessor

from jaxdissect import tiny_models
from jaxdissect.data import decode
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
PUBLISHED_CONFIGS = os.path.join(os.path.dirname(__file__), "data", "processor_configs")
# (height, width, PIL mode): non-square, tiny, huge aspect, and every colour mode a
# folder of photos holds.
IMAGE_CASES = {"rgb_landscape": (480, 640, "RGB"), "rgb_portrait": (333, 250, "RGB"),
               "tiny": (3, 5, "RGB"), "one_pixel": (1, 1, "RGB"),
               "huge_aspect": (12, 900, "RGB"), "tall_aspect": (700, 16, "RGB"),
               "grayscale": (120, 90, "L"), "grayscale_alpha": (64, 80, "LA"),
               "rgba": (150, 200, "RGBA"), "palette": (96, 128, "P")}


def published_configs() -> dict[str, dict]:
  configs = {}
  for path in sorted(glob.glob(os.path.join(PUBLISHED_CONFIGS, "*.json"))):
    with open(path, encoding="utf-8") as f:
      configs[os.path.basename(path)[:-len(".json")]] = json.load(f)
  return configs


def encoded_image(height, width, mode, seed) -> bytes:
  """A PNG of a smooth-plus-noise picture in PIL mode `mode`."""
  pixels = natural_image((height, width), seed)
  image = Image.fromarray(pixels, "RGB")
  if mode == "P":
    image = image.quantize(colors=64)
  elif mode in ("RGBA", "LA"):
    alpha = Image.fromarray(np.linspace(0, 255, height * width).reshape(height, width)
                            .astype(np.uint8), "L")
    image = image.convert(mode[:-1])
    image.putalpha(alpha)
  else:
    image = image.convert(mode)
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


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
    ours = preprocessing.apply_transform(image, transform)
    self.assertEqual(ours.shape, expected.shape)
    self.assertEqual(ours.dtype, np.float32)
    # The same PIL resize and the same float steps: equal to float32 rounding.
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)

  @parameterized.product(model=sorted(published_configs()), case=sorted(IMAGE_CASES))
  def test_published_configs_match_transformers(self, model, case):
    """The image as a user hands it to transformers (PIL, converted to RGB) against our
    decode and transform of the same file."""
    config = published_configs()[model]
    with tempfile.TemporaryDirectory() as tmp:
      with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
        json.dump(config, f)
      processor = AutoImageProcessor.from_pretrained(tmp, use_fast=False)
      transform = preprocessing.load_transform(tmp, fallback=None)
    height, width, mode = IMAGE_CASES[case]
    data = encoded_image(height, width, mode, seed=height + width)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    expected = processor(images=reference, return_tensors="np",
                         input_data_format="channels_last")["pixel_values"][0]
    expected = expected.transpose(1, 2, 0)
    decoded = decode.decode_bytes(data)
    np.testing.assert_array_equal(np.asarray(decoded), reference)
    ours = preprocessing.apply_transform(decoded, transform)
    self.assertEqual(ours.shape, expected.shape)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)

  @parameterized.named_parameters(
      ("clip_legacy_int_size_is_shortest_edge", "openai--clip-vit-base-patch16",
       dict(resize_shortest_edge=224, resize_to=None, crop_size=(224, 224),
            resample="bicubic")),
      ("clip_336", "openai--clip-vit-large-patch14-336",
       dict(resize_shortest_edge=336, crop_size=(336, 336))),
      ("resnet_legacy_crop_pct", "microsoft--resnet-50",
       dict(resize_shortest_edge=256, crop_size=(224, 224), resample="bicubic",
            mean=(0.485, 0.456, 0.406))),
      ("vit_legacy_int_size_is_square", "google--vit-base-patch16-224",
       dict(resize_shortest_edge=None, resize_to=(224, 224), crop_size=None,
            resample="bilinear", mean=(0.5, 0.5, 0.5))),
      ("deit_resize_then_crop", "deit-style",
       dict(resize_to=(256, 256), crop_size=(224, 224))),
      ("beit_without_crop", "beit-style", dict(resize_to=(224, 224), crop_size=None)),
  )
  def test_published_config_geometry(self, model, expected):
    transform = preprocessing.transform_from_processor_config(published_configs()[model])
    for field, value in expected.items():
      self.assertEqual(getattr(transform, field), value, field)

  def test_do_switches_and_padding_crop(self):
    """do_resize=False then a crop larger than the image: transformers pads with black."""
    processor = CLIPImageProcessor(do_resize=False, crop_size={"height": 40, "width": 30},
                                   do_normalize=False)
    transform = preprocessing.transform_from_processor(processor)
    self.assertIsNone(transform.resize_shortest_edge)
    self.assertIsNone(transform.resize_to)
    image = natural_image((25, 50), seed=3)
    expected = processor(images=image, return_tensors="np",
                         input_data_format="channels_last")["pixel_values"][0]
    ours = preprocessing.apply_transform(image, transform)
    np.testing.assert_allclose(ours, expected.transpose(1, 2, 0), atol=1e-6)

  def test_unsupported_processor_switch_is_a_user_error(self):
    from transformers import MobileViTImageProcessor  # pylint: disable=g-import-not-at-top
    from jaxdissect import errors  # pylint: disable=g-import-not-at-top
    with self.assertRaisesRegex(errors.UserError, "do_flip_channel_order"):
      preprocessing.transform_from_processor(MobileViTImageProcessor())

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
    ours = np.stack([preprocessing.apply_transform(im, clip.transform) for im in images])
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

"""Probe files decode as a person sees them (PIL: exif_transpose, convert("RGB")), and
what is not a regular image file is skipped with its reason, quickly."""
import io
import os
import socket
import time

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
from PIL import Image
from PIL import ImageOps
import tensorflow as tf

from jaxdissect.data import decode
from jaxdissect.data import preprocessing
from jaxdissect.data import probe

IDENTITY_8 = preprocessing.ImageTransform(resize_to=(8, 8), resample="nearest",
                                          rescale_factor=1.0, mean=(0, 0, 0),
                                          std=(1, 1, 1))


def rgb_pixels(shape=(13, 21), seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def image_in_mode(mode: str, seed: int = 0):
  """A 13 x 21 image in `mode`, with content in every channel."""
  rng = np.random.default_rng(seed)
  if mode == "I;16":
    return Image.fromarray(rng.integers(0, 65536, (13, 21), dtype=np.uint16))
  if mode == "I":
    return Image.fromarray(rng.integers(-100, 600, (13, 21), dtype=np.int32))
  if mode == "F":
    return Image.fromarray(rng.uniform(-50, 400, (13, 21)).astype(np.float32))
  rgba = Image.fromarray(np.concatenate([rgb_pixels(seed=seed), rng.integers(
      0, 256, (13, 21, 1), dtype=np.uint8)], axis=-1), "RGBA")
  if mode == "P":
    return rgba.convert("RGB").quantize(64)
  if mode == "PA":  # no file format PIL writes stores it: built in memory
    palette = rgba.convert("RGB").quantize(64)
    image = Image.new("PA", palette.size)
    image.putpalette(palette.getpalette())
    image.putdata(list(zip(palette.getdata(), rgba.getchannel("A").getdata())))
    return image
  return rgba.convert(mode)


# (mode, file format) pairs PIL writes.
MODE_CASES = [("1", "PNG"), ("L", "PNG"), ("L", "JPEG"), ("LA", "PNG"), ("P", "PNG"),
              ("P", "GIF"), ("RGB", "JPEG"), ("RGB", "PNG"), ("RGB", "WEBP"),
              ("RGB", "BMP"), ("RGB", "TIFF"), ("RGBA", "PNG"), ("RGBA", "WEBP"),
              ("RGBA", "TIFF"), ("CMYK", "JPEG"), ("CMYK", "TIFF"), ("I;16", "PNG"),
              ("I;16", "TIFF"), ("I", "TIFF"), ("F", "TIFF")]


def encode(image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def what_a_person_sees(data: bytes) -> np.ndarray:
  """The reference: transformers' load_image (PIL, exif_transpose, RGB)."""
  image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
  return np.asarray(image.convert("RGB"))


class DecodeTest(parameterized.TestCase):

  @parameterized.parameters(*MODE_CASES)
  def test_every_mode_becomes_rgb_as_pil_converts_it(self, mode, fmt):
    data = encode(image_in_mode(mode), fmt)
    decoded = decode.decode_bytes(data)
    self.assertEqual(decoded.mode, "RGB")
    np.testing.assert_array_equal(np.asarray(decoded), what_a_person_sees(data))

  def test_palette_with_transparency_and_palette_alpha(self):
    data = encode(image_in_mode("P"), "PNG", transparency=0)
    self.assertIn("transparency", Image.open(io.BytesIO(data)).info)
    np.testing.assert_array_equal(np.asarray(decode.decode_bytes(data)),
                                  what_a_person_sees(data))
    palette_alpha = image_in_mode("PA")
    self.assertEqual(palette_alpha.mode, "PA")
    np.testing.assert_array_equal(np.asarray(decode.to_rgb(palette_alpha.copy())),
                                  np.asarray(palette_alpha.convert("RGB")))

  def test_alpha_is_dropped_not_composited(self):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red, fully transparent: still red, not white
    decoded = decode.decode_bytes(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    np.testing.assert_array_equal(np.asarray(decoded)[..., 0], 200)
    np.testing.assert_array_equal(np.asarray(decoded)[..., 1:], 0)

  @parameterized.parameters(2, 3, 4, 5, 6, 7, 8)
  def test_exif_orientation_turns_photos_upright(self, orientation):
    stored = rgb_pixels((10, 16), seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(stored), "PNG", exif=exif.tobytes())
    decoded = np.asarray(decode.decode_bytes(data))
    np.testing.assert_array_equal(decoded, what_a_person_sees(data))
    # 5..8 swap the sides: a portrait photo stored landscape is fed as portrait.
    self.assertEqual(decoded.shape[:2], (16, 10) if orientation >= 5 else (10, 16))
    self.assertFalse(np.array_equal(decoded, stored) if decoded.shape == stored.shape
                     else False)

  def test_jpeg_with_orientation_6_is_rotated(self):
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = np.zeros((40, 80, 3), np.uint8)
    stored[:, :40] = (255, 0, 0)  # left half red as stored
    data = encode(Image.fromarray(stored), "JPEG", exif=exif.tobytes(), quality=95)
    decoded = np.asarray(decode.decode_bytes(data))
    self.assertEqual(decoded.shape, (80, 40, 3))
    # Orientation 6: rotate 90 degrees clockwise to display; the stored left half is
    # the displayed top half.
    self.assertGreater(decoded[:40, :, 0].mean(), 200)
    self.assertLess(decoded[40:, :, 0].mean(), 60)

  def test_animated_gif_gives_its_first_frame(self):
    frames = [Image.fromarray(np.full((6, 6, 3), v, np.uint8)) for v in (30, 220)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    decoded = np.asarray(decode.decode_bytes(buffer.getvalue()))
    np.testing.assert_allclose(decoded, 30, atol=2)

  def test_pixel_limit_is_read_from_the_header(self):
    data = encode(Image.fromarray(rgb_pixels((100, 120))), "PNG")
    with self.assertRaisesRegex(decode.BadImage, r"120x100 pixels, more than "
                                r"max_image_pixels \(11999\)"):
      decode.decode_bytes(data, decode.Limits(max_pixels=11_999))
    self.assertEqual(decode.decode_bytes(data, decode.Limits(max_pixels=12_000)).size,
                     (120, 100))

  def test_garbage_and_truncated_data(self):
    with self.assertRaisesRegex(decode.BadImage,
                                r"^cannot decode \(no image format PIL reads\)$"):
      decode.decode_bytes(b"not an image")
    data = encode(Image.fromarray(rgb_pixels((64, 64))), "PNG")
    with self.assertRaisesRegex(decode.BadImage, r"^cannot decode"):
      decode.decode_bytes(data[:len(data) // 2])


class FileTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = self.create_tempdir().full_path

  def path(self, name):
    return os.path.join(self.dir, name)

  def assert_bad(self, name, reason, limits=decode.Limits()):
    started = time.monotonic()
    with self.assertRaisesRegex(decode.BadImage, reason):
      decode.decode_file(self.path(name), limits)
    self.assertLess(time.monotonic() - started, 10, name)

  def test_only_regular_files_are_read(self):
    os.mkfifo(self.path("fifo.jpg"))
    os.symlink("/dev/zero", self.path("zero.png"))
    os.symlink(self.path("nothing.png"), self.path("dangling.png"))
    os.symlink(self.path("loop_b.png"), self.path("loop_a.png"))
    os.symlink(self.path("loop_a.png"), self.path("loop_b.png"))
    os.mkdir(self.path("directory.jpg"))
    server = socket.socket(socket.AF_UNIX)
    self.addCleanup(server.close)
    server.bind(self.path("socket.png"))
    open(self.path("empty.png"), "wb").close()
    self.assert_bad("fifo.jpg", r"^not a regular file: a FIFO")
    self.assert_bad("zero.png", r"^not a regular file: a character device")
    self.assert_bad("dangling.png", r"^missing, or a symlink to nothing")
    self.assert_bad("loop_a.png", r"^a symlink loop")
    self.assert_bad("directory.jpg", r"^not a regular file: a directory")
    self.assert_bad("socket.png", r"^not a regular file: a socket")
    self.assert_bad("empty.png", r"^an empty file")
    self.assert_bad("absent.png", r"^missing$")

  def test_byte_limit(self):
    Image.fromarray(rgb_pixels((50, 50))).save(self.path("big.png"))
    size = os.path.getsize(self.path("big.png"))
    self.assert_bad("big.png", rf"^{size} bytes, more than max_image_bytes \({size - 1}\)",
                    decode.Limits(max_bytes=size - 1))
    self.assertEqual(decode.decode_file(self.path("big.png"),
                                        decode.Limits(max_bytes=size)).size, (50, 50))

  def test_symlink_to_a_regular_image_is_read(self):
    Image.fromarray(rgb_pixels()).save(self.path("real.png"))
    os.symlink(self.path("real.png"), self.path("link.png"))
    np.testing.assert_array_equal(np.asarray(decode.decode_file(self.path("link.png"))),
                                  rgb_pixels())


class HostileFolderTest(absltest.TestCase):
  """A folder as users have them, through the probe pipeline and the skip reasons."""

  def test_folder_of_every_case(self):
    root = self.create_tempdir().full_path
    good = {}
    for i, (mode, fmt) in enumerate(MODE_CASES):
      name = f"good/{i:02d}_{mode.replace(';', '')}.{fmt.lower().replace('jpeg', 'jpg')}"
      os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
      data = encode(image_in_mode(mode, seed=i), fmt)
      with open(os.path.join(root, name), "wb") as f:
        f.write(data)
      good[name] = what_a_person_sees(data)
    # A name that is not UTF-8: read, and listed with the byte escaped.
    raw_name = os.path.join(root.encode(), b"good/zz_caf\xe9.png")
    with open(raw_name, "wb") as f:
      f.write(encode(Image.fromarray(rgb_pixels(seed=99)), "PNG"))
    good["good/zz_caf\\xe9.png"] = rgb_pixels(seed=99)
    bad = {"bad/fifo.jpg": "not a regular file: a FIFO",
           "bad/zero.png": "not a regular file: a character device",
           "bad/dangling.png": "missing, or a symlink to nothing",
           "bad/loop.png": "a symlink loop",
           "bad/empty.jpg": "an empty file",
           "bad/garbage.png": "cannot decode"}
    os.makedirs(os.path.join(root, "bad"))
    os.mkfifo(os.path.join(root, "bad/fifo.jpg"))
    os.symlink("/dev/zero", os.path.join(root, "bad/zero.png"))
    os.symlink(os.path.join(root, "nowhere.png"), os.path.join(root, "bad/dangling.png"))
    os.symlink(os.path.join(root, "bad/loop.png"), os.path.join(root, "bad/loop.png"))
    open(os.path.join(root, "bad/empty.jpg"), "wb").close()
    with open(os.path.join(root, "bad/garbage.png"), "wb") as f:
      f.write(b"\x89PNG but not really")
    with open(os.path.join(root, "notes.txt"), "w") as f:
      f.write("ignored, counted in the log")

    with self.assertLogs(level="INFO") as logs:
      source = probe.folder_source(root)
    self.assertTrue(any("1 other file(s) ignored (1 .txt)" in line for line in logs.output))
    self.assertEqual(sorted(source.image_ids), sorted([*good, *bad]))
    probe_set = probe.ProbeSet([source])
    pixels = {}
    for batch in probe_set.batches(IDENTITY_8, IDENTITY_8, 8, num_parallel_calls=4):
      for index, image_id, row, real in zip(batch["index"], batch["image_id"],
                                            batch["clip_pixels"], batch["mask"]):
        if real:
          pixels[image_id.decode()] = row
    self.assertEqual(sorted(pixels), sorted(good))
    for name, expected in good.items():
      reference = preprocessing.apply_transform(expected, IDENTITY_8)
      np.testing.assert_array_equal(pixels[name], reference, err_msg=name)
    skipped = [source.image_ids.index(name) for name in bad]
    reasons = probe_set.skip_reasons(skipped)
    for name, index in zip(bad, skipped):
      self.assertTrue(reasons[index].startswith(bad[name]), (name, reasons[index]))

  def test_ram_filesystem_folder_reads_like_a_local_one(self):
    # The gs:// code path (tf.io.gfile), on TF's in-memory filesystem.
    root = "ram://probe-folder-test"
    images = {f"cls{i % 2}/img{i}.png": rgb_pixels((9 + i, 11), seed=i) for i in range(5)}
    for name, image in images.items():
      tf.io.gfile.makedirs(f"{root}/{os.path.dirname(name)}")
      with tf.io.gfile.GFile(f"{root}/{name}", "wb") as f:
        f.write(encode(Image.fromarray(image), "PNG"))
    with tf.io.gfile.GFile(f"{root}/cls0/broken.jpg", "wb") as f:
      f.write(b"nope")
    source = probe.folder_source(root)
    self.assertEqual(source.image_ids, sorted([*images, "cls0/broken.jpg"]))
    self.assertEqual(source.class_labels, [n.split("/")[0] for n in source.image_ids])
    probe_set = probe.ProbeSet([source])
    read = probe_set.read_images(range(source.num_images), IDENTITY_8)
    for index, name in enumerate(source.image_ids):
      if name in images:
        np.testing.assert_array_equal(
            read[index], preprocessing.apply_transform(images[name], IDENTITY_8))
    broken = source.image_ids.index("cls0/broken.jpg")
    self.assertNotIn(broken, read)
    self.assertStartsWith(probe_set.skip_reasons([broken])[broken], "cannot decode")
    with self.assertRaisesRegex(Exception, "does not exist"):
      probe.folder_source("ram://no-such-folder")


if __name__ == "__main__":
  absltest.main()

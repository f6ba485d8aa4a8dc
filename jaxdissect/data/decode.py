"""Probe image files -> RGB images as a person sees them, or a reason why not.

Decoding is HF's `load_image` (what the image processors are fed): PIL opens the file,
`ImageOps.exif_transpose` turns photos upright, then `convert("RGB")`: grayscale is
repeated over the channels, palette images are looked up, alpha is dropped (not
composited on any background), CMYK is converted by PIL's formula, and 16-bit and
32-bit grayscale (I;16, I, F) are clipped to 0..255 as PIL clips them. Animated GIF and
WebP files give their first frame.

Only regular files are read: a FIFO, a device, a socket, a directory, a dangling or
looping symlink is a BadImage with its reason, found by stat before anything is opened
(and checked again on the open descriptor), so no input can block the pass or stream
without end. Files over `max_bytes` and images over `max_pixels` (read from the header
before decoding) are skipped too, which bounds decode memory.

Paths with a scheme (gs://, ram://, ...) are read through tf.io.gfile.
"""
import dataclasses
import errno
import io
import os
import stat
import warnings

from jaxdissect import resources

# What PIL and the probe folder listing both accept.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")
# Names this decoding in the activation store's keys: a change of decoder changes them.
DECODER = "pil-exif_transpose-convert_rgb"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
# 8000 x 8000: a full-size photo from any camera; about 200 MB as uint8 RGB.
DEFAULT_MAX_PIXELS = 64_000_000


class BadImage(Exception):
  """A probe record that cannot be an image; str() is the reason, one line."""


@dataclasses.dataclass(frozen=True)
class Limits:
  max_bytes: int = DEFAULT_MAX_BYTES
  max_pixels: int = DEFAULT_MAX_PIXELS


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def _not_regular(mode: int) -> str:
  return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def read_file(path: str, limits: Limits = Limits()) -> bytes:
  """The bytes of a regular file of at most limits.max_bytes; BadImage otherwise."""
  if resources.is_url(path):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    try:
      size = tf.io.gfile.stat(path).length
      _check_size(size, limits)
      with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()
    except BadImage:
      raise
    except Exception as err:  # pylint: disable=broad-except
      raise BadImage(f"cannot read ({type(err).__name__}: {_first_line(err)})") from None
  try:
    info = os.stat(path)
  except FileNotFoundError:
    raise BadImage("missing, or a symlink to nothing" if os.path.islink(path)
                   else "missing") from None
  except OSError as err:
    if err.errno == errno.ELOOP:
      raise BadImage("a symlink loop") from None
    raise BadImage(f"cannot stat ({err.strerror})") from None
  if not stat.S_ISREG(info.st_mode):
    raise BadImage(f"not a regular file: {_not_regular(info.st_mode)}")
  _check_size(info.st_size, limits)
  try:
    # O_NONBLOCK: had the path become a FIFO since the stat, opening it cannot block.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
  except OSError as err:
    raise BadImage(f"cannot open ({err.strerror})") from None
  with os.fdopen(fd, "rb") as f:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
      raise BadImage(f"not a regular file: {_not_regular(info.st_mode)}")
    # At most one byte past the limit; sized by the file, not the limit, so that a small
    # image does not allocate a buffer of max_bytes.
    data = f.read(min(info.st_size, limits.max_bytes) + 1)
  if len(data) > limits.max_bytes:
    raise BadImage(f"larger than max_image_bytes ({limits.max_bytes} bytes)")
  return data


def _check_size(size: int, limits: Limits) -> None:
  if size > limits.max_bytes:
    raise BadImage(f"{size} bytes, more than max_image_bytes ({limits.max_bytes})")
  if size == 0:
    raise BadImage("an empty file")


def decode_bytes(data: bytes, limits: Limits = Limits()):
  """Encoded image bytes -> an RGB PIL image, upright; BadImage when PIL cannot."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with warnings.catch_warnings():
      # Our own pixel limit replaces PIL's decompression-bomb warning.
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      image = Image.open(io.BytesIO(data))
      width, height = image.size
      if width * height > limits.max_pixels:
        raise BadImage(f"{width}x{height} pixels, more than max_image_pixels "
                       f"({limits.max_pixels})")
      image.load()
  except BadImage:
    raise
  except Image.UnidentifiedImageError:
    raise BadImage("cannot decode (no image format PIL reads)") from None
  except Image.DecompressionBombError as err:
    raise BadImage(f"too large to decode ({_first_line(err)})") from None
  except Exception as err:  # pylint: disable=broad-except
    # PIL raises many types (OSError for truncated data, SyntaxError for bad headers).
    raise BadImage(f"cannot decode ({type(err).__name__}: {_first_line(err)})") from None
  return to_rgb(image)


def to_rgb(image):
  """A loaded PIL image -> RGB and upright, as transformers' load_image."""
  from PIL import ImageOps  # pylint: disable=g-import-not-at-top
  try:
    ImageOps.exif_transpose(image, in_place=True)  # no copy of an upright image
  except Exception:  # pylint: disable=broad-except
    pass  # a damaged EXIF block: the pixels are still the image, as stored
  return image if image.mode == "RGB" else image.convert("RGB")


def decode_file(path: str, limits: Limits = Limits()):
  """A probe file -> an RGB PIL image, upright; BadImage with the reason otherwise."""
  return decode_bytes(read_file(path, limits), limits)


def _first_line(err: BaseException) -> str:
  text = str(err).strip()
  return " ".join(text.splitlines()[0].split())[:200] if text else "no message"

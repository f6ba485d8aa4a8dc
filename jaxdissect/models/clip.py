"""CLIP through transformers.FlaxCLIPModel: loading, image and text embeddings under jit."""
import dataclasses
from typing import Any, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect import errors
from jaxdissect import registry
from jaxdissect import sharding
from jaxdissect import similarity
from jaxdissect.data import preprocessing
from jaxdissect.models import checkpoints
from jaxdissect.models import loading


@dataclasses.dataclass
class ClipModel:
  """A Flax CLIP, its tokenizer and its image transform.

  `module` is the flax.linen FlaxCLIPModule and `params` its parameters, so the
  embedding functions below are pure and can be traced inside any jitted step.
  """
  name: str
  module: Any
  params: Any
  tokenizer: Any
  transform: preprocessing.ImageTransform
  max_text_length: int
  # text_embeddings under jit, made once per model: embed_texts is called for each
  # layer's explanation prompts, and a fresh jax.jit of the bound method compiled
  # again every call (0.75 s each for the synthetic CLIP on 2 CPU cores).
  jitted_text_embeddings: Any = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    self.jitted_text_embeddings = jax.jit(self.text_embeddings)

  @property
  def embedding_dim(self) -> int:
    return int(self.module.config.projection_dim)

  def image_embeddings(self, params, pixel_values):
    """pixel_values: (batch, h, w, 3) NHWC float -> L2-normalised (batch, dim)."""
    def features(module, pixels):
      pooled = module.vision_model(pixel_values=pixels, deterministic=True)[1]
      return module.visual_projection(pooled)

    embeddings = self.module.apply({"params": params}, pixel_values, method=features)
    return normalise(embeddings)

  def text_embeddings(self, params, input_ids, attention_mask):
    """input_ids, attention_mask: (batch, length) int -> L2-normalised (batch, dim)."""
    def features(module, ids, mask):
      position_ids = jnp.broadcast_to(jnp.arange(ids.shape[-1]), ids.shape)
      pooled = module.text_model(input_ids=ids, attention_mask=mask,
                                 position_ids=position_ids, deterministic=True)[1]
      return module.text_projection(pooled)

    embeddings = self.module.apply({"params": params}, input_ids, attention_mask,
                                   method=features)
    return normalise(embeddings)

  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-length token ids and mask, (len(texts), max_text_length) int32 each."""
    encoded = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.max_text_length, return_tensors="np")
    return (encoded["input_ids"].astype(np.int32),
            encoded["attention_mask"].astype(np.int32))


def normalise(x, axis=-1):
  return similarity.l2_normalise(x, axis)


def load_clip(name_or_path: str, field: str = "clip_model") -> ClipModel:
  """Loads a Flax CLIP (flax msgpack or safetensors, never torch) with its tokenizer."""
  import transformers  # pylint: disable=g-import-not-at-top
  name_or_path = loading.check_location(name_or_path, field, "openai/clip-vit-base-patch16")
  name_or_path = checkpoints.local_directory(name_or_path, field)
  config = loading.load_config(name_or_path, field)
  if getattr(config, "model_type", None) != "clip":
    raise errors.UserError(
        field, f"{name_or_path!r} is a {getattr(config, 'model_type', '?')!r} model, "
        "not CLIP.", "point clip_model at a CLIP checkpoint.")
  model, params = checkpoints.load_flax_pretrained(transformers.FlaxCLIPModel,
                                                   name_or_path, config, field)
  tokenizer = loading.load_or_explain(
      lambda: transformers.AutoTokenizer.from_pretrained(name_or_path), field,
      f"the tokenizer of {name_or_path!r}",
      "save the CLIP tokenizer beside the model (tokenizer.save_pretrained).")
  vision = config.vision_config
  fallback = preprocessing.ImageTransform(
      resize_shortest_edge=vision.image_size, crop_size=(vision.image_size,) * 2,
      resample="bicubic", mean=registry.CLIP_MEAN, std=registry.CLIP_STD)
  transform = preprocessing.load_transform(name_or_path, fallback)
  logging.info("Loaded CLIP %s (%d-d embeddings, image transform %s).", name_or_path,
               config.projection_dim, transform)
  return ClipModel(name=name_or_path, module=model.module, params=params,
                   tokenizer=tokenizer, transform=transform,
                   max_text_length=int(config.text_config.max_position_embeddings))


def embed_texts(clip: ClipModel, texts: Sequence[str], batch_size: int = 256,
                log_every: int = 20) -> np.ndarray:
  """L2-normalised text embeddings (len(texts), dim), batched under one compiled step."""
  texts = list(texts)
  batch_size = sharding.compiled_batch_rows(len(texts), batch_size)
  step = clip.jitted_text_embeddings
  out = np.zeros((len(texts), clip.embedding_dim), np.float32)
  num_batches = -(-len(texts) // batch_size)
  for b in range(num_batches):
    chunk = texts[b * batch_size:(b + 1) * batch_size]
    valid = len(chunk)
    chunk = chunk + [""] * (batch_size - valid)  # fixed shape: one compile
    ids, mask = clip.tokenize(chunk)
    out[b * batch_size:b * batch_size + valid] = np.asarray(step(clip.params, ids,
                                                                 mask))[:valid]
    if (b + 1) % log_every == 0 or b + 1 == num_batches:
      logging.info("Text embeddings: %d/%d concepts.", min((b + 1) * batch_size,
                                                           len(texts)), len(texts))
  return out

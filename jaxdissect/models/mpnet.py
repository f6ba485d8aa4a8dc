"""MPNet in Flax, for the paper's sentence space (sentence-transformers/all-mpnet-base-v2).

transformers has no Flax MPNet, so this is the encoder written for flax.linen, reading
the PyTorch checkpoint's `model.safetensors` with safetensors' NumPy loader (no torch).
MPNet is a post-LayerNorm BERT-style encoder with three differences that matter for
matching its outputs: no token-type embeddings; position ids that count the non-padding
tokens from padding_idx + 1 (padding_idx = 1), as in RoBERTa; and a learned relative
position bias (T5-style buckets, bidirectional, 32 buckets up to distance 128), computed
once from the token offsets and added to every layer's attention scores.
"""
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect import errors

PADDING_INDEX = 1
NUM_BUCKETS = 32
MAX_DISTANCE = 128


def position_ids_from_input_ids(input_ids: jax.Array) -> jax.Array:
  """(batch, length) -> positions counting non-padding tokens from PADDING_INDEX + 1;
  padding tokens get PADDING_INDEX."""
  mask = (input_ids != PADDING_INDEX).astype(jnp.int32)
  return jnp.cumsum(mask, axis=1) * mask + PADDING_INDEX


def relative_position_bucket(relative_position: jax.Array,
                             num_buckets: int = NUM_BUCKETS,
                             max_distance: int = MAX_DISTANCE) -> jax.Array:
  """Bidirectional buckets: half for each sign; exact below num_buckets // 4, then
  logarithmic up to max_distance."""
  n = -relative_position
  half = num_buckets // 2
  bucket = jnp.where(n < 0, half, 0)
  n = jnp.abs(n)
  max_exact = half // 2
  # log(0) is never used (those offsets are exact); max(n, 1) keeps it finite.
  large = max_exact + (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
                       / math.log(max_distance / max_exact)
                       * (half - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, half - 1)
  return bucket + jnp.where(n < max_exact, n, large)


class MPNetLayer(nn.Module):
  hidden_size: int
  num_heads: int
  intermediate_size: int
  eps: float

  @nn.compact
  def __call__(self, hidden, bias_and_mask):
    batch, length, _ = hidden.shape
    head = self.hidden_size // self.num_heads

    def heads(x):
      return x.reshape(batch, length, self.num_heads, head).transpose(0, 2, 1, 3)

    q = heads(nn.Dense(self.hidden_size, name="q")(hidden))
    k = heads(nn.Dense(self.hidden_size, name="k")(hidden))
    v = heads(nn.Dense(self.hidden_size, name="v")(hidden))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head) + bias_and_mask
    context = jax.nn.softmax(scores, axis=-1) @ v
    context = context.transpose(0, 2, 1, 3).reshape(batch, length, self.hidden_size)
    attended = nn.LayerNorm(epsilon=self.eps, name="attention_norm")(
        nn.Dense(self.hidden_size, name="o")(context) + hidden)
    inner = jax.nn.gelu(nn.Dense(self.intermediate_size, name="intermediate")(attended),
                        approximate=False)
    return nn.LayerNorm(epsilon=self.eps, name="output_norm")(
        nn.Dense(self.hidden_size, name="output")(inner) + attended)


class MPNetEncoder(nn.Module):
  """(input_ids, attention_mask) (batch, length) -> last hidden states (batch, length,
  hidden_size)."""
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_positions: int
  eps: float
  num_buckets: int = NUM_BUCKETS

  @nn.compact
  def __call__(self, input_ids, attention_mask):
    length = input_ids.shape[1]
    embedded = (nn.Embed(self.vocab_size, self.hidden_size, name="word_embeddings")(input_ids)
                + nn.Embed(self.max_positions, self.hidden_size,
                           name="position_embeddings")(position_ids_from_input_ids(input_ids)))
    hidden = nn.LayerNorm(epsilon=self.eps, name="embeddings_norm")(embedded)
    offsets = jnp.arange(length)[None, :] - jnp.arange(length)[:, None]
    bias = nn.Embed(self.num_buckets, self.num_heads, name="relative_attention_bias")(
        relative_position_bucket(offsets, self.num_buckets))  # (q, k, heads)
    masked = jnp.where(attention_mask[:, None, None, :] > 0, 0.0,
                       jnp.finfo(jnp.float32).min)
    bias_and_mask = bias.transpose(2, 0, 1)[None] + masked
    for i in range(self.num_layers):
      hidden = MPNetLayer(self.hidden_size, self.num_heads, self.intermediate_size,
                          self.eps, name=f"layer_{i}")(hidden, bias_and_mask)
    return hidden


def encoder_from_config(config) -> MPNetEncoder:
  return MPNetEncoder(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size,
      num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
      intermediate_size=config.intermediate_size,
      max_positions=config.max_position_embeddings, eps=config.layer_norm_eps,
      num_buckets=NUM_BUCKETS)


def params_from_torch_state(state: dict[str, np.ndarray], num_layers: int) -> dict:
  """The PyTorch MPNetModel state dict (names with or without a "mpnet." prefix) ->
  MPNetEncoder params. Linear weights (out, in) become Dense kernels (in, out)."""
  state = {k[len("mpnet."):] if k.startswith("mpnet.") else k: v for k, v in state.items()}

  def get(name):
    if name not in state:
      raise KeyError(f"the checkpoint has no {name!r}")
    return jnp.asarray(state[name], jnp.float32)

  def dense(prefix):
    return {"kernel": get(f"{prefix}.weight").T, "bias": get(f"{prefix}.bias")}

  def norm(prefix):
    return {"scale": get(f"{prefix}.weight"), "bias": get(f"{prefix}.bias")}

  params: dict[str, Any] = {
      "word_embeddings": {"embedding": get("embeddings.word_embeddings.weight")},
      "position_embeddings": {"embedding": get("embeddings.position_embeddings.weight")},
      "embeddings_norm": norm("embeddings.LayerNorm"),
      "relative_attention_bias": {"embedding": get("encoder.relative_attention_bias.weight")},
  }
  for i in range(num_layers):
    p = f"encoder.layer.{i}"
    params[f"layer_{i}"] = {
        "q": dense(f"{p}.attention.attn.q"), "k": dense(f"{p}.attention.attn.k"),
        "v": dense(f"{p}.attention.attn.v"), "o": dense(f"{p}.attention.attn.o"),
        "attention_norm": norm(f"{p}.attention.LayerNorm"),
        "intermediate": dense(f"{p}.intermediate.dense"),
        "output": dense(f"{p}.output.dense"), "output_norm": norm(f"{p}.output.LayerNorm"),
    }
  return params


def load_params(location: str, config) -> dict:
  """MPNetEncoder params from location/model.safetensors (a local directory)."""
  path = os.path.join(location, "model.safetensors")
  if not os.path.isfile(path):
    raise errors.UserError("sentence_model", f"{location!r} has no model.safetensors.",
                           "download the model directory (e.g. with huggingface-cli "
                           "download sentence-transformers/all-mpnet-base-v2).")
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return params_from_torch_state(load_file(path), config.num_hidden_layers)
  except KeyError as err:
    raise errors.UserError("sentence_model", f"{path} is not an MPNet checkpoint "
                           f"({err.args[0]}).", "give an MPNet model directory.") from None


class FlaxMPNetModel:
  """The minimal wrapper SentenceEncoder needs: .config, .params and a call returning
  (last_hidden_state,)."""

  def __init__(self, config, params):
    self.config, self.params = config, params
    self.module = encoder_from_config(config)

  def __call__(self, input_ids, attention_mask, params=None, train=False):
    del train
    return (self.module.apply({"params": self.params if params is None else params},
                              input_ids, attention_mask),)

"""Flax MPNet against a NumPy float64 forward pass over the PyTorch-named checkpoint."""
import json
import math
import os

from absl.testing import absltest
import numpy as np

from jaxdissect.models import mpnet
from jaxdissect.models import sentence

HIDDEN, HEADS, LAYERS, INTER, VOCAB, POSITIONS = 16, 2, 2, 24, 40, 40


def tiny_state(seed=0):
  rng = np.random.default_rng(seed)
  w = lambda *shape: (0.3 * rng.normal(size=shape)).astype(np.float32)  # noqa: E731
  state = {"embeddings.word_embeddings.weight": w(VOCAB, HIDDEN),
           "embeddings.position_embeddings.weight": w(POSITIONS, HIDDEN),
           "embeddings.LayerNorm.weight": 1 + w(HIDDEN), "embeddings.LayerNorm.bias": w(HIDDEN),
           "encoder.relative_attention_bias.weight": w(32, HEADS),
           "pooler.dense.weight": w(HIDDEN, HIDDEN), "pooler.dense.bias": w(HIDDEN)}
  for i in range(LAYERS):
    p = f"encoder.layer.{i}"
    for name in ("q", "k", "v", "o"):
      state[f"{p}.attention.attn.{name}.weight"] = w(HIDDEN, HIDDEN)
      state[f"{p}.attention.attn.{name}.bias"] = w(HIDDEN)
    state[f"{p}.attention.LayerNorm.weight"] = 1 + w(HIDDEN)
    state[f"{p}.attention.LayerNorm.bias"] = w(HIDDEN)
    state[f"{p}.intermediate.dense.weight"] = w(INTER, HIDDEN)
    state[f"{p}.intermediate.dense.bias"] = w(INTER)
    state[f"{p}.output.dense.weight"] = w(HIDDEN, INTER)
    state[f"{p}.output.dense.bias"] = w(HIDDEN)
    state[f"{p}.output.LayerNorm.weight"] = 1 + w(HIDDEN)
    state[f"{p}.output.LayerNorm.bias"] = w(HIDDEN)
  return state


def bucket_reference(offset: int) -> int:
  """MPNet's relative bucket for one key-minus-query offset, scalar arithmetic."""
  n = -offset
  out = 16 if n < 0 else 0
  n = abs(n)
  if n < 8:
    return out + n
  return out + min(15, 8 + int(math.log(n / 8) / math.log(128 / 8) * 8))


def numpy_forward(state, ids, mask, eps=1e-5):
  s = {k: v.astype(np.float64) for k, v in state.items()}

  def norm(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * s[p + ".weight"] + s[p + ".bias"]

  def linear(x, p):
    return x @ s[p + ".weight"].T + s[p + ".bias"]

  batch, length = ids.shape
  positions = np.zeros_like(ids)
  for b in range(batch):
    count = 0
    for t in range(length):
      if ids[b, t] != 1:
        count += 1
        positions[b, t] = count + 1
      else:
        positions[b, t] = 1
  x = norm(s["embeddings.word_embeddings.weight"][ids]
           + s["embeddings.position_embeddings.weight"][positions], "embeddings.LayerNorm")
  bias = np.zeros((HEADS, length, length))
  for qi in range(length):
    for ki in range(length):
      bias[:, qi, ki] = s["encoder.relative_attention_bias.weight"][bucket_reference(ki - qi)]
  d = HIDDEN // HEADS
  for i in range(LAYERS):
    p = f"encoder.layer.{i}"
    q, k, v = (linear(x, f"{p}.attention.attn.{n}").reshape(batch, length, HEADS, d)
               .transpose(0, 2, 1, 3) for n in "qkv")
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d) + bias[None]
    scores = np.where(mask[:, None, None, :] > 0, scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, HIDDEN)
    attended = norm(linear(context, f"{p}.attention.attn.o") + x, f"{p}.attention.LayerNorm")
    inner = linear(attended, f"{p}.intermediate.dense")
    inner = 0.5 * inner * (1 + np.vectorize(math.erf)(inner / math.sqrt(2)))
    x = norm(linear(inner, f"{p}.output.dense") + attended, f"{p}.output.LayerNorm")
  return x


class MPNetTest(absltest.TestCase):

  def test_relative_buckets(self):
    offsets = np.arange(-300, 301)
    got = np.asarray(mpnet.relative_position_bucket(offsets))
    np.testing.assert_array_equal(got, [bucket_reference(int(o)) for o in offsets])

  def test_matches_numpy_forward(self):
    import transformers
    state = tiny_state()
    config = transformers.MPNetConfig(vocab_size=VOCAB, hidden_size=HIDDEN,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      intermediate_size=INTER,
                                      max_position_embeddings=POSITIONS, layer_norm_eps=1e-5)
    ids = np.array([[0, 5, 9, 33, 7, 2, 1, 1, 1, 1],
                    [0, 12, 2, 1, 1, 1, 1, 1, 1, 1]])
    mask = (ids != 1).astype(np.int32)
    model = mpnet.FlaxMPNetModel(config, mpnet.params_from_torch_state(
        {f"mpnet.{k}": v for k, v in state.items()}, LAYERS))
    got = np.asarray(model(ids, mask)[0])
    want = numpy_forward(state, ids, mask)
    np.testing.assert_allclose(got[mask > 0], want[mask > 0], atol=2e-5)

  def test_sentence_encoder_loads_an_mpnet_directory(self):
    import transformers
    from safetensors.numpy import save_file
    tmp = self.create_tempdir().full_path
    save_file(tiny_state(), os.path.join(tmp, "model.safetensors"))
    config = transformers.MPNetConfig(vocab_size=VOCAB, hidden_size=HIDDEN,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      intermediate_size=INTER,
                                      max_position_embeddings=POSITIONS, layer_norm_eps=1e-5)
    config.save_pretrained(tmp)
    vocab = ["<s>", "<pad>", "</s>", "<unk>", "[UNK]", "<mask>", "red", "car", "blue", "sky"]
    with open(os.path.join(tmp, "vocab.txt"), "w") as f:
      f.write("\n".join(vocab) + "\n")
    transformers.MPNetTokenizerFast(os.path.join(tmp, "vocab.txt")).save_pretrained(tmp)
    encoder = sentence.load(tmp)
    got = encoder.embed(["red car", "blue sky car"])
    encoded = encoder.tokenizer(["red car", "blue sky car"], padding="max_length",
                                max_length=sentence.MAX_LENGTH, return_tensors="np")
    hidden = numpy_forward(tiny_state(), encoded["input_ids"], encoded["attention_mask"])
    weights = encoded["attention_mask"][..., None]
    mean = (hidden * weights).sum(1) / weights.sum(1)
    np.testing.assert_allclose(got, mean / np.linalg.norm(mean, axis=1, keepdims=True),
                               atol=2e-5)
    with open(os.path.join(tmp, "config.json")) as f:
      self.assertEqual(json.load(f)["model_type"], "mpnet")


if __name__ == "__main__":
  absltest.main()

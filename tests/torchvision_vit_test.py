"""torchvision-layout ViT weights converted to the HF Flax ViT equal a NumPy forward pass
over the torchvision arrays; torchvision's layer names resolve on the loaded model."""
import math
import os
import subprocess
import sys

from absl.testing import absltest
import pytest
import jax
import numpy as np

from jaxdissect.models import targets
from jaxdissect.models import torchvision

HIDDEN, LAYERS, HEADS, MLP, PATCH, IMAGE, CLASSES = 16, 2, 2, 24, 8, 32, 3
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_vit_state(seed=0, old_mlp_names=False):
  rng = np.random.default_rng(seed)
  w = lambda *shape: (0.3 * rng.normal(size=shape)).astype(np.float32)  # noqa: E731
  tokens = (IMAGE // PATCH) ** 2 + 1
  state = {"class_token": w(1, 1, HIDDEN), "conv_proj.weight": w(HIDDEN, 3, PATCH, PATCH),
           "conv_proj.bias": w(HIDDEN), "encoder.pos_embedding": w(1, tokens, HIDDEN),
           "encoder.ln.weight": 1 + w(HIDDEN), "encoder.ln.bias": w(HIDDEN),
           "heads.head.weight": w(CLASSES, HIDDEN), "heads.head.bias": w(CLASSES)}
  mlp = ("linear_1", "linear_2") if old_mlp_names else ("0", "3")
  for i in range(LAYERS):
    p = f"encoder.layers.encoder_layer_{i}"
    state.update({
        f"{p}.ln_1.weight": 1 + w(HIDDEN), f"{p}.ln_1.bias": w(HIDDEN),
        f"{p}.self_attention.in_proj_weight": w(3 * HIDDEN, HIDDEN),
        f"{p}.self_attention.in_proj_bias": w(3 * HIDDEN),
        f"{p}.self_attention.out_proj.weight": w(HIDDEN, HIDDEN),
        f"{p}.self_attention.out_proj.bias": w(HIDDEN),
        f"{p}.ln_2.weight": 1 + w(HIDDEN), f"{p}.ln_2.bias": w(HIDDEN),
        f"{p}.mlp.{mlp[0]}.weight": w(MLP, HIDDEN), f"{p}.mlp.{mlp[0]}.bias": w(MLP),
        f"{p}.mlp.{mlp[1]}.weight": w(HIDDEN, MLP), f"{p}.mlp.{mlp[1]}.bias": w(HIDDEN)})
  return state


def numpy_vit(state, pixels, old_mlp_names=False):
  """torchvision VisionTransformer.forward in float64: (logits, per-layer outputs)."""
  s = {k: v.astype(np.float64) for k, v in state.items()}
  x = pixels.astype(np.float64)  # (b, H, W, 3)
  b = len(x)
  g = IMAGE // PATCH
  patches = x.reshape(b, g, PATCH, g, PATCH, 3).transpose(0, 1, 3, 5, 2, 4)  # b,gy,gx,c,ph,pw
  weight = s["conv_proj.weight"]  # (D, 3, P, P)
  tokens = np.einsum("byxcij,dcij->byxd", patches, weight) + s["conv_proj.bias"]
  tokens = tokens.reshape(b, g * g, HIDDEN)
  tokens = np.concatenate([np.broadcast_to(s["class_token"], (b, 1, HIDDEN)), tokens], 1)
  h = tokens + s["encoder.pos_embedding"]

  def ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * s[p + ".weight"] + s[p + ".bias"]

  mlp = ("linear_1", "linear_2") if old_mlp_names else ("0", "3")
  d = HIDDEN // HEADS
  outputs = []
  for i in range(LAYERS):
    p = f"encoder.layers.encoder_layer_{i}"
    y = ln(h, f"{p}.ln_1")
    qkv = y @ s[f"{p}.self_attention.in_proj_weight"].T + s[f"{p}.self_attention.in_proj_bias"]
    q, k, v = (qkv[..., j * HIDDEN:(j + 1) * HIDDEN].reshape(b, -1, HEADS, d)
               .transpose(0, 2, 1, 3) for j in range(3))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attended = (probs @ v).transpose(0, 2, 1, 3).reshape(b, -1, HIDDEN)
    h = h + attended @ s[f"{p}.self_attention.out_proj.weight"].T \
        + s[f"{p}.self_attention.out_proj.bias"]
    z = ln(h, f"{p}.ln_2") @ s[f"{p}.mlp.{mlp[0]}.weight"].T + s[f"{p}.mlp.{mlp[0]}.bias"]
    z = 0.5 * z * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    h = h + z @ s[f"{p}.mlp.{mlp[1]}.weight"].T + s[f"{p}.mlp.{mlp[1]}.bias"]
    outputs.append(h)
  final = ln(h, "encoder.ln")
  return final[:, 0] @ s["heads.head.weight"].T + s["heads.head.bias"], outputs


@pytest.mark.slow
class TorchvisionViTTest(absltest.TestCase):

  def convert(self, state):
    from safetensors.numpy import save_file
    tmp = self.create_tempdir().full_path
    weights = os.path.join(tmp, "vit.safetensors")
    save_file(state, weights)
    names = os.path.join(tmp, "classes.txt")
    with open(names, "w") as f:
      f.write("apple\nboat\ncat\n")
    out = os.path.join(tmp, "flax")
    proc = subprocess.run([sys.executable, "-m", "jaxdissect.models.torchvision",
                           "--weights", weights, "--out", out, "--num_heads", str(HEADS),
                           "--class_names", names], cwd=REPO, capture_output=True,
                          text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    return targets.load_target(out)

  def test_converted_vit_equals_numpy_forward(self):
    for old_names in (False, True):
      state = make_vit_state(old_mlp_names=old_names)
      target = self.convert(state)
      pixels = np.random.default_rng(1).normal(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)
      paths = [target.layer_aliases[f"encoder_layer_{i}"] for i in range(LAYERS)]
      logits, inter = target.forward(target.variables, pixels,
                                     capture=targets.capture_filter(paths))
      want_logits, want_layers = numpy_vit(state, pixels, old_names)
      np.testing.assert_allclose(targets.primary_array(logits), want_logits, atol=1e-4)
      for path, want in zip(paths, want_layers):
        np.testing.assert_allclose(targets.get_intermediate(inter, path), want, atol=1e-4)
      self.assertEqual(target.id2label, {0: "apple", 1: "boat", 2: "cat"})

  def test_torchvision_names_resolve_and_pool(self):
    target = self.convert(make_vit_state())
    names = ["conv_proj", "encoder_layer_1", "encoder.layers.encoder_layer_0", "ln",
             "encoder.ln", "heads", "heads.head", "fc"]
    infos = {i.name: i for i in target.resolve_layers(names)}
    self.assertEqual(infos["encoder_layer_1"].shape, (1, 17, HIDDEN))
    self.assertEqual(infos["heads.head"].shape, (1, CLASSES))
    self.assertEqual(infos["conv_proj"].shape, (1, 4, 4, HIDDEN))
    tokens = jax.numpy.asarray(np.arange(2 * 17 * 3, dtype=np.float32).reshape(2, 17, 3))
    np.testing.assert_array_equal(targets.pool(tokens, "avg", "cls"), tokens[:, 0])
    np.testing.assert_allclose(targets.pool(tokens, "avg", "avg_patches"),
                               tokens[:, 1:].mean(1))

  def test_head_count_must_be_given_off_64(self):
    with self.assertRaisesRegex(ValueError, "head count"):
      torchvision.vit_config(make_vit_state())


if __name__ == "__main__":
  absltest.main()

"""The fused Pallas (soft-)WPMI kernel: interpret mode equals the jnp version, and it
lowers for TPU and CUDA from this CPU machine."""
from absl.testing import absltest
from absl.testing import parameterized
import jax.numpy as jnp
import numpy as np

from jaxdissect import kernels
from jaxdissect import likelihood
from jaxdissect import similarity
from jaxdissect import streaming


def _unit_rows(rng, rows, dim):
  x = rng.standard_normal((rows, dim)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


class KernelTest(parameterized.TestCase):

  # top_k, concepts and width that are not powers of two or multiples of 128: padding.
  @parameterized.parameters((True, 100, 300, 24), (False, 28, 129, 40), (True, 7, 5, 3))
  def test_interpret_mode_equals_jnp(self, soft, top_k, num_concepts, dim):
    rng = np.random.default_rng(top_k)
    images, texts = _unit_rows(rng, 250, dim), _unit_rows(rng, num_concepts, dim)
    top = rng.integers(0, 250, (9, top_k)).astype(np.int32)
    membership = similarity.soft_wpmi_membership(top_k, 0.998, 0.97).astype(np.float32)
    a = 10.0 if soft else 2.0
    group = likelihood.log_group_size(
        likelihood.soft_wpmi_term_floor(0.998, 0.97, 1e-7) if soft else 1e-7, top_k)
    (expected,), _ = streaming._neurons_log_likelihood(  # pylint: disable=protected-access
        jnp.asarray(images), jnp.asarray(texts), (jnp.asarray(top),),
        jnp.asarray(membership if soft else np.ones(top_k, np.float32)),
        jnp.float32(a), jnp.float32(1e-7),
        jnp.asarray(streaming.RowNormalisers(images, texts).at(np.arange(250), a)),
        soft=soft, chunk=1, block=min(64, num_concepts),
        group=group)
    # The kernel multiplies a power of two of ranks before each log (8 or 4 here).
    got = kernels.log_likelihood(images, texts, top, membership, a, 1e-7, soft=soft,
                                 group=group, interpret=True)
    self.assertEqual(got.shape, (9, num_concepts))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=2e-6,
                               atol=1e-4)

  @parameterized.parameters("soft_wpmi", "wpmi")
  def test_streaming_with_the_kernel_equals_jnp(self, fn):
    rng = np.random.default_rng(1)
    images, texts = _unit_rows(rng, 400, 16), _unit_rows(rng, 70, 16)
    activations = rng.standard_normal((400, 11)).astype(np.float32)
    jnp_scores = streaming.FUNCTIONS[fn](images, texts, activations, kernel="jnp")
    pallas_scores = streaming.FUNCTIONS[fn](images, texts, activations, kernel="pallas")
    np.testing.assert_allclose(np.asarray(pallas_scores), np.asarray(jnp_scores),
                               rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(np.argmax(pallas_scores, 1), np.argmax(jnp_scores, 1))
    # A second layer of the same shapes reuses the compiled kernel.
    jitted = streaming._jitted.cache_info().currsize  # pylint: disable=protected-access
    streaming.FUNCTIONS[fn](images, texts, activations, kernel="pallas")
    self.assertEqual(streaming._jitted.cache_info().currsize, jitted)  # pylint: disable=protected-access

  def test_layers_in_one_pass_through_the_kernel_equal_jnp(self):
    rng = np.random.default_rng(2)
    images, texts = _unit_rows(rng, 300, 16), _unit_rows(rng, 40, 16)
    tops = [np.argsort(-rng.random((300, units)), axis=0)[:100].T for units in (5, 2)]
    got, expected = (streaming.layers_log_likelihood("soft_wpmi", images, texts, tops,
                                                     kernel=kernel)
                     for kernel in ("pallas", "jnp"))
    for layer_got, layer_expected, top in zip(got, expected, tops):
      self.assertEqual(layer_got.shape, (len(top), 40))
      np.testing.assert_allclose(np.asarray(layer_got), np.asarray(layer_expected),
                                 rtol=1e-5, atol=1e-3)

  def test_lowers_for_tpu_and_cuda_in_one_export(self):
    exported = kernels.export_for(("tpu", "cuda"), num_neurons=32, top_k=100,
                                  rows=3200, num_concepts=20000, dim=512)
    self.assertEqual(tuple(exported.platforms), ("tpu", "cuda"))
    text = exported.mlir_module()
    self.assertIn("tpu_custom_call", text)  # Mosaic
    self.assertIn("triton", text)

  def test_selection(self):
    self.assertFalse(kernels.use_pallas("auto", "cpu"))
    self.assertFalse(kernels.use_pallas("jnp", "gpu"))
    self.assertTrue(kernels.use_pallas("pallas", "cpu"))
    with self.assertRaisesRegex(ValueError, "similarity_kernel"):
      kernels.use_pallas("cuda", "gpu")


if __name__ == "__main__":
  absltest.main()

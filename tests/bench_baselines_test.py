"""The baselines benchmarks/similarity_bench.py times against compute what ours does:
a speed ratio against a loop that computed something else would mean nothing."""
import importlib.util
import os
import sys

from absl.testing import absltest
import numpy as np

from jaxdissect import similarity

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import similarity_bench  # noqa: E402  pylint: disable=wrong-import-position


class BaselinesTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    images, texts, self.activations = similarity_bench.make_inputs(300, 120, 7, seed=3)
    self.P = similarity_bench.numpy_concept_activation(images, texts)

  def _ours(self, name):
    return np.asarray(similarity.SIMILARITY_FUNCTIONS[name](self.P, self.activations))

  def test_numpy_loop(self):
    for name in ("soft_wpmi", "wpmi", "cos_similarity"):
      np.testing.assert_allclose(similarity_bench.numpy_baseline(name, self.P,
                                                                 self.activations),
                                 self._ours(name), rtol=1e-4, atol=2e-3, err_msg=name)

  def test_a_measurement_that_dies_leaves_its_columns_empty(self):
    # Waiting on the result queue alone hung the benchmark for ever when the kernel
    # killed a measurement at 50k (out of memory); a process that ends without a
    # result (here: an unknown function, exit code 1) must come back as None.
    self.assertIsNone(similarity_bench.measure("ours", "no_such_function", (300, 50, 4)))

  def test_torch_loops(self):
    if importlib.util.find_spec("torch") is None:
      self.skipTest("torch is not installed (the benchmark skips its baseline too)")
    for name in ("soft_wpmi", "wpmi"):
      ours = self._ours(name)
      for rows in ("gather", "index"):
        np.testing.assert_allclose(similarity_bench.torch_baseline(
            name, self.P, self.activations, rows), ours, rtol=1e-4, atol=2e-3,
                                   err_msg=f"{name} {rows}")


if __name__ == "__main__":
  absltest.main()

"""Pruning: removal orders, masked accuracy against single edits, CSV and PNG."""
import csv
import os

from absl.testing import absltest
import numpy as np
from PIL import Image
import pytest

from jaxdissect import rundir
from jaxdissect.applications import editing
from jaxdissect.applications import pruning
from tests import synthetic_run


class OrderTest(absltest.TestCase):

  def test_redundant_label_order_by_hand(self):
    labels = ["red", "sky", "red", "red", "dog", "sky"]
    scores = np.array([0.9, 0.5, 0.3, 0.95, 0.1, 0.5])
    # Best per label: red -> unit 3, sky -> unit 1 (tie with 5: lower id), dog -> 4.
    # Redundant by score: 2 (0.3), 5 (0.5), 0 (0.9); kept by score: 4, 1, 3.
    np.testing.assert_array_equal(pruning.redundant_label_order(labels, scores),
                                  [2, 5, 0, 4, 1, 3])

  def test_mean_activation_order_and_masks(self):
    activations = np.array([[1.0, 0.0, 2.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    order = pruning.mean_activation_order(activations)
    np.testing.assert_array_equal(order, [1, 3, 0, 2])  # ties to the lower id
    masks = pruning.masks_for(order, 4, [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(masks, [[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]])


@pytest.mark.slow
class PruneRunTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.results = synthetic_run.synthetic_run()
    cls.dissection = rundir.load_run(cls.results)

  def test_vmapped_masks_equal_one_edit_each(self):
    run = self.dissection
    rng = np.random.default_rng(0)
    masks = np.stack([np.ones(128), (rng.random(128) > 0.5), np.zeros(128)]
                     ).astype(np.float32)
    accuracy, source = pruning.masked_accuracies(run, "layer4", masks, batch_size=96)
    self.assertEqual(source, "probe labels")
    baseline = editing.probe_logits(run, None)
    for mask, got in zip(masks, accuracy):
      report = editing.edit_run(run, {"layer4": np.flatnonzero(mask == 0)}, 0.0,
                                baseline=baseline)
      self.assertAlmostEqual(got, report.accuracy_after, places=6)
    # Everything removed: the classifier's bias alone decides, one class for all.
    class_ids, _ = pruning.common.class_ids_of_probe(run)
    shares = np.bincount(class_ids, minlength=8) / len(class_ids)
    bias = np.asarray(run.target.variables["params"]["target"]["classifier"]["1"]["bias"])
    self.assertAlmostEqual(accuracy[2], shares[int(np.argmax(bias))], places=6)

  def test_cli_writes_csv_and_curve(self):
    out = self.create_tempdir().full_path
    proc = synthetic_run.run_module(
        "jaxdissect.applications.pruning", "--results", self.results, "--layer",
        "layer4", "--criterion", "redundant_label", "--sparsities", "0,0.5,0.9",
        "--out", out)
    self.assertIn("redundant_label", proc.stdout)
    with open(os.path.join(out, "layer4-redundant_label.csv"), newline="") as f:
      rows = list(csv.DictReader(f))
    self.assertEqual([r["units_removed"] for r in rows], ["0", "64", "115"])
    self.assertEqual(rows[0]["accuracy"], rows[0]["random_accuracy_mean"])
    png = Image.open(os.path.join(out, "layer4-redundant_label.png"))
    self.assertGreater(min(png.size), 200)
    for args, expected in ((["--layer", "layer9"], "was not dissected"),
                           (["--layer", "layer4", "--sparsities", "0,1.5"], "lie in [0, 1]")):
      proc = synthetic_run.run_module("jaxdissect.applications.pruning", "--results",
                                      self.results, *args, check=False)
      self.assertEqual(proc.returncode, 2, proc.stderr[-1500:])
      self.assertIn(expected, proc.stderr.strip().splitlines()[-1])
    self.assertIn("--criterion",
                  synthetic_run.run_module("jaxdissect.applications.pruning",
                                           "--help").stdout)


if __name__ == "__main__":
  absltest.main()

"""Neuron editing: exact interception on real modules, and a causal check of labels."""
import csv
import os

from absl.testing import absltest
import pytest
import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect import rundir
from jaxdissect.applications import common
from jaxdissect.applications import editing
from jaxdissect.models import targets as targets_lib
from jaxdissect.synthetic import planted
from jaxdissect.synthetic import train as train_lib
from tests import synthetic_run

COLOUR_TARGET = "python:jaxdissect.synthetic.planted:make_colour_classifier"


class InterceptionTest(absltest.TestCase):

  def test_ablating_all_of_layer4_leaves_the_classifier_bias(self):
    # HF Flax ResNet: logits = Dense(mean-pooled layer4); a zeroed layer4 gives the bias.
    target = targets_lib.load_target(os.path.join(train_lib.CHECKPOINT_DIR, "resnet"))
    path = target.layer_aliases["layer4"]
    pixels = jax.random.normal(jax.random.key(0), (3, 64, 64, 3))
    units = target.resolve_layers(["layer4"])[0].num_units
    forward = jax.jit(editing.edited_forward(
        target, {path: jnp.asarray(editing.unit_factors(units, range(units), 0.0))}))
    bias = target.variables["params"]["classifier"]["1"]["bias"]
    np.testing.assert_allclose(forward(target.variables, pixels),
                               np.broadcast_to(bias, (3, len(bias))), atol=1e-6)
    unedited = targets_lib.primary_array(target.forward(target.variables, pixels)[0])
    same = editing.edited_forward(target, {path: jnp.ones(units)})
    np.testing.assert_array_equal(same(target.variables, pixels), unedited)
    self.assertFalse(np.allclose(unedited, bias))

  def test_scaling_one_unit_scales_only_its_logit(self):
    target = planted.make_colour_classifier()
    rng = np.random.default_rng(0)
    pixels = jnp.asarray(rng.normal(size=(4, 64, 64, 3)), jnp.float32)
    before = np.asarray(target.forward(target.variables, pixels)[0])
    factors = editing.unit_factors(8, [2], 0.5)
    after = np.asarray(editing.edited_forward(target, {"colour": jnp.asarray(factors)})(
        target.variables, pixels))
    np.testing.assert_allclose(after, before * np.append(factors, 1.0), rtol=1e-6,
                               atol=1e-6)


@pytest.mark.slow
class CausalLabelTest(absltest.TestCase):
  """Units chosen by their dissection label, ablated: the class that depends on that
  concept must suffer more than when as many random units are ablated."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    import subprocess, sys, tempfile  # pylint: disable=g-import-not-at-top,multiple-imports
    workdir = tempfile.mkdtemp()
    proc = subprocess.run(
        [sys.executable, "main.py", "--config", "configs/synthetic.py",
         f"--workdir={workdir}", f"--config.target_model={COLOUR_TARGET}",
         "--config.target_layers=colour", "--config.d_probe=synthetic:in_dist:400",
         "--config.trust_permutations=0", "--config.sentence_model="],
        cwd=synthetic_run.REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2"))
    if proc.returncode:
      raise AssertionError(proc.stderr[-3000:])
    cls.results = os.path.join(workdir, "results")
    cls.dissection = rundir.load_run(cls.results)

  def test_labelled_units_hurt_their_class_more_than_random_units(self):
    baseline = editing.probe_logits(self.dissection, None)
    labels = self.dissection.layers["colour"].labels
    rng = np.random.default_rng(0)
    for concept in ("red", "blue", "green"):
      units = common.parse_unit_selection(f"colour:label={concept}", self.dissection)
      report = editing.edit_run(self.dissection, units, 0.0, baseline=baseline)
      self.assertEqual(report.class_source, "unedited predictions")
      hit = report.effect(concept)
      self.assertGreater(hit.num_images, 5)
      drop = hit.accuracy_before - hit.accuracy_after
      random_drops = []
      for _ in range(8):
        chosen = rng.choice(len(labels), len(units["colour"]), replace=False)
        effect = editing.edit_run(self.dissection, {"colour": chosen}, 0.0,
                                  baseline=baseline).effect(concept)
        random_drops.append(effect.accuracy_before - effect.accuracy_after)
      self.assertGreater(drop, np.mean(random_drops) + 0.5, (concept, random_drops))
      self.assertLess(hit.logit_after, hit.logit_before)

  def test_cli_writes_per_class_csv(self):
    out = os.path.join(self.create_tempdir().full_path, "edit.csv")
    proc = synthetic_run.run_module("jaxdissect.applications.editing", "--results",
                                    self.results, "--units", "colour:label=red",
                                    "--out", out)
    self.assertIn("red", proc.stdout)
    with open(out, newline="") as f:
      rows = {row["class"]: row for row in csv.DictReader(f)}
    self.assertEqual(float(rows["red"]["accuracy_after"]), 0.0)
    self.assertLess(float(rows["red"]["logit_change"]), 0.0)
    for name, row in rows.items():
      if name != "red":
        self.assertGreaterEqual(float(row["accuracy_change"]), 0.0, name)

  def test_cli_help_and_bad_selection(self):
    proc = synthetic_run.run_module("jaxdissect.applications.editing", "--help")
    self.assertIn("--units", proc.stdout)
    for units, expected in (("colour:label=zebra", "no unit of colour is labelled"),
                            ("layer9:1", "names no dissected layer"),
                            ("colour:99", "has units 0..7")):
      proc = synthetic_run.run_module("jaxdissect.applications.editing", "--results",
                                      self.results, "--units", units, check=False)
      self.assertEqual(proc.returncode, 2, proc.stderr[-1500:])
      self.assertNotIn("Traceback", proc.stderr)
      self.assertIn(expected, proc.stderr.strip().splitlines()[-1])


if __name__ == "__main__":
  absltest.main()

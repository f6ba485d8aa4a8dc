"""A second simulator (config.simulator_model): CLIP itself as the simulator reproduces
CLIP's simulations exactly; another CLIP writes its own explanations file."""
import csv
import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import pytest

from jaxdissect.synthetic import train as synthetic_train
from tests import tiny_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, simulator, layers="layer4,fc"):
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "main.py"), "--config",
       os.path.join(REPO, "configs", "synthetic.py"), "--workdir", workdir,
       "--config.d_probe=synthetic:in_dist:300", f"--config.target_layers={layers}",
       f"--config.simulator_model={simulator}", "--config.trust_bootstrap=0",
       "--config.compose_beam=0"],
      capture_output=True, text=True, timeout=900, cwd=REPO,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu"))
  if proc.returncode != 0:
    raise AssertionError(proc.stderr[-4000:])
  results = os.path.join(workdir, "results")
  with open(os.path.join(results, "evaluation.json"), encoding="utf-8") as f:
    return results, json.load(f), proc


def _rows(path):
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.reader(f))


@pytest.mark.slow
class SimulatorTest(absltest.TestCase):

  def test_clip_as_its_own_simulator_changes_nothing(self):
    results, evaluation, proc = _run(tempfile.mkdtemp(),
                                     os.path.join(synthetic_train.CHECKPOINT_DIR, "clip"))
    self.assertIn("simulator", proc.stderr)
    for layer, row in evaluation.items():
      for key in ("simulation_label", "simulation_correlation_label",
                  "simulation_linear"):
        self.assertAlmostEqual(row[f"simulator_{key}"], row[key], places=9,
                               msg=(layer, key))
    self.assertEqual(_rows(os.path.join(results, "explanations_simulator.csv")),
                     _rows(os.path.join(results, "explanations.csv")))
    # The evaluate CLI recomputes the simulator's figures from the stored passes.
    os.remove(os.path.join(results, "explanations_simulator.csv"))
    subprocess.run([sys.executable, "-m", "jaxdissect.evaluate", "--results", results],
                   check=True, capture_output=True, timeout=900, cwd=REPO,
                   env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu"))
    with open(os.path.join(results, "evaluation.json"), encoding="utf-8") as f:
      self.assertEqual(json.load(f), evaluation)
    self.assertEqual(_rows(os.path.join(results, "explanations_simulator.csv")),
                     _rows(os.path.join(results, "explanations.csv")))

  def test_another_clip_writes_its_own_explanations(self):
    results, evaluation, _ = _run(tempfile.mkdtemp(), tiny_fixtures.clip(), "fc")
    rows = _rows(os.path.join(results, "explanations_simulator.csv"))
    self.assertEqual(rows[0], ["layer", "unit", "rank", "concept", "weight",
                               "selection_share"])
    self.assertEqual({r[0] for r in rows[1:]}, {"fc"})
    self.assertEqual({int(r[1]) for r in rows[1:]}, set(range(8)))
    fc = evaluation["fc"]
    self.assertBetween(fc["simulator_simulation_linear"], -1.0, 1.0)
    self.assertNotEqual(fc["simulator_simulation_linear"], fc["simulation_linear"])


if __name__ == "__main__":
  absltest.main()

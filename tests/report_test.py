"""The HTML report: every outside string escaped, cards per unit, sorting; opened in
headless Chromium with a concept set of script-injection strings."""
import csv
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile

from absl import logging
from absl.testing import absltest
import numpy as np
import pytest

from jaxdissect import labeling
from jaxdissect import report
from jaxdissect import results
from jaxdissect import tiny_models
from jaxdissect import trust
from jaxdissect import visibility

EVIL = ["<script>alert(1)</script>", "<img src=x onerror=alert(2)>", "a'b\"c&d"]
# Each would mark the page if the browser ran it; the report must show them as text.
MARKING = [
    "<img src=x onerror=\"document.body.setAttribute('data-pwned','img')\">",
    "\"><script>document.body.setAttribute('data-pwned','script')</script>",
    "'><svg onload=\"document.body.setAttribute('data-pwned','svg')\">",
    "</div><iframe srcdoc=\"<script>parent.document.body.setAttribute('data-pwned',"
    "'iframe')</script>\"></iframe>",
]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = os.path.join(REPO, "tests", "data", "base_config.py")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=3000"]


def make_result():
  scores = np.array([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0]], np.float32)
  acts = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]], np.float32)
  layer = labeling.label_units(scores, acts, EVIL, np.array([False, True]),
                               np.array([False, False]), num_alternatives=3,
                               num_top_images=2)
  result = results.DissectionResult(list(EVIL), ["<b>x.png", "y.png", "z'.png"],
                                    {"<layer>": layer})
  result.trust = {"<layer>": trust.UnitTrust(np.array([0.9, np.nan]),
                                             np.array([0.01, np.nan]))}
  return result


def dump_dom(url: str) -> str:
  """The page's DOM after its scripts ran, from headless Chromium."""
  profile = tempfile.mkdtemp()
  try:
    proc = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                           "--dump-dom", url], capture_output=True, text=True, timeout=120)
  finally:
    shutil.rmtree(profile, ignore_errors=True)
  if proc.returncode != 0:
    raise AssertionError(f"chromium failed: {proc.stderr[-2000:]}")
  return proc.stdout


class ReportSourceTest(absltest.TestCase):

  def test_outside_strings_are_escaped(self):
    out = self.create_tempdir().full_path
    strips = {("<layer>", 0): np.zeros((8, 16, 3), np.uint8)}
    report.write_report(out, make_result(), strips)
    pages = sorted(p for p in os.listdir(out) if p.endswith(".html"))
    self.assertLen(pages, 2)
    for page in pages:
      with open(os.path.join(out, page), encoding="utf-8") as f:
        source = f.read()
      self.assertNotIn("<script>alert", source)
      self.assertNotIn("<img src=x", source)
      self.assertNotIn("<layer>", source)
      self.assertNotIn("<b>x.png", source)
    with open(os.path.join(out, pages[1]), encoding="utf-8") as f:
      layer_page = f.read()
    self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt;", layer_page)
    self.assertIn("&lt;img src=x onerror=alert(2)&gt;", layer_page)
    self.assertIn("a&#x27;b&quot;c&amp;d", layer_page)
    self.assertIn("&lt;b&gt;x.png", layer_page)
    self.assertLen(re.findall(r"<div class='card[ ']", layer_page), 2)
    self.assertIn("AUC 0.900", layer_page)
    self.assertIn(labeling.DEAD_LABEL.replace("<", "&lt;").replace(">", "&gt;"), layer_page)
    self.assertTrue(os.path.isfile(os.path.join(out, report.strip_filename(0, 0))))
    self.assertEqual(layer_page.count("<img class='strip'"), 1)

  def test_index_shows_the_evaluation(self):
    out = self.create_tempdir().full_path
    evaluation = {"<layer>": {"num_units": 2, "top1": 0.5, "mean_rank": None}}
    report.write_report(out, make_result(), {}, evaluation)
    with open(os.path.join(out, "index.html"), encoding="utf-8") as f:
      index = f.read()
    self.assertIn("evaluation.json", index)
    self.assertIn("<th>top1</th>", index)
    self.assertIn("<td>&lt;layer&gt;</td><td>2</td><td>0.5</td><td>-</td>", index)
    self.assertNotIn("<layer>", index)
    report.write_report(out, make_result(), {})  # no evaluation: no table
    with open(os.path.join(out, "index.html"), encoding="utf-8") as f:
      self.assertNotIn("evaluation.json", f.read())

  def test_index_lists_the_warnings_logged_during_the_run(self):
    with report.collect_warnings() as warnings:
      logging.info("progress, not a warning")
      logging.warning("%d unit(s) are <dead>", 3)
      logging.warning("%d unit(s) are <dead>", 3)  # listed once
      logging.error("a store chunk was not saved")
    logging.warning("after the run: not collected")
    self.assertEqual(warnings, ["3 unit(s) are <dead>", "a store chunk was not saved"])
    out = self.create_tempdir().full_path
    report.write_report(out, make_result(), {}, None, warnings)
    with open(os.path.join(out, "index.html"), encoding="utf-8") as f:
      index = f.read()
    self.assertIn("Warnings during the run (2)", index)
    self.assertIn("<li>3 unit(s) are &lt;dead&gt;</li>", index)
    report.write_report(out, make_result(), {}, None, [])
    with open(os.path.join(out, "index.html"), encoding="utf-8") as f:
      self.assertNotIn("Warnings during the run", f.read())

  def test_index_says_which_concepts_the_explanations_choose_among(self):
    out = self.create_tempdir().full_path
    result = make_result()
    result.visibility = visibility.ConceptVisibility(
        np.array([9, 0, 4]), 2, 5, np.array([True, False, False]))
    report.write_report(out, result, {})
    with open(os.path.join(out, "index.html"), encoding="utf-8") as f:
      self.assertIn("choose among the 1 concepts that 5 or more images rank in their "
                    "top 2", f.read())
    rows = list(csv.reader(io.StringIO(result.extra_files()["concept_visibility.csv"])))
    self.assertEqual(rows, [["concept", "images_showing", "visible"],
                            [EVIL[0], "9", "true"], [EVIL[1], "0", "false"],
                            [EVIL[2], "4", "false"]])
    result.visibility.fallback = True
    report.write_report(out, result, {})
    with open(os.path.join(out, "index.html"), encoding="utf-8") as f:
      self.assertIn("choose among all concepts", f.read())

  def test_csv_quotes_commas_and_quotes(self):
    result = make_result()
    text = result.descriptions_csv()
    self.assertEqual(text.splitlines()[0], "layer,unit,description,similarity")
    rows = list(csv.reader(io.StringIO(text)))
    self.assertEqual(rows[1], ["<layer>", "0", EVIL[0], "3.000000"])
    self.assertEqual(rows[2][2], labeling.DEAD_LABEL)


@absltest.skipUnless(CHROMIUM, "no chromium on PATH (.ci/run installs Debian's)")
@pytest.mark.slow
class ReportInChromiumTest(absltest.TestCase):
  """main.py on tiny models with a concept set made only of injection strings and a
  probe file whose name is one, then the pages in headless Chromium."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    tmp = tempfile.mkdtemp()
    clip = tiny_models.make_tiny_clip(os.path.join(tmp, "clip"))
    resnet = tiny_models.make_tiny_resnet(os.path.join(tmp, "resnet"))
    images = os.path.join(tmp, "images")
    tiny_models.write_image_folder(images, 60)
    # A probe file named like markup: file names reach the page too.
    os.rename(os.path.join(images, "a", "img_00002.png"),
              os.path.join(images, "a", "<img src=x onerror=alert(3)>.png"))
    concepts = [f"{text} {i}" for i, text in enumerate(EVIL + MARKING)]
    concepts_path = tiny_models.write_concepts(os.path.join(tmp, "concepts.txt"),
                                               concepts)
    workdir = os.path.join(tmp, "work")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "main.py"), "--config",
         BASE_CONFIG, f"--workdir={workdir}",
         f"--config.clip_model={clip}", f"--config.target_model={resnet}",
         "--config.target_layers=layer3,layer4", f"--config.d_probe=folder:{images}",
         f"--config.concept_set={concepts_path}", "--config.batch_size=16",
         "--config.similarity_fn=cos_similarity", "--config.trust_permutations=20",
         "--config.sentence_model="],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2"))
    if proc.returncode:
      raise AssertionError(proc.stderr[-3000:])
    cls.report_dir = os.path.join(workdir, "results", "report")
    cls.concepts = concepts

  def layer_page(self, index, name):
    return os.path.join(self.report_dir, report.layer_filename(index, name))

  def test_pages_render_cards_and_show_injections_as_text(self):
    for index, (name, units) in enumerate((("layer3", 16), ("layer4", 24))):
      dom = dump_dom("file://" + self.layer_page(index, name))
      body = re.search(r"<body[^>]*>", dom).group(0)
      self.assertIn('data-ready="1"', body)  # the page's own script did run
      self.assertNotIn("pwned", body)  # no injected one did
      self.assertIsNone(re.search(r'\sdata-pwned="', dom))
      self.assertEqual(len(re.findall(r'<div class="card[ "]', dom)), units)
      self.assertEqual(len(re.findall(r'<img class="strip"', dom)), units)
      self.assertNotIn("<iframe", dom)
      self.assertNotIn("<svg", dom)
      self.assertEqual(dom.count("<script>"), 1)  # ours, none from the concepts
      # Labels appear as text: escaped in the serialised DOM.
      labels = re.findall(r"<h3>\d+: (.*?)</h3>", dom)
      self.assertLen(labels, units)
      for label in labels:
        self.assertNotIn("<", label)
        self.assertIn(_unescape(label), self.concepts)
    index_dom = dump_dom("file://" + os.path.join(self.report_dir, "index.html"))
    self.assertNotIn("pwned", re.search(r"<body[^>]*>", index_dom).group(0))

  def test_sort_by_score(self):
    dom = dump_dom("file://" + self.layer_page(1, "layer4") + "#sort=score")
    self.assertIn('data-sorted-by="score"', dom)
    scores = [float(s) for s in re.findall(r'data-score="([^"]+)"', dom)]
    self.assertLen(scores, 24)
    self.assertEqual(scores, sorted(scores, reverse=True))
    unsorted = dump_dom("file://" + self.layer_page(1, "layer4"))
    units = [int(u) for u in re.findall(r'data-unit="(\d+)"', unsorted)]
    self.assertEqual(units, list(range(24)))


def _unescape(text: str) -> str:
  import html  # pylint: disable=g-import-not-at-top
  return html.unescape(text)


if __name__ == "__main__":
  absltest.main()

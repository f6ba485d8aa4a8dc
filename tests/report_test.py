"""The HTML report escapes every string that comes from outside."""
import os

from absl.testing import absltest
import numpy as np

from jaxdissect import labeling
from jaxdissect import report
from jaxdissect import results

EVIL = ["<script>alert(1)</script>", "<img src=x onerror=alert(2)>", "a'b\"c&d"]


def make_result():
  scores = np.array([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0]], np.float32)
  acts = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]], np.float32)
  layer = labeling.label_units(scores, acts, EVIL, np.array([False, True]),
                               np.array([False, False]), num_alternatives=3,
                               num_top_images=2)
  return results.DissectionResult(list(EVIL), ["<b>x.png", "y.png", "z'.png"],
                                  {"<layer>": layer})


class ReportTest(absltest.TestCase):

  def test_outside_strings_are_escaped(self):
    out = self.create_tempdir().full_path
    report.write_report(out, make_result())
    pages = sorted(os.listdir(out))
    self.assertLen(pages, 2)
    for page in pages:
      with open(os.path.join(out, page), encoding="utf-8") as f:
        source = f.read()
      self.assertNotIn("<script>alert", source)
      self.assertNotIn("<img", source)
      self.assertNotIn("<layer>", source)
      self.assertNotIn("<b>x.png", source)
    with open(os.path.join(out, pages[1]), encoding="utf-8") as f:
      layer_page = f.read()
    self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt;", layer_page)
    self.assertIn("&lt;img src=x onerror=alert(2)&gt;", layer_page)
    self.assertIn("&lt;b&gt;x.png", layer_page)
    self.assertEqual(layer_page.count("<tr class='unit'>"), 2)
    self.assertIn(labeling.DEAD_LABEL.replace("<", "&lt;").replace(">", "&gt;"), layer_page)

  def test_csv_quotes_commas_and_quotes(self):
    result = make_result()
    text = result.descriptions_csv()
    self.assertEqual(text.splitlines()[0], "layer,unit,description,similarity")
    import csv, io  # pylint: disable=g-import-not-at-top,multiple-imports
    rows = list(csv.reader(io.StringIO(text)))
    self.assertEqual(rows[1], ["<layer>", "0", EVIL[0], "3.000000"])
    self.assertEqual(rows[2][2], labeling.DEAD_LABEL)


if __name__ == "__main__":
  absltest.main()

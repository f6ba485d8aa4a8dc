"""Concept sets: files, wordfreq, class names; bad files give field-named errors."""
import os

from absl.testing import absltest

from jaxdissect import errors
from jaxdissect.data import concepts


class ConceptsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = self.create_tempdir().full_path

  def _write(self, name, data: bytes):
    path = os.path.join(self.tmp, name)
    with open(path, "wb") as f:
      f.write(data)
    return path

  def test_file_drops_blank_lines_and_duplicates_and_logs_counts(self):
    path = self._write("c.txt", "dog\n\n  cat \r\ndog\nzebra crossing\n   \ncat\n".encode())
    with self.assertLogs(level="INFO") as logs:
      self.assertEqual(concepts.load_concepts(path), ["dog", "cat", "zebra crossing"])
    self.assertTrue(any("2 blank" in m and "2 duplicate" in m for m in logs.output),
                    logs.output)

  def test_utf8_with_bom_and_non_ascii(self):
    path = self._write("c.txt", "\ufeffcafé\n日本\n".encode("utf-8"))
    self.assertEqual(concepts.load_concepts(path), ["café", "日本"])

  def test_bad_files_are_user_errors(self):
    cases = {
        "missing": os.path.join(self.tmp, "nope.txt"),
        "empty": self._write("empty.txt", b""),
        "blank": self._write("blank.txt", b"\n  \n\t\n"),
        "latin1": self._write("latin1.txt", "caf\xe9\n".encode("latin-1")),
    }
    for name, path in cases.items():
      with self.assertRaises(errors.UserError, msg=name) as ctx:
        concepts.load_concepts(path)
      self.assertEqual(ctx.exception.field, "concept_set")
      self.assertNotIn("\n", ctx.exception.one_line())

  def test_wordfreq_keeps_words_with_letters(self):
    words = concepts.load_concepts("wordfreq:en:300")
    self.assertLen(words, 300)
    self.assertLen(set(words), 300)
    self.assertIn("the", words[:5])
    self.assertTrue(all(any(ch.isalpha() for ch in w) for w in words))
    for bad in ("wordfreq:en", "wordfreq:en:x", "wordfreq:xx-nope:10"):
      with self.assertRaises(errors.UserError, msg=bad):
        concepts.load_concepts(bad)

  def test_broden_labels(self):
    path = self._write("label.csv", (
        "number,name,category,frequency,coverage,syns\n"
        "0,-,,0,0,\n1,sky-s,scene(1),10,1.0,\n2,black-c,color(5),9,1.0,\n"
        "3,potted_plant,object(3),4,1.0,\n4,sky,object(2),3,1.0,\n").encode())
    self.assertEqual(concepts.load_concepts(f"broden_labels:{path}"),
                     ["sky", "black", "potted plant"])
    self.assertEqual(concepts.load_concepts(f"broden_labels:{self.tmp}"),
                     ["sky", "black", "potted plant"])  # the directory holding it
    with self.assertRaisesRegex(errors.UserError, "broden_labels:PATH"):
      concepts.load_concepts(f"broden_labels:{self.tmp}/nope")
    nameless = self._write("nameless.csv", b"number,label\n1,sky\n")
    with self.assertRaisesRegex(errors.UserError,
                                "no 'name' column.*give the label.csv that ships"):
      concepts.load_concepts(f"broden_labels:{nameless}")

  def test_target_classes(self):
    self.assertEqual(concepts.load_concepts("classes:target", {1: "boat", 0: "apple"}),
                     ["apple", "boat"])
    with self.assertRaises(errors.UserError):
      concepts.load_concepts("classes:target", None)


if __name__ == "__main__":
  absltest.main()

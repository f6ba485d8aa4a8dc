"""Replacing a result_dir: at every instant the old or the new results are whole at its
path, whichever step an interrupt lands on."""
import os
from unittest import mock

from absl.testing import absltest

from jaxdissect import errors
from jaxdissect import results


def write(text):
  def contents(directory):
    for name in ("a.csv", "b.csv"):
      with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
        f.write(text)
  return contents


def read(result_dir):
  return {name: open(os.path.join(result_dir, name), encoding="utf-8").read()
          for name in sorted(os.listdir(result_dir))}


class Interrupt(BaseException):
  pass


class ResultDirTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.parent = self.create_tempdir().full_path
    self.result_dir = os.path.join(self.parent, "results")
    results.write_result_dir(self.result_dir, False, write("old"))

  def leftovers(self):
    return sorted(n for n in os.listdir(self.parent) if n != "results")

  def test_replacement_is_one_atomic_exchange(self):
    if not results._exchange(self.parent, self.parent):  # pylint: disable=protected-access
      self.skipTest("no renameat2(RENAME_EXCHANGE) on this system")
    results.write_result_dir(self.result_dir, True, write("new"))
    self.assertEqual(read(self.result_dir), {"a.csv": "new", "b.csv": "new"})
    self.assertEqual(self.leftovers(), [])

  def test_interrupt_while_writing_keeps_the_old_results(self):
    def half_then_interrupt(directory):
      write("new")(directory)
      raise Interrupt()
    with self.assertRaises(Interrupt):
      results.write_result_dir(self.result_dir, True, half_then_interrupt)
    self.assertEqual(read(self.result_dir), {"a.csv": "old", "b.csv": "old"})
    self.assertEqual(self.leftovers(), [])

  def test_interrupt_after_the_exchange_leaves_the_new_results(self):
    real_rmtree = results.shutil.rmtree
    calls = []

    def interrupted_cleanup(path, *args, **kwargs):
      calls.append(path)
      if len(calls) == 1:
        raise Interrupt()
      return real_rmtree(path, *args, **kwargs)

    with mock.patch.object(results.shutil, "rmtree", interrupted_cleanup), \
        self.assertRaises(Interrupt):
      results.write_result_dir(self.result_dir, True, write("new"))
    self.assertEqual(read(self.result_dir), {"a.csv": "new", "b.csv": "new"})

  def test_without_exchange_an_interrupt_between_renames_is_repaired(self):
    real_rename = os.rename

    def second_rename_interrupted(src, dst):
      if os.path.basename(dst) == "results":
        raise Interrupt()  # killed after the old results were moved aside
      return real_rename(src, dst)

    with mock.patch.object(results, "_exchange", return_value=False), \
        mock.patch.object(results.os, "rename", second_rename_interrupted), \
        self.assertRaises(Interrupt):
      results.write_result_dir(self.result_dir, True, write("new"))
    self.assertFalse(os.path.exists(self.result_dir))
    # The next run (or check) puts the old results back before anything else.
    with self.assertLogs(level="WARNING"):
      with self.assertRaisesRegex(errors.UserError, "already holds results"):
        results.check_result_dir(self.result_dir, overwrite=False)
    self.assertEqual(read(self.result_dir), {"a.csv": "old", "b.csv": "old"})
    self.assertEqual(self.leftovers(), [])
    with mock.patch.object(results, "_exchange", return_value=False):
      results.write_result_dir(self.result_dir, True, write("new"))
    self.assertEqual(read(self.result_dir), {"a.csv": "new", "b.csv": "new"})
    self.assertEqual(self.leftovers(), [])


if __name__ == "__main__":
  absltest.main()

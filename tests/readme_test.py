"""The README's Python example runs offline as written."""
import os
import re
import subprocess
import sys

from absl.testing import absltest
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_python_example() -> str:
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    text = f.read()
  section = text[text.index("## From Python"):]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


class ReadmeTest(absltest.TestCase):

  @pytest.mark.slow
  def test_from_python_example_runs_offline_as_written(self):
    code = readme_python_example()
    self.assertNotIn("uint8_images", code)  # no variable the reader has to invent
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("Probe pass", proc.stderr)  # progress is shown while it runs
    printed = proc.stdout
    self.assertIn("planted.colour", printed)
    self.assertIn("(8, 56)", printed)  # scores of fc: 8 units x 56 concepts


if __name__ == "__main__":
  absltest.main()

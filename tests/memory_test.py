"""main.py streams P (images x concepts) when it would not fit: an end-to-end run under
an address-space limit (resource.setrlimit) that the in-memory P exceeds."""
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT_GB = 4.4
# 15,000 images x 60,000 concepts: P alone is 3.35 GiB. Address space at its peak
# (VmPeak, no limit, measured): 3.51 GiB streaming, 5.29 GiB holding P. (At 10,000
# images holding P peaked at 4.12 GiB: under the former 5 GiB limit once transformers
# stopped importing torch at start-up.)
WRAPPER = """
import resource, runpy, sys
limit = int({limit} * 2**30)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.argv = ["main.py"] + sys.argv[1:]
runpy.run_path({main!r}, run_name="__main__")
"""


def run_limited(workdir, *extra):
  code = WRAPPER.format(limit=LIMIT_GB, main=os.path.join(REPO, "main.py"))
  return subprocess.run(
      [sys.executable, "-c", code, "--config", os.path.join(REPO, "configs", "synthetic.py"),
       "--workdir", workdir, "--config.d_probe=synthetic:in_dist:15000",
       "--config.target_layers=fc",
       "--config.concept_set=wordfreq:en:60000", *extra],
      capture_output=True, text=True, timeout=900, cwd=REPO,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


@pytest.mark.slow
class MemoryLimitTest(absltest.TestCase):

  def test_streaming_finishes_where_the_in_memory_matrix_does_not_fit(self):
    workdir = tempfile.mkdtemp()
    streamed = run_limited(workdir)
    self.assertEqual(streamed.returncode, 0, streamed.stderr[-3000:])
    self.assertIn("streaming soft_wpmi", streamed.stderr)
    self.assertTrue(os.path.isfile(os.path.join(workdir, "results", "descriptions.csv")))
    # The same run forced to hold P fails under the same limit (activations reused), with
    # one line that says how to make it stream.
    in_memory = run_limited(workdir, "--config.concept_matrix_max_gb=1000",
                            "--config.overwrite=True")
    self.assertIn("Probe activations reused", in_memory.stderr)
    self.assertEqual(in_memory.returncode, 2, in_memory.stderr[-3000:])
    last = in_memory.stderr.strip().splitlines()[-1]
    self.assertTrue(last.startswith("error: concept_matrix_max_gb:"), last)
    self.assertNotIn("Traceback", in_memory.stderr)


if __name__ == "__main__":
  absltest.main()

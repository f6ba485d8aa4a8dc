"""Preemption: main.py killed with SIGKILL at several points resumes to identical results.

The runs are killed (SIGKILL, no chance to clean up) as soon as they log the line that
opens a phase, restarted, and every result file is compared with an uninterrupted run's,
byte for byte (config.json: all but the fields that name the run itself: its workdir
paths, overwrite and its stages' wall times).
"""
import json
import os
import re
import signal
import subprocess
import sys
import tempfile

from absl.testing import absltest
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CHUNKS = 4
ARGS = ["--config.d_probe=synthetic:in_dist:400", "--config.batch_size=50",
        "--config.probe_chunk_images=100",
        "--config.target_layers=layer4,fc,planted.colour,planted.texture"]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def command(workdir, *extra):
  return [sys.executable, os.path.join(REPO, "main.py"), "--config",
          os.path.join(REPO, "configs", "synthetic.py"), "--workdir", workdir, *ARGS,
          *extra]


def run_and_kill_at(workdir, trigger: str, signum=signal.SIGKILL, rest=None,
                    before=None) -> bool:
  """Runs main.py until a log line matches `trigger`, then sends it `signum` (SIGKILL:
  no chance to clean up). Returns whether the trigger was seen (False: the run ended
  first); `before`, a list, receives the lines up to the trigger's; `rest`, a list, the
  lines written after the signal and the status."""
  proc = subprocess.Popen(command(workdir), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          text=True, env=ENV)
  seen = False
  for line in proc.stderr:
    if before is not None:
      before.append(line)
    if re.search(trigger, line):
      proc.send_signal(signum)
      seen = True
      break
  if rest is not None:
    rest.extend(proc.stderr)
  proc.stderr.close()
  proc.wait(timeout=600)
  if rest is not None:
    rest.append(proc.returncode)
  return seen


def result_files(result_dir) -> dict[str, bytes]:
  files = {}
  for root, _, names in os.walk(result_dir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, result_dir)] = f.read()
  return files


def without_run_fields(config_json: bytes) -> dict:
  """config.json less what names this run: its workdir, overwrite (the restart sets it)
  and its stages' wall times."""
  config = json.loads(config_json)
  config.pop("workdir")
  config.pop("stage_seconds")
  for field in ("activation_dir", "result_dir", "overwrite"):
    config["config"].pop(field)
  return config


def split_warnings(index_html: bytes) -> tuple[bytes, list[bytes]]:
  """(the report index without its warnings list, the listed warnings)."""
  found = re.search(rb"<h2>Warnings during the run \(\d+\)</h2><ul class='warnings'>(.*?)</ul>",
                    index_html, re.S)
  if not found:
    return index_html, []
  items = re.findall(rb"<li>(.*?)</li>", found.group(1), re.S)
  return index_html[:found.start()] + index_html[found.end():], items


@pytest.mark.slow
class ResumeTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.reference_dir = tempfile.mkdtemp()
    proc = subprocess.run(command(cls.reference_dir), capture_output=True, text=True,
                          timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cls.reference = result_files(os.path.join(cls.reference_dir, "results"))

  def assert_same_results(self, workdir):
    files = result_files(os.path.join(workdir, "results"))
    self.assertEqual(sorted(files), sorted(self.reference))
    for name, content in files.items():
      if name == "config.json":
        self.assertEqual(without_run_fields(content), without_run_fields(self.reference[name]))
      elif name == "report/index.html":
        # The warnings list says what happened in this run (a damaged chunk, say): the
        # resumed run's holds the reference's, the rest of the page is the same bytes.
        page, warnings = split_warnings(content)
        reference_page, reference_warnings = split_warnings(self.reference[name])
        self.assertEqual(page, reference_page, name)
        self.assertContainsSubset(reference_warnings, warnings)
      else:
        self.assertEqual(content, self.reference[name], name)

  def test_killed_at_each_phase_resumes_to_identical_results(self):
    # One workdir, killed once in each phase in turn: each restart resumes what the
    # killed runs left (a run costs a minute here, so one chain instead of a fresh run
    # per phase). The chunk that the first kill left is damaged on disk before the first
    # restart: it is recomputed, not read.
    workdir = tempfile.mkdtemp()
    self.assertTrue(run_and_kill_at(workdir, r"Probe chunk 2/4 saved"),
                    "the run ended before the probe pass's second chunk")
    activation_dir = os.path.join(workdir, "activations")
    (partial,) = [n for n in os.listdir(activation_dir) if n.startswith("partial-")]
    first = sorted(n for n in os.listdir(os.path.join(activation_dir, partial))
                   if n.startswith("chunk-"))[0]
    path = os.path.join(activation_dir, partial, first, "layer-1.npy")
    with open(path, "r+b") as f:
      f.seek(-4, os.SEEK_END)
      f.write(b"\x00\x00\x80\x7f")  # a NaN in place of the last value
    for phase, trigger in (("text pass", r"Embedding \d+ concepts"),
                           ("similarity", r"Scoring \d+ layer"),
                           ("writing results", r"Writing results")):
      before = []
      self.assertTrue(run_and_kill_at(workdir, trigger, before=before),
                      f"the run ended before the {phase}")
      log = "".join(before)
      if phase == "text pass":
        self.assertIn("is damaged", log)
        reused = re.search(r"Probe pass: (\d+) of 4 chunk\(s\) reused", log)
        self.assertIsNotNone(reused, log[-3000:])
        # Chunks 1 and 2 were saved before the kill (chunk 3 may have been too), and
        # chunk 1 is damaged.
        self.assertBetween(int(reused.group(1)), 1, 2)
      else:
        self.assertIn("Probe activations reused", log, phase)
    # Overwrite: a kill that lands after the results were renamed into place leaves a
    # finished result_dir, which a plain rerun would (rightly) refuse.
    proc = subprocess.run(command(workdir, "--config.overwrite=True"), capture_output=True,
                          text=True, timeout=600, env=ENV)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("Probe activations reused", proc.stderr)
    self.assert_same_results(workdir)
    self.assertEqual([n for n in os.listdir(activation_dir) if n.startswith("partial-")], [])

  def test_sigterm_ends_in_one_line_and_the_rerun_resumes(self):
    workdir = tempfile.mkdtemp()
    rest = []
    self.assertTrue(run_and_kill_at(workdir, r"Probe chunk 2/4 saved", signal.SIGTERM, rest))
    status, lines = rest[-1], [l.strip() for l in rest[:-1] if l.strip()]
    self.assertEqual(status, 130, lines)
    self.assertNotIn("Traceback", "\n".join(lines))
    self.assertRegex(lines[-1], r"^interrupted \(SIGTERM\): [23] saved chunk\(s\) of an "
                     r"unfinished pass under .* are kept .* Rerun the same command to resume\.$")
    proc = subprocess.run(command(workdir), capture_output=True, text=True, timeout=600,
                          env=ENV)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertRegex(proc.stderr, r"Probe pass: [23] of 4 chunk\(s\) reused")
    self.assert_same_results(workdir)

  def test_two_runs_sharing_one_activation_dir_at_once(self):
    shared = tempfile.mkdtemp()
    workdirs = [tempfile.mkdtemp(), tempfile.mkdtemp()]
    procs = [subprocess.Popen(command(w, f"--config.activation_dir={shared}"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=ENV) for w in workdirs]
    for proc in procs:
      _, stderr = proc.communicate(timeout=600)
      self.assertEqual(proc.returncode, 0, stderr[-3000:])
    for workdir in workdirs:
      self.assert_same_results(workdir)
    self.assertEqual(sorted(n.split("-")[0] for n in os.listdir(shared)), ["probe", "text"])


if __name__ == "__main__":
  absltest.main()

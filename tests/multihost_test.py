"""Two real JAX processes on 127.0.0.1 (jax.distributed, CPU collectives) write the same
results as one process."""
import csv
import io
import os
import socket
import subprocess
import sys
import tempfile

from absl.testing import absltest
import pytest

from jaxdissect import tiny_models
from tests import main_test

# Always written; every other CSV the one-process run writes (trust, explanations,
# compositional labels, visibility) is compared too.
RESULT_FILES = ("descriptions.csv", "descriptions_topk.csv", "top_images.csv",
                "skipped_images.csv", "unit_trust.csv")


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


@pytest.mark.slow
class TwoProcessTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.clip = tiny_models.make_tiny_clip(os.path.join(cls.tmp, "clip"))
    cls.resnet = tiny_models.make_tiny_resnet(os.path.join(cls.tmp, "resnet"), "basic")
    cls.images = os.path.join(cls.tmp, "images")
    tiny_models.write_image_folder(cls.images, 141)
    # One undecodable file: skipped by the process that owns it, listed by process 0.
    with open(os.path.join(cls.images, "img_00070b.png"), "wb") as f:
      f.write(b"not an image at all")
    cls.concepts = tiny_models.write_concepts(os.path.join(cls.tmp, "concepts.txt"),
                                              main_test.CONCEPTS)

  def args(self, workdir, **overrides):
    fields = {"clip_model": self.clip, "target_model": self.resnet,
              "target_layers": "layer2,layer4,fc", "d_probe": f"folder:{self.images}",
              "concept_set": self.concepts, "log_every_s": 0.0}
    fields.update(overrides)
    return [sys.executable, os.path.join(main_test.REPO, "main.py"), "--config",
            main_test.BASE_CONFIG, "--workdir",
            workdir] + [f"--config.{k}={v}" for k, v in fields.items()]

  def run_two(self, workdir, **overrides):
    port = _free_port()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen(
        self.args(workdir, distributed=True, coordinator_address=f"127.0.0.1:{port}",
                  num_processes=2, process_id=rank, **overrides),
        cwd=main_test.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for rank in (0, 1)]
    outputs = []
    for proc in procs:
      try:
        _, stderr = proc.communicate(timeout=500)
      except subprocess.TimeoutExpired:
        for p in procs:
          p.kill()
        raise
      self.assertEqual(proc.returncode, 0, stderr[-4000:])
      outputs.append(stderr)
    return outputs

  def read(self, workdir):
    """{name: bytes} of every CSV under the results directory."""
    results = os.path.join(workdir, "results")
    found = {}
    for folder, _, names in os.walk(results):
      for name in names:
        if name.endswith(".csv"):
          path = os.path.join(folder, name)
          with open(path, "rb") as f:
            found[os.path.relpath(path, results)] = f.read()
    return found

  def test_two_processes_equal_one(self):
    # The global batch of 32 is 16 images per process, as one process with a batch of
    # 16 has on its one device: the same program on the same images at the same batch
    # positions (sharding.shard_offsets), so the same bits.
    # The in-memory pair gathers the activations, as a streamed pair does within
    # activation_gather_max_gb (probe_test covers that rule): every CSV is equal. The
    # streamed pair is set beyond it, so it gathers only the running top-k.
    for name, overrides in (("in_memory", {}),
                            ("streaming", {"concept_matrix_max_gb": 1e-9})):
      with self.subTest(name):
        single = os.path.join(self.tmp, f"single_{name}")
        # The streaming run scores the in-memory run's stored activations.
        store = ({} if name == "in_memory" else
                 {"activation_dir": os.path.join(self.tmp, "single_in_memory", "activations")})
        single_log = main_test.run_main(*self.args(single, batch_size=16, **store,
                                                   **overrides)[2:]).stderr
        self.assertEqual("Probe activations reused" in single_log, name == "streaming")
        double = os.path.join(self.tmp, "double")
        top_k_only = {} if name == "in_memory" else {"activation_gather_max_gb": 0}
        logs = self.run_two(double, batch_size=32, overwrite=True, **overrides,
                            **top_k_only)
        self.assertIn("JAX process 1 of 2", logs[1])
        self.assertIn("Results written", logs[0])
        self.assertNotIn("Results written", logs[1])
        stored = os.listdir(os.path.join(double, "activations"))
        self.assertEqual(sum(".shard-0-of-2" in e for e in stored), 1, stored)
        self.assertEqual(sum(".shard-1-of-2" in e for e in stored), 1, stored)
        if name == "in_memory":  # each its slices of the 142 files' 5 global batches
          self.assertIn("0..141: 78 images in 5 batches of 16", logs[0])
          self.assertIn("0..141: 64 images in 5 batches of 16", logs[1])
        else:  # the second pair reuses both processes' shards
          self.assertIn("Probe activations reused", logs[0])
          self.assertIn("Probe activations reused", logs[1])
        one, two = self.read(single), self.read(double)
        self.assertIn(b"img_00070b.png", one["skipped_images.csv"])
        self.assertContainsSubset(RESULT_FILES + ("explanations.csv",), one)
        if name == "in_memory":
          self.assertEqual(sorted(two), sorted(one))
          for result_file in one:
            self.assertEqual(two[result_file], one[result_file], result_file)
        else:
          self.assert_top_k_only(one, two, logs)

  def assert_top_k_only(self, one, two, logs):
    """A pair that gathered only the running top-k: the same labels and stability, no
    AUC or explanations, and a warning in both logs says so."""
    self.assertIn("exceed activation_gather_max_gb=0", logs[0])
    self.assertIn("unit_trust.csv gets no AUC", logs[1])
    self.assertNotIn("explanations.csv", two)
    for result_file in RESULT_FILES[:-1]:
      self.assertEqual(two[result_file], one[result_file], result_file)
    trust_one, trust_two = (list(csv.DictReader(io.StringIO(x["unit_trust.csv"].decode())))
                            for x in (one, two))
    needs_activations = ("auc", "correlation_label", "simulation", "explained")
    for column in trust_one[0]:
      values = [r[column] for r in trust_two]
      if column in needs_activations:
        self.assertEqual(set(values), {""}, column)
      else:
        self.assertEqual(values, [r[column] for r in trust_one], column)


if __name__ == "__main__":
  absltest.main()

"""Two real JAX processes on 127.0.0.1 (jax.distributed, CPU collectives) write the same
results as one process."""
import os
import socket
import subprocess
import sys
import tempfile

from absl.testing import absltest
import pytest

from jaxdissect import tiny_models
from tests import main_test

RESULT_FILES = ("descriptions.csv", "descriptions_topk.csv", "top_images.csv",
                "skipped_images.csv")


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
    results = os.path.join(workdir, "results")
    return {name: open(os.path.join(results, name), "rb").read()
            for name in RESULT_FILES}

  def test_two_processes_equal_one(self):
    # The global batch of 32 is 16 images per process, as one process with a batch of
    # 16 has on its one device: the same program on the same images at the same batch
    # positions (sharding.shard_offsets), so the same bits.
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
        logs = self.run_two(double, batch_size=32, overwrite=True, **overrides)
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
        for result_file in RESULT_FILES:
          self.assertEqual(two[result_file], one[result_file], result_file)


if __name__ == "__main__":
  absltest.main()

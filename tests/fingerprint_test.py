"""The activation-store keys change with every factor that changes the stored values, and
with nothing else: one test per factor."""
import dataclasses
import os
import shutil
import tempfile

from absl.testing import absltest
import jax
import numpy as np

from jaxdissect import config as config_lib
from jaxdissect import probe_pass
from jaxdissect import tiny_models
from jaxdissect.data import probe as probe_lib
from jaxdissect.models import clip as clip_lib
from jaxdissect.models import targets
import tiny_fixtures


class FingerprintTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    tmp = tempfile.mkdtemp()
    cls.clip = clip_lib.load_clip(tiny_fixtures.clip())
    cls.target = targets.load_target(tiny_fixtures.resnet())
    cls.images = os.path.join(tmp, "images")
    tiny_models.write_image_folder(cls.images, 6)

  def setUp(self):
    super().setUp()
    self.folder = self.create_tempdir().full_path
    shutil.copytree(self.images, self.folder, dirs_exist_ok=True)

  def key(self, target=None, clip=None, layers="layer2,fc", **overrides):
    config = config_lib.get_base_config()
    config.update(overrides)
    target = target or self.target
    probe_set = probe_lib.ProbeSet(probe_lib.parse_probe_spec(f"folder:{self.folder}"))
    return probe_pass.probe_store_key(config, clip or self.clip, target,
                                    target.resolve_layers(layers.split(",")), probe_set)

  def test_unrelated_fields_keep_the_key(self):
    base = self.key()
    self.assertEqual(base, self.key())
    self.assertEqual(base, self.key(batch_size=7, similarity_fn="wpmi", overwrite=True,
                                    result_dir="/elsewhere", num_alternatives=3,
                                    probe_chunk_images=5))

  def test_target_weights(self):
    params = jax.tree.map(np.array, self.target.variables)
    params["params"]["classifier"]["1"]["bias"][0] += 1e-3
    changed = dataclasses.replace(self.target, variables=params)
    self.assertNotEqual(self.key(), self.key(target=changed))

  def test_clip_weights(self):
    params = jax.tree.map(np.array, self.clip.params)
    params["visual_projection"]["kernel"][0, 0] += 1e-3
    changed = dataclasses.replace(self.clip, params=params)
    self.assertNotEqual(self.key(), self.key(clip=changed))

  def test_layers(self):
    self.assertNotEqual(self.key(layers="layer2,fc"), self.key(layers="layer3,fc"))
    self.assertNotEqual(self.key(layers="layer2,fc"), self.key(layers="fc,layer2"))

  def test_pooling(self):
    self.assertNotEqual(self.key(pool_mode="avg"), self.key(pool_mode="max"))

  def test_probe_file_added(self):
    before = self.key()
    shutil.copy(os.path.join(self.folder, probe_lib.list_image_files(self.folder)[0]),
                os.path.join(self.folder, "zz_new.png"))
    self.assertNotEqual(before, self.key())

  def test_probe_file_removed(self):
    before = self.key()
    os.remove(os.path.join(self.folder, probe_lib.list_image_files(self.folder)[-1]))
    self.assertNotEqual(before, self.key())

  def test_probe_file_modified(self):
    before = self.key()
    path = os.path.join(self.folder, probe_lib.list_image_files(self.folder)[0])
    stat = os.stat(path)
    with open(path, "r+b") as f:
      f.seek(-1, os.SEEK_END)
      f.write(b"\x00")
    # Same size. Files are identified by size and mtime without reading them, and a
    # write moves the mtime; set it explicitly, since a write within the filesystem's
    # timestamp resolution might not.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    self.assertNotEqual(before, self.key())

  def test_preprocessing(self):
    changed = dataclasses.replace(self.target, transform=dataclasses.replace(
        self.target.transform, resample="bicubic" if
        self.target.transform.resample != "bicubic" else "bilinear"))
    self.assertNotEqual(self.key(), self.key(target=changed))

  def test_concept_set(self):
    base = probe_pass.text_store_key(self.clip, ["dog", "cat"])
    self.assertEqual(base, probe_pass.text_store_key(self.clip, ["dog", "cat"]))
    self.assertNotEqual(base, probe_pass.text_store_key(self.clip, ["dog", "cats"]))
    self.assertNotEqual(base, probe_pass.text_store_key(self.clip, ["cat", "dog"]))


if __name__ == "__main__":
  absltest.main()

"""configs/resnet50.py is the paper's experiment; without network it ends in one line,
and with its resources' variables pointing at tiny stand-ins it runs end to end."""
import json
import os

from absl.testing import absltest
import pytest

from jaxdissect import resources
from jaxdissect import tiny_models
import main_test
import torchvision_test

CLASS_NAMES = ["tench, Tinca tinca", "goldfish", "red thing", "blue thing", "dog"]


def paper_config(name="resnet50"):
  """configs/NAME.py's config, loaded as main.py's config flag does (by path, with
  the repository importable)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  if main_test.REPO not in sys.path:
    sys.path.insert(0, main_test.REPO)
  spec = importlib.util.spec_from_file_location(
      f"{name}_config", os.path.join(main_test.REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


class PaperSetupTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = self.create_tempdir().full_path
    self.cache = os.path.join(self.tmp, "cache")
    self.offline = {"JAXDISSECT_CACHE": self.cache, "JAXDISSECT_OFFLINE": "1",
                    "HF_HUB_OFFLINE": "1", "CLIP_DISSECT_DATA": "",
                    "JAXDISSECT_RESNET50": ""}

  def test_config_is_the_papers_experiment(self):
    config = paper_config()
    self.assertEqual(config.target_model, "torchvision:resnet50")
    self.assertEqual(config.clip_model, "openai/clip-vit-base-patch16")
    self.assertEqual(config.concept_set, "clip_dissect:20k")
    self.assertEqual(config.class_names, "clip_dissect:imagenet_labels")
    self.assertEqual(config.d_probe, "tfds:imagenet2012:validation")
    self.assertEqual(config.similarity_fn, "soft_wpmi")
    self.assertEqual(config.pool_mode, "avg")
    self.assertEqual(config.sentence_model, "sentence-transformers/all-mpnet-base-v2")
    self.assertEqual(config.target_layers, "conv1,layer1,layer2,layer3,layer4")
    for spec in (config.target_model, config.concept_set, config.class_names):
      self.assertIn(spec, resources.RESOURCES)
    hub = paper_config("resnet50_hf")  # the timm-trained hub model, otherwise the same
    self.assertEqual(hub.target_model, "microsoft/resnet-50")
    self.assertEqual(hub.class_names, "")  # its id2label holds the ImageNet names
    self.assertEqual(hub.concept_set, config.concept_set)

  def test_offline_run_ends_in_one_line_naming_what_to_fetch(self):
    proc = main_test.run_main("--config", os.path.join(main_test.REPO, "configs",
                                                       "resnet50.py"),
                              "--workdir", self.tmp, check=False, env_extra=self.offline)
    line = main_test.assert_one_line_error(self, proc, "target_model")
    weights = resources.RESOURCES["torchvision:resnet50"]
    words = resources.RESOURCES["clip_dissect:20k"]
    cache_path = os.path.join(self.cache, "torchvision", weights.filename)
    for part in (weights.url, cache_path, "JAXDISSECT_RESNET50",
                 "Also missing: concept_set", words.url):
      self.assertIn(part, line)

  @pytest.mark.slow
  def test_stand_ins_run_end_to_end(self):
    weights = os.path.join(self.tmp, "resnet50.pth")
    torchvision_test.write_torch_zip(weights, torchvision_test.make_state("bottleneck"))
    data = os.path.join(self.tmp, "data")
    os.makedirs(data)
    with open(os.path.join(data, "20k.txt"), "w", encoding="utf-8") as f:
      f.write("\n".join(list(tiny_models.DEMO_CONCEPTS) + CLASS_NAMES))
    with open(os.path.join(data, "imagenet_labels.txt"), "w", encoding="utf-8") as f:
      f.write("\n".join(CLASS_NAMES))  # no final newline, as the authors' file
    clip = tiny_models.make_tiny_clip(os.path.join(self.tmp, "clip"))
    images = os.path.join(self.tmp, "images")
    tiny_models.write_image_folder(images, 120)
    env = dict(self.offline, CLIP_DISSECT_DATA=data, JAXDISSECT_RESNET50=weights)
    args = ["--config", os.path.join(main_test.REPO, "configs", "resnet50.py"),
            "--workdir", os.path.join(self.tmp, "work"), f"--config.clip_model={clip}",
            f"--config.d_probe=folder:{images}", "--config.target_layers=layer4,fc",
            "--config.batch_size=40", "--config.trust_permutations=0",
            "--config.report_top_images=0"]
    proc = main_test.run_main(*args, env_extra=env)
    self.assertIn("used as given", proc.stderr)  # the stand-ins are not the pinned files
    self.assertIn("No sentence model", proc.stderr)  # all-mpnet-base-v2 is not here
    result_dir = os.path.join(self.tmp, "work", "results")
    rows = main_test.read_csv(os.path.join(result_dir, "descriptions.csv"))
    self.assertEqual(rows[0], ["layer", "unit", "description", "similarity"])
    self.assertLen([r for r in rows if r[0] == "fc"], len(CLASS_NAMES))
    with open(os.path.join(result_dir, "evaluation.json"), encoding="utf-8") as f:
      evaluation = json.load(f)
    self.assertIn("top1", evaluation["fc"])  # the class names are the truth
    self.assertIn("clip_cos", evaluation["fc"])
    self.assertNotIn("sentence_cos", evaluation["fc"])
    self.assertNotIn("top1", evaluation["layer4"])
    converted = os.listdir(os.path.join(self.cache, "converted"))
    self.assertLen(converted, 1)
    # Without the class-name list fc loses its accuracy, with a warning saying why, and
    # the converter's placeholder names (class_0, ...) are never taken as truth.
    os.remove(os.path.join(data, "imagenet_labels.txt"))
    proc = main_test.run_main(*args, "--config.overwrite=True", env_extra=env)
    self.assertIn("No class names", proc.stderr)
    self.assertIn("placeholders", proc.stderr)
    with open(os.path.join(result_dir, "evaluation.json"), encoding="utf-8") as f:
      self.assertNotIn("top1", json.load(f)["fc"])


if __name__ == "__main__":
  absltest.main()

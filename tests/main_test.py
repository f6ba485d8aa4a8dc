"""End to end through main.py with tiny models saved by save_pretrained and loaded back."""
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
import pytest

from jaxdissect import tiny_models
import tiny_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONCEPTS = list(tiny_models.DEMO_CONCEPTS)
NUM_IMAGES = 130
# The base defaults as a config file: tests set every model and data field themselves.
BASE_CONFIG = os.path.join(REPO, "tests", "data", "base_config.py")


def run_main(*args, check=True, env_extra=None):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu", **(env_extra or {}))
  proc = subprocess.run([sys.executable, os.path.join(REPO, "main.py"), *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"main.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return proc


def assert_one_line_error(test, proc, field, context=None):
  """Exit 2, no traceback, and a last line `error: FIELD: ... Fix: ...`; returns it."""
  test.assertEqual(proc.returncode, 2, (context, proc.stderr[-2000:]))
  test.assertNotIn("Traceback", proc.stderr, context)
  last = proc.stderr.strip().splitlines()[-1]
  test.assertTrue(last.startswith(f"error: {field}:"), (context, last))
  test.assertIn("Fix:", last, context)
  return last


def base_config():
  """The base defaults, as main.py's flag loads them from BASE_CONFIG."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "base_config", BASE_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def read_csv(path):
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.reader(f))


class _TinyModels(absltest.TestCase):
  """Tiny CLIP and ResNets saved by save_pretrained, images and concepts, per class."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.clip = tiny_fixtures.clip()
    cls.basic = tiny_fixtures.resnet("basic")
    cls.bottleneck = tiny_fixtures.resnet("bottleneck", safetensors=True)
    cls.images = os.path.join(cls.tmp, "images")
    cls.image_ids = tiny_models.write_image_folder(cls.images, NUM_IMAGES)
    cls.concepts = tiny_models.write_concepts(os.path.join(cls.tmp, "concepts.txt"),
                                              CONCEPTS)

  def fields(self, **overrides):
    fields = {"clip_model": self.clip, "target_model": self.basic,
              "target_layers": "conv1,layer1,layer2,layer3,layer4,fc",
              "d_probe": f"folder:{self.images}", "concept_set": self.concepts,
              "batch_size": 32, "log_every_s": 0.0}
    fields.update(overrides)
    return fields

  def config(self, **overrides):
    """The config that args() would give main.py, built in-process (for cli.run)."""
    config = base_config()
    for key, value in self.fields(**overrides).items():
      config[key] = type(config[key])(value) if config[key] is not None else value
    return config

  def args(self, workdir, **overrides):
    return ["--config", BASE_CONFIG,
            "--workdir", workdir] + [f"--config.{k}={v}"
                                     for k, v in self.fields(**overrides).items()]


class OneLineErrorTest(_TinyModels):
  """Bad input through main.py's own path after flag parsing (jaxdissect.cli.run),
  in-process: exit status 2 and one line `error: FIELD: ... Fix: ...`."""

  def cli_error(self, field, context=None, workdir=None, **overrides):
    import contextlib  # pylint: disable=g-import-not-at-top
    import io  # pylint: disable=g-import-not-at-top
    from jaxdissect import cli  # pylint: disable=g-import-not-at-top
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
      status = cli.run(self.config(**overrides), workdir or tempfile.mkdtemp(dir=self.tmp))
    self.assertEqual(status, 2, context)
    lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
    self.assertLen([l for l in lines if l.startswith("error:")], 1, context)
    last = lines[-1]
    self.assertTrue(last.startswith(f"error: {field}:"), (context, last))
    self.assertIn("Fix:", last, context)
    return last

  def test_existing_result_dir_is_refused(self):
    workdir = tempfile.mkdtemp(dir=self.tmp)
    os.makedirs(os.path.join(workdir, "results"))
    with open(os.path.join(workdir, "results", "keep.txt"), "w") as f:
      f.write("mine")
    last = self.cli_error("result_dir", workdir=workdir)
    self.assertIn("overwrite", last)
    self.assertEqual(os.listdir(os.path.join(workdir, "results")), ["keep.txt"])

  def test_unknown_layer_fails_before_reading_images(self):
    last = self.cli_error("target_layers", target_layers="layer4,nope")
    self.assertIn("'nope'", last)
    self.assertIn("layer4", last)

  def test_model_free_checks_come_before_the_models_load(self):
    """A bad probe set or concept file is reported even when the models could not load
    (they are not loaded yet)."""
    missing = os.path.join(self.tmp, "no_such_model")
    self.cli_error("d_probe", d_probe=f"folder:{self.tmp}/missing", clip_model=missing,
                   target_model=missing)
    self.cli_error("concept_set", concept_set=f"{self.tmp}/missing.txt",
                   clip_model=missing, target_model=missing)

  def test_fewer_images_than_top_k_names_the_minimum(self):
    folder = tempfile.mkdtemp(dir=self.tmp)
    tiny_models.write_image_folder(folder, 40)
    last = self.cli_error("d_probe", d_probe=f"folder:{folder}")
    self.assertIn("at least 100", last)

  def test_bad_models_and_concept_files_are_one_line_errors(self):
    def write(name, data):
      path = os.path.join(self.tmp, name)
      with open(path, "wb") as f:
        f.write(data)
      return path

    cases = {
        "clip_model": {"clip_model": os.path.join(self.tmp, "no_such_clip")},
        "clip_model ": {"clip_model": self.basic},  # a ResNet, not a CLIP
        "target_model": {"target_model": os.path.join(self.tmp, "no_such_target")},
        "concept_set": {"concept_set": os.path.join(self.tmp, "no_such_concepts.txt")},
        "concept_set ": {"concept_set": write("empty.txt", b"")},
        "concept_set  ": {"concept_set": write("blank.txt", b"\n \n\t\n")},
        "concept_set   ": {"concept_set": write("latin1.txt", "caf\xe9\n".encode("latin-1"))},
        "d_probe": {"d_probe": f"folder:{os.path.join(self.tmp, 'no_such_folder')}"},
        "similarity_fn": {"similarity_fn": "nope"},
        "probe_chunk_images": {"probe_chunk_images": 0},
    }
    for field, overrides in cases.items():
      self.cli_error(field.strip(), field, **overrides)

  def test_unwritable_outputs_fail_before_the_models_load(self):
    missing = os.path.join(self.tmp, "no_such_model")  # never reached
    a_file = os.path.join(self.tmp, "a_file")
    with open(a_file, "w") as f:
      f.write("x")
    cases = {
        "result_dir": ({"result_dir": os.path.join(a_file, "results")}, "which is a file"),
        "result_dir ": ({"result_dir": a_file}, "is a file"),
        "activation_dir": ({"activation_dir": a_file}, "is a file"),
        "activation_dir ": ({"activation_dir": os.path.join(a_file, "deeper", "acts")},
                            f"is under '{a_file}', which is a file"),
    }
    for field, (overrides, expected) in cases.items():
      last = self.cli_error(field.strip(), field, clip_model=missing, target_model=missing,
                            **overrides)
      self.assertIn(expected, last, field)

  def test_disk_full_and_interrupts_end_in_one_line(self):
    import contextlib  # pylint: disable=g-import-not-at-top
    import errno  # pylint: disable=g-import-not-at-top
    import io  # pylint: disable=g-import-not-at-top
    from jaxdissect import cli  # pylint: disable=g-import-not-at-top
    from jaxdissect import store  # pylint: disable=g-import-not-at-top
    workdir = tempfile.mkdtemp(dir=self.tmp)

    def full(root, *args, **kwargs):
      del args, kwargs
      raise OSError(errno.ENOSPC, "No space left on device", os.path.join(root, "x.npy"))

    with mock.patch.object(store, "save_probe_chunk", full):
      last = self.cli_error("activation_dir", workdir=workdir, target_layers="fc")
    self.assertIn("saving probe chunks at", last)
    self.assertIn("failed: the disk is full", last)
    self.assertIn("a rerun resumes", last)
    self.assertFalse(os.path.exists(os.path.join(workdir, "results")))

    def results_full(directory, *args, **kwargs):
      del args, kwargs
      raise OSError(errno.ENOSPC, "No space left on device",
                    os.path.join(directory, "descriptions.csv"))

    from jaxdissect import results  # pylint: disable=g-import-not-at-top
    with mock.patch.object(results, "write_files", results_full):
      last = self.cli_error("result_dir", workdir=workdir, target_layers="fc")
    self.assertIn("the disk is full", last)
    self.assertEqual([n for n in os.listdir(workdir) if n.startswith(".results")], [])

    stderr = io.StringIO()
    with mock.patch.object(cli.dissect, "run", side_effect=KeyboardInterrupt()), \
        contextlib.redirect_stderr(stderr):
      status = cli.run(self.config(target_layers="fc"), workdir)
    self.assertEqual(status, 130)
    (line,) = stderr.getvalue().strip().splitlines()
    # The pass above stored its activations before the results failed.
    self.assertIn("interrupted: 1 stored probe pass(es) under", line)
    self.assertIn("Rerun the same command to resume.", line)

  def test_config_errors_are_one_line(self):
    """main.py itself (a subprocess, flag parsing included): exit status 2."""
    bad = os.path.join(self.tmp, "bad_config.py")
    with open(bad, "w") as f:
      f.write("def get_config(:\n")
    cases = {
        "config": ["--config", os.path.join(self.tmp, "missing.py")],
        "config ": ["--config", bad],
        "bogus": ["--config", BASE_CONFIG, "--config.bogus=1"],
        "batch_size": ["--config", BASE_CONFIG, "--config.batch_size=abc"],
        # A field error after parsing: main.py's exit status for cli.run's one line.
        "similarity_fn": ["--config", BASE_CONFIG, "--config.similarity_fn=nope"],
    }
    for field, args in cases.items():
      proc = run_main(*args, check=False)
      assert_one_line_error(self, proc, field.strip(), field)


@pytest.mark.slow
class CloudPathTest(_TinyModels):
  """folder: and activation_dir on a tf.io.gfile filesystem (gs:// on TPU VMs; here TF's
  in-memory ram://), in-process through main.py's path: the same results as local."""

  def run_cli(self, workdir, **overrides):
    from jaxdissect import cli  # pylint: disable=g-import-not-at-top
    self.assertEqual(cli.run(self.config(target_layers="fc", **overrides), workdir), 0)
    return read_csv(os.path.join(workdir, "results", "descriptions.csv"))

  def test_ram_folder_and_store_match_a_local_run(self):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    remote = f"ram://cloud-path-test-{os.getpid()}"
    for rel in self.image_ids:
      tf.io.gfile.makedirs(f"{remote}/images/{os.path.dirname(rel)}")
      tf.io.gfile.copy(os.path.join(self.images, rel), f"{remote}/images/{rel}")
    local = self.run_cli(tempfile.mkdtemp(dir=self.tmp))
    workdir = tempfile.mkdtemp(dir=self.tmp)
    overrides = dict(d_probe=f"folder:{remote}/images", activation_dir=f"{remote}/acts")
    with mock.patch.dict(os.environ, {"JAXDISSECT_CACHE": tempfile.mkdtemp(dir=self.tmp)}):
      self.assertEqual(self.run_cli(workdir, **overrides), local)
      self.assertTrue(any(n.startswith("probe-") for n in tf.io.gfile.listdir(
          f"{remote}/acts")))
      with self.assertLogs(level="INFO") as logs:
        self.assertEqual(self.run_cli(workdir, overwrite=True, **overrides), local)
    self.assertTrue(any("Probe activations reused" in line for line in logs.output))
    with open(os.path.join(workdir, "results", "config.json"), encoding="utf-8") as f:
      self.assertEqual(json.load(f)["config"]["activation_dir"], f"{remote}/acts")


@pytest.mark.slow
class MainEndToEndTest(_TinyModels):
  """main.py in a subprocess, as a user runs it."""

  def check_results(self, result_dir, units, concepts):
    expected = ["descriptions.csv", "descriptions_topk.csv", "top_images.csv",
                "config.json", "report", "evaluation.json", "unit_trust.csv",
                "explanations.csv", "compositional.csv", "concept_visibility.csv"]
    self.assertCountEqual(os.listdir(result_dir), expected)
    shown = read_csv(os.path.join(result_dir, "concept_visibility.csv"))
    self.assertEqual(shown[0], ["concept", "images_showing", "visible"])
    self.assertEqual([r[0] for r in shown[1:]], list(concepts))
    self.assertTrue({r[2] for r in shown[1:]} <= {"true", "false"})
    with open(os.path.join(result_dir, "evaluation.json"), encoding="utf-8") as f:
      evaluation = json.load(f)
    self.assertEqual(list(evaluation), list(units))
    for layer, count in units.items():
      self.assertEqual(evaluation[layer]["num_units"], count)
      # A classifier's fc units have known truth: its class names.
      self.assertEqual("top1" in evaluation[layer], layer == "fc")
      self.assertEqual(evaluation[layer]["num_concepts"], len(concepts))
    rows = read_csv(os.path.join(result_dir, "descriptions.csv"))
    self.assertEqual(rows[0], ["layer", "unit", "description", "similarity"])
    per_layer = {}
    for layer, unit, description, score in rows[1:]:
      per_layer.setdefault(layer, []).append(int(unit))
      self.assertIn(description, concepts)
      float(score)
    self.assertEqual({k: len(v) for k, v in per_layer.items()}, units)
    for layer, unit_ids in per_layer.items():
      self.assertEqual(unit_ids, list(range(units[layer])))
    topk = read_csv(os.path.join(result_dir, "descriptions_topk.csv"))
    self.assertEqual(topk[0], ["layer", "unit", "rank", "concept", "similarity",
                               "resample_share"])
    self.assertLen(topk, 1 + 5 * sum(units.values()))
    # The rank-0 alternative is the label.
    labels = {(r[0], r[1]): r[2] for r in rows[1:]}
    for layer, unit, rank, concept, _, _ in topk[1:]:
      if rank == "0":
        self.assertEqual(labels[(layer, unit)], concept)
    top = read_csv(os.path.join(result_dir, "top_images.csv"))
    self.assertEqual(top[0], ["layer", "unit", "rank", "image_id", "activation"])
    self.assertLen(top, 1 + 10 * sum(units.values()))
    self.assertTrue({r[3] for r in top[1:]} <= set(self.image_ids))
    with open(os.path.join(result_dir, "config.json"), encoding="utf-8") as f:
      config = json.load(f)
    self.assertEqual(config["num_images"], NUM_IMAGES)
    self.assertIn("jax", config["versions"])
    # Stage wall times: the stability is part of the unit trust stage.
    seconds = config["stage_seconds"]
    self.assertEqual(set(seconds), {"similarity", "unit_trust", "label_stability"})
    self.assertGreater(seconds["similarity"], 0.0)
    self.assertLessEqual(seconds["label_stability"], seconds["unit_trust"])
    report = os.listdir(os.path.join(result_dir, "report"))
    self.assertIn("index.html", report)
    self.assertLen(report, 2 + len(units))  # index, a page per layer, images/
    self.assertLen(os.listdir(os.path.join(result_dir, "report", "images")), len(units))
    return rows

  def test_basic_resnet_end_to_end_reuse_and_batch_size_invariance(self):
    workdir = tempfile.mkdtemp(dir=self.tmp)
    first = run_main(*self.args(workdir))
    self.assertIn("images/s", first.stderr)
    # The p-values' pass over images x concepts runs once for the six layers, and the
    # six layers' label stability shares the run's row normalisers: each image's is
    # computed at most once, and some are (the stability used the run's object).
    self.assertEqual(first.stderr.count("Softmax normalisers of"), 1, first.stderr[-3000:])
    shared = re.search(r"Softmax normalisers over the \d+ concepts: (\d+) of (\d+) images",
                       first.stderr)
    self.assertIsNotNone(shared, first.stderr[-3000:])
    self.assertBetween(int(shared.group(1)), 1, int(shared.group(2)))
    # The six layers' resamples are relabelled in one pass over the concepts.
    self.assertEqual(first.stderr.count("Label stability (20 resamples) of 6 layer(s)"), 1,
                     first.stderr[-3000:])
    units = {"conv1": 8, "layer1": 8, "layer2": 16, "layer3": 16, "layer4": 24, "fc": 5}
    rows = self.check_results(os.path.join(workdir, "results"), units, CONCEPTS)

    again = run_main(*self.args(workdir, overwrite=True))
    self.assertIn("Probe activations reused", again.stderr)
    self.assertIn("Text embeddings reused", again.stderr)
    self.assertEqual(read_csv(os.path.join(workdir, "results", "descriptions.csv")), rows)

    other = tempfile.mkdtemp(dir=self.tmp)
    cache = os.path.join(self.tmp, "compilation-cache")
    small = run_main(*self.args(other, batch_size=7, compilation_cache_dir=cache))
    self.assertNotIn("reused", small.stderr)
    self.assertIn(f"compilation cache: {cache}.", small.stderr)
    self.assertNotEmpty(os.listdir(cache))  # the run's programs, for the next run
    rows7 = read_csv(os.path.join(other, "results", "descriptions.csv"))
    self.assertEqual([r[:3] for r in rows7], [r[:3] for r in rows])
    for r7, r32 in zip(rows7[1:], rows[1:]):
      self.assertAlmostEqual(float(r7[3]), float(r32[3]), places=3)
    # The same labels on 8 devices: sharding_test.ShardedMainTest.

  def test_bottleneck_with_class_name_concepts(self):
    workdir = tempfile.mkdtemp(dir=self.tmp)
    run_main(*self.args(workdir, target_model=self.bottleneck, concept_set="classes:target",
                        target_layers="layer4,fc", similarity_fn="wpmi", pool_mode="max"))
    self.check_results(os.path.join(workdir, "results"), {"layer4": 32, "fc": 5},
                       ["apple", "boat", "cat", "dog", "egg"])

  def test_hostile_folder_is_skipped_with_reasons_or_an_error(self):
    import shutil  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top
    folder = tempfile.mkdtemp(dir=self.tmp)
    shutil.copytree(self.images, folder, dirs_exist_ok=True)
    with open(os.path.join(folder, "aa_garbage.jpg"), "wb") as f:
      f.write(b"not an image at all")
    with open(os.path.join(self.images, self.image_ids[0]), "rb") as f:
      good = f.read()
    with open(os.path.join(folder, "ab_truncated.png"), "wb") as f:
      f.write(good[:len(good) // 2])
    with open(os.path.join(folder, 'al_"odd",\tname\n.png'), "wb") as f:
      f.write(b"quotes, a comma, a tab and a newline in the name; CSV keeps them")
    os.mkfifo(os.path.join(folder, "ae_fifo.png"))
    os.symlink("/dev/zero", os.path.join(folder, "af_zero.jpg"))  # never opened
    os.symlink(os.path.join(folder, "gone.png"), os.path.join(folder, "ag_dangling.png"))
    os.symlink(os.path.join(folder, "ah_loop.png"), os.path.join(folder, "ah_loop.png"))
    # Odd but valid images are converted, not skipped; a huge one is over the limit.
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(os.path.join(folder, "ac_1x1.png"))
    Image.fromarray(np.full((30, 20, 2), 90, np.uint8)[..., 0], "L").convert("LA").save(
        os.path.join(folder, "ai_la.png"))
    Image.fromarray(np.full((8, 9, 3), 70, np.uint8)).save(os.path.join(folder, "aj.webp"))
    with open(os.path.join(folder.encode(), b"ak_caf\xe9.bmp"), "wb") as f:
      Image.fromarray(np.full((8, 9, 3), 10, np.uint8)).save(f, format="BMP")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (2500, 3000, 3), np.uint8)
                    ).save(os.path.join(folder, "ad_huge.png"))
    # More valid files, kept: a photo stored sideways (EXIF orientation 6), CMYK, 16-bit
    # grayscale, an animated GIF, a TIFF.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.full((20, 40, 3), 120, np.uint8)).save(
        os.path.join(folder, "am_rotated.jpg"), exif=exif.tobytes())
    Image.fromarray(np.full((20, 20, 3), 60, np.uint8)).convert("CMYK").save(
        os.path.join(folder, "an_cmyk.jpg"))
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(
        os.path.join(folder, "ao_16bit.png"))
    frames = [Image.fromarray(np.full((20, 20, 3), v, np.uint8)) for v in (10, 240)]
    frames[0].save(os.path.join(folder, "ap_animated.gif"), save_all=True,
                   append_images=frames[1:])
    Image.fromarray(np.full((20, 20, 3), 30, np.uint8)).save(os.path.join(folder, "aq.tiff"))
    expected = {"aa_garbage.jpg": "cannot decode", "ab_truncated.png": "cannot decode",
                "ad_huge.png": "3000x2500 pixels, more than max_image_pixels",
                "ae_fifo.png": "not a regular file: a FIFO",
                "af_zero.jpg": "not a regular file: a character device",
                "ag_dangling.png": "missing, or a symlink to nothing",
                "ah_loop.png": "a symlink loop",
                'al_"odd",\tname\n.png': "cannot decode"}
    workdir = tempfile.mkdtemp(dir=self.tmp)
    proc = run_main(*self.args(workdir, d_probe=f"folder:{folder}", target_layers="fc",
                               max_image_pixels=5_000_000))
    self.assertNotIn("Traceback", proc.stderr)
    skipped = read_csv(os.path.join(workdir, "results", "skipped_images.csv"))
    self.assertEqual(skipped[0], ["index", "id", "reason"])
    from jaxdissect.data import probe  # pylint: disable=g-import-not-at-top
    ids = [probe.printable(p) for p in probe.list_image_files(folder)]
    self.assertEqual([(int(i), name) for i, name, _ in skipped[1:]],
                     [(ids.index(name), name) for name in expected])
    for _, name, reason in skipped[1:]:
      self.assertTrue(reason.startswith(expected[name]), (name, reason))
    with open(os.path.join(workdir, "results", "config.json"), encoding="utf-8") as f:
      self.assertEqual(json.load(f)["num_images"], NUM_IMAGES + 17)
    rows = read_csv(os.path.join(workdir, "results", "descriptions.csv"))
    self.assertLen(rows, 1 + 5)  # every fc unit labelled
    proc = run_main(*self.args(tempfile.mkdtemp(dir=self.tmp), d_probe=f"folder:{folder}",
                               target_layers="fc", max_image_pixels=5_000_000,
                               on_bad_image="error"), check=False)
    last = assert_one_line_error(self, proc, "d_probe")
    self.assertIn(f"8 probe image(s) cannot be used; the first, 'aa_garbage.jpg' "
                  f"(#{ids.index('aa_garbage.jpg')}): cannot decode (no image format PIL "
                  "reads).", last)

  def test_list_layers(self):
    proc = run_main(*self.args(tempfile.mkdtemp(dir=self.tmp)), "--list_layers")
    lines = proc.stdout.splitlines()
    names = [line.split()[0] for line in lines[1:]]
    self.assertEqual(names[:6], ["conv1", "layer1", "layer2", "layer3", "layer4", "fc"])
    self.assertIn("resnet.encoder.stages.3", names)


if __name__ == "__main__":
  absltest.main()

"""Neuron visualisation: heat-mapped top images and activation maximisation."""
import csv
import os

from absl.testing import absltest
import pytest
import numpy as np
from PIL import Image

from jaxdissect import images as images_lib
from jaxdissect import rundir
from jaxdissect.applications import visualize
from jaxdissect.synthetic import world
from tests import synthetic_run

COLOURS = np.array([world.COLOURS[c] for c in world.COLOURS]) / 255.0


def nearest_colour_share(image: np.ndarray, colour: str) -> float:
  """Share of pixels whose nearest named colour is `colour`."""
  distances = np.sum((image[..., None, :] - COLOURS) ** 2, axis=-1)
  return float(np.mean(distances.argmin(-1) == list(world.COLOURS).index(colour)))


class PiecesTest(absltest.TestCase):

  def test_heat_overlay_and_grid(self):
    image = np.zeros((8, 8, 3))
    heat = np.zeros((2, 2))
    heat[0, 0] = 4.0
    out = images_lib.heat_overlay(image, heat, scale=4.0, alpha=1.0)
    self.assertEqual(out.dtype, np.uint8)
    np.testing.assert_array_equal(out[0, 0], [255, 255, 0])  # full strength: yellow
    np.testing.assert_array_equal(out[7, 7], [0, 0, 0])  # no activation: the image
    tiles = [np.full((4, 5, 3), i, np.uint8) for i in range(5)]
    sheet = images_lib.grid(tiles, columns=2, pad=1)
    self.assertEqual(sheet.shape, (3 * 5 + 1, 2 * 6 + 1, 3))
    self.assertEqual(sheet[1 + 2 * 5, 1, 0], 4)  # tile 4 opens row 3

  def test_gaussian_blur_keeps_constant_and_mass(self):
    import jax.numpy as jnp
    constant = jnp.full((1, 9, 9, 3), 0.3)
    np.testing.assert_allclose(visualize.gaussian_blur(constant, 1.0), constant, atol=1e-6)
    spike = np.zeros((1, 9, 9, 3), np.float32)
    spike[0, 4, 4] = 1.0
    blurred = np.asarray(visualize.gaussian_blur(jnp.asarray(spike), 1.0))
    self.assertAlmostEqual(float(blurred.sum()), 3.0, places=4)
    self.assertLess(blurred[0, 4, 4, 0], 0.5)


@pytest.mark.slow
class RunVisualizeTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.results = synthetic_run.synthetic_run()
    cls.dissection = rundir.load_run(cls.results)

  def test_maps_average_to_the_recorded_activation(self):
    # The heat map is the unit's channel: its mean is the pooled activation that
    # top_images.csv lists for the image.
    run = self.dissection
    tops = visualize.top_image_indices(run, "layer4", [5], 4)[5]
    images = run.probe_set.read_images([i for i, _ in tops], run.target.transform)
    pixels = np.stack([images[i] for i, _ in tops])
    maps = images_lib.unit_maps(run.target, run.layer_infos["layer4"].path, pixels, [5])
    np.testing.assert_allclose(maps.mean(axis=(1, 2))[:, 0], [a for _, a in tops],
                               rtol=1e-4, atol=1e-5)

  def test_maximized_colour_unit_is_its_colour_and_beats_the_probe(self):
    run = self.dissection
    labels = run.layers["planted.colour"].labels
    for colour in ("red", "blue"):
      unit = labels.index(colour)
      record = visualize.visualize_units(
          run, "planted.colour", [unit], self.create_tempdir().full_path, top=4,
          maximize_units=True)[0]
      self.assertGreater(record["maximized_activation"],
                         record["best_probe_activation"])
      image = np.asarray(Image.open(record["maximized_png"]).convert("RGB")) / 255.0
      image = image[-image.shape[1]:]  # the square picture below the title band
      self.assertGreater(nearest_colour_share(image, colour), 0.5, colour)
      self.assertEqual(record["maximized_from"], "noise")

  def test_maximized_resnet_unit_beats_its_best_probe_image(self):
    record = visualize.visualize_units(
        self.dissection, "layer4", [3], self.create_tempdir().full_path, top=4,
        maximize_units=True, options=visualize.MaximizeOptions(steps=128))[0]
    self.assertGreater(record["maximized_activation"], record["best_probe_activation"])
    # Unit 3 is silent on noise: the fallback start from the best probe image is used.
    self.assertEqual(record["maximized_from"], "best probe image")

  def test_png_title_sits_in_a_band_above_the_unchanged_picture(self):
    picture = np.full((40, 150, 3), 90, np.uint8)
    path = os.path.join(self.create_tempdir().full_path, "titled.png")
    images_lib.save_png(path, picture, min_side=40, title="layer4 unit 3 \"dog\"" * 20)
    saved = np.asarray(Image.open(path).convert("RGB"))
    band = saved.shape[0] - 40
    self.assertGreater(band, 8)
    self.assertEqual(saved.shape[1], 150)  # a long title is clipped, not widened
    np.testing.assert_array_equal(saved[band:], picture)
    self.assertGreater((saved[:band] < 100).sum(), 50)  # dark text on white
    untitled = os.path.join(self.create_tempdir().full_path, "plain.png")
    images_lib.save_png(untitled, picture, min_side=40)
    np.testing.assert_array_equal(np.asarray(Image.open(untitled).convert("RGB")), picture)

  def test_cli_writes_grids_and_index(self):
    out = self.create_tempdir().full_path
    synthetic_run.run_module("jaxdissect.applications.visualize", "--results",
                             self.results, "--units", "planted.colour:label=green;fc:0,1",
                             "--top", "6", "--maximize", "--steps", "32", "--out", out)
    with open(os.path.join(out, "visualize.csv"), newline="") as f:
      rows = list(csv.DictReader(f))
    self.assertEqual([(r["layer"], r["label"] if r["layer"] == "planted.colour" else "")
                      for r in rows],
                     [("planted.colour", "green"), ("fc", ""), ("fc", "")])
    for row in rows:
      grid = Image.open(row["top_png"])
      self.assertGreaterEqual(min(grid.size), 128)
      self.assertTrue(os.path.isfile(row["maximized_png"]))
    proc = synthetic_run.run_module("jaxdissect.applications.visualize", "--help")
    self.assertIn("--maximize", proc.stdout)


if __name__ == "__main__":
  absltest.main()

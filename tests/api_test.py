"""The Python API: jaxdissect.dissect with an in-memory flax module and image arrays.

A planted network computes, for concept c(k), unit k = cos(CLIP image, CLIP text c(k)):
its activations are column c(k) of the concept-activation matrix P, so every similarity
whose maximum is attained when a unit equals a column of P (the cosines, rank-reorder)
must recover c(k) through the full pipeline: preprocessing, probe step, capture, text
tower, scoring. (soft-WPMI's label quality needs a trained CLIP; it is checked on
planted P in similarity_test and on the synthetic world.)
"""
import os
import tempfile
from typing import Any

from absl.testing import absltest
from absl.testing import parameterized
import pytest
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from transformers.models.clip.modeling_flax_clip import FlaxCLIPModule

import jaxdissect
from jaxdissect import tiny_models
from jaxdissect.models import clip as clip_lib


class PlantedClipUnits(nn.Module):
  """Unit k of layer "units" = cos(CLIP image embedding, text embedding of concept k)."""
  clip_config: Any
  num_units: int

  @nn.compact
  def __call__(self, pixels):
    clip = FlaxCLIPModule(self.clip_config, name="clip")
    pooled = clip.vision_model(pixel_values=pixels, deterministic=True)[1]
    embedding = clip.visual_projection(pooled)
    embedding = embedding / jnp.linalg.norm(embedding, axis=-1, keepdims=True)
    return nn.Dense(self.num_units, use_bias=False, name="units")(embedding)


@pytest.mark.slow
class ApiTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.clip = clip_lib.load_clip(tiny_models.make_tiny_clip(os.path.join(cls.tmp, "clip"),
                                                             seed=3))
    cls.images = np.stack([im for im in tiny_models.render_images(600, seed=1,
                                                                  min_size=32,
                                                                  max_size=32)])

  def planted_target(self, concepts, planted):
    text = clip_lib.embed_texts(self.clip, [concepts[c] for c in planted])
    module = PlantedClipUnits(self.clip.module.config, len(planted))
    variables = {"params": {"clip": self.clip.params, "units": {"kernel": jnp.asarray(
        text.T)}}}
    return jaxdissect.TargetModel(name="planted", module=module, variables=variables,
                                  transform=self.clip.transform)

  @parameterized.parameters("cos_similarity", "cos_similarity_cubed", "rank_reorder")
  def test_planted_units_recovered_through_the_api(self, similarity_fn):
    concepts = list(tiny_models.DEMO_CONCEPTS)
    planted = [3, 0, 7, 12, 19, 5]
    target = self.planted_target(concepts, planted)
    result = jaxdissect.dissect(target, concepts, self.images, self.clip, "units",
                                similarity_fn=similarity_fn, batch_size=50)
    labels = result.layers["units"].labels
    self.assertEqual(labels, [concepts[c] for c in planted])
    self.assertEqual(result.scores["units"].shape, (len(planted), len(concepts)))
    frame = result.to_dataframe()
    self.assertEqual(list(frame.columns), ["layer", "unit", "description", "similarity"])
    self.assertEqual(list(frame["description"]), labels)

  @parameterized.parameters("soft_wpmi", "wpmi")
  def test_wpmi_family_runs_through_the_api(self, similarity_fn):
    concepts = list(tiny_models.DEMO_CONCEPTS)
    target = self.planted_target(concepts, [3, 0, 7])
    result = jaxdissect.dissect(target, concepts, self.images[:150], self.clip, "units",
                                similarity_fn=similarity_fn, batch_size=50)
    scores = result.scores["units"]
    self.assertEqual(scores.shape, (3, len(concepts)))
    self.assertTrue(np.all(np.isfinite(scores)))
    # Each label has its unit's best score (ties at the top may go to any of the tied).
    for unit, label in enumerate(result.layers["units"].labels):
      self.assertEqual(scores[unit, concepts.index(label)], scores[unit].max())

  def test_tuple_target_and_image_ids(self):
    concepts = list(tiny_models.DEMO_CONCEPTS)
    target = self.planted_target(concepts, [1, 2])
    result = jaxdissect.dissect((target.module, target.variables, target.transform),
                                concepts, self.images[:120], self.clip, ["units"],
                                image_ids=[f"im{i}" for i in range(120)],
                                similarity_fn="cos_similarity", batch_size=16)
    self.assertEqual(result.layers["units"].labels, [concepts[1], concepts[2]])
    top = result.layers["units"].top_image_ids[0]
    self.assertTrue(all(result.image_ids[i].startswith("im") for i in top))

  def test_dissect_is_callable_after_importing_its_module(self):
    """`import jaxdissect.dissect` binds the package attribute to the module, which
    must still dissect when called, as often as asked."""
    import jaxdissect.dissect  # pylint: disable=g-import-not-at-top,redefined-outer-name
    from absl import logging  # pylint: disable=g-import-not-at-top
    concepts = list(tiny_models.DEMO_CONCEPTS)
    target = self.planted_target(concepts, [0, 3])
    level = logging.get_absl_logger().level
    labels = []
    for _ in range(2):
      result = jaxdissect.dissect(target, concepts, self.images[:120], self.clip, "units",
                                  similarity_fn="cos_similarity", batch_size=40)
      labels.append(result.layers["units"].labels)
    self.assertEqual(labels, [[concepts[0], concepts[3]]] * 2)
    # The progress logging is undone after each call (other code's log levels intact).
    self.assertEqual(logging.get_absl_logger().level, level)
    self.assertIs(jaxdissect.dissect.run, jaxdissect.run)


if __name__ == "__main__":
  absltest.main()

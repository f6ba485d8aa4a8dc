"""Property tests (hypothesis): the concept-file reader and the similarity functions on
random, tied and extreme inputs never crash with anything but a UserError, and never
give NaN scores for live units."""
import os
import tempfile

from absl.testing import absltest
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import numpy as np

from jaxdissect import errors
from jaxdissect import labeling
from jaxdissect.data import concepts

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


class ConceptReaderFuzzTest(absltest.TestCase):

  @SETTINGS
  @given(st.binary(max_size=400))
  def test_any_bytes_give_concepts_or_a_user_error(self, data):
    with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as f:
      f.write(data)
    try:
      words = concepts.load_concepts(f.name)
    except errors.UserError as err:
      self.assertEqual(err.field, "concept_set")
      self.assertNotIn("\n", err.one_line())
    else:
      self.assertNotEmpty(words)
      self.assertLen(set(words), len(words))
      for word in words:
        self.assertEqual(word, word.strip())
        self.assertNotIn("\n", word)
    finally:
      os.remove(f.name)

  @SETTINGS
  @given(st.lists(st.text(min_size=0, max_size=12), max_size=30))
  def test_text_lines_round_trip_deduplicated(self, lines):
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False,
                                     encoding="utf-8", newline="") as f:
      f.write("\n".join(lines))
    try:
      words = concepts.load_concepts(f.name)
    except errors.UserError:
      # Only when nothing printable is left.
      kept = [w.strip() for text in lines for w in text.splitlines() if w.strip()]
      self.assertEqual(kept, [], lines)
    else:
      self.assertLen(set(words), len(words))
    finally:
      os.remove(f.name)


# Activations: random, with many ties (few distinct values) and extreme magnitudes.
ELEMENTS = st.one_of(
    st.sampled_from([0.0, 1.0, -1.0, 1e-30, 1e30, -1e30, 3.0]),
    st.floats(-1e6, 1e6, allow_nan=False, width=32))


@st.composite
def inputs(draw):
  num_images = draw(st.integers(100, 140))
  num_neurons = draw(st.integers(1, 5))
  num_concepts = draw(st.integers(1, 6))
  activations = draw(hnp.arrays(np.float32, (num_images, num_neurons), elements=ELEMENTS))
  if draw(st.booleans()):  # a unit with NaN or Inf: flagged invalid, never poisons others
    row = draw(st.integers(0, num_images - 1))
    activations[row, draw(st.integers(0, num_neurons - 1))] = draw(
        st.sampled_from([np.nan, np.inf, -np.inf]))
  # P: cosines in [-1, 1], also tied.
  concept_activation = draw(hnp.arrays(
      np.float32, (num_images, num_concepts),
      elements=st.one_of(st.sampled_from([0.0, 1.0, -1.0, 0.25]),
                         st.floats(-1, 1, allow_nan=False, width=32))))
  return concept_activation, activations


class SimilarityFuzzTest(absltest.TestCase):

  @pytest.mark.slow
  @SETTINGS
  @given(inputs(), st.sampled_from(["soft_wpmi", "wpmi", "rank_reorder", "cos_similarity",
                                    "cos_similarity_cubed"]))
  def test_live_units_never_get_nan_scores(self, data, name):
    concept_activation, activations = data
    scored = labeling.score_layer(name, concept_activation, activations)
    live = ~(scored.dead | scored.invalid)
    self.assertFalse(np.isnan(scored.scores[live]).any(),
                     f"{name}: NaN for live units")
    layer = labeling.label_units(scored.scores, activations, [f"c{i}" for i in range(
        concept_activation.shape[1])], scored.dead, scored.invalid,
                                 tiebreak=scored.tiebreak)
    self.assertLen(layer.labels, activations.shape[1])


if __name__ == "__main__":
  absltest.main()

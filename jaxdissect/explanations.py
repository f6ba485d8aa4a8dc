"""Which explanation of a unit to believe: its linear explanation, its correlation label
and the run's (soft-WPMI) label, each scored by simulation on held-out images.

Per layer, from one streaming pass over the stored activations and image embeddings
(linear.image_moments; P is never formed):
- the probe images are split, seeded, into fit images and held-out ones (a share
  `holdout` of them, the same split for every layer);
- the linear explanation (linear.fit: at most max_concepts concepts, signed weights) and
  the correlation label are chosen on the fit images;
- each is scored by its simulation: the Pearson correlation, on the held-out images,
  between the unit's activations and the explanation's prediction (sum_c w_c P[:, c];
  for a single label, its P column). The run's label was chosen on all images, which
  can only flatter it in this comparison;
- explained: the linear explanation's held-out simulation is significant against the
  permutation null (linear.correlation_p_values), p < 0.05 after Benjamini-Hochberg
  over the layer's units; a unit that is not is marked unexplained;
- the layer's recommendation: the single label (the run's label or the correlation
  label) with the higher mean held-out simulation over the layer's units, and the best
  of all three. Nothing here reads the annotations of the probe images.
Every choice of a concept (the linear explanations, the correlation labels, the
compositional candidates) is among the concepts the probe images show (`visible`,
visibility.py): a word no image ranks highly can still track a unit by sharing
directions with what the images do show, and is then right by every score here and
wrong about the images.
The correlation_label column of unit_trust.csv is the correlation label over all images.
"""
import dataclasses
import time

from absl import logging
import numpy as np

from jaxdissect import compositional as compositional_lib
from jaxdissect import linear

DEFAULT_HOLDOUT = 0.25
SIGNIFICANCE = 0.05
# The names of the three explanations in evaluation.json and the report.
LABEL, CORRELATION, LINEAR = "label", "correlation_label", "linear"


@dataclasses.dataclass
class LayerExplanations:
  """Per unit (K units): linear: its linear explanation (fit images);
  simulation, label_simulation, correlation_simulation: (K,) held-out simulation of the
  linear explanation, the run's label and the fit images' correlation label (NaN where
  undefined); p_value, q_value: (K,) the linear explanation's one-sided p-value and its
  Benjamini-Hochberg adjustment over the layer; explained: (K,) bool;
  correlation_label: (K,) over all images, -1 where undefined; held_out: images held
  out; compositions: compositional.Compositions (each unit's best single concept, AND,
  OR or "X Y" prompt, by correlation) or None where not computed; selection_share:
  (K, k) for each concept of each linear explanation the share of bootstrap resamples
  of the fit images whose explanation of the unit also chooses it (NaN past the last
  concept), or None where not computed; fit_correlation_label: (K,) the correlation
  label on the fit images; simulator: the same explanations with another model's P
  (config.simulator_model), its label_simulation and correlation_simulation scoring
  this run's label and fit_correlation_label there, or None."""
  linear: linear.LinearExplanations
  simulation: np.ndarray
  label_simulation: np.ndarray
  correlation_simulation: np.ndarray
  p_value: np.ndarray
  q_value: np.ndarray
  explained: np.ndarray
  correlation_label: np.ndarray
  held_out: int
  compositions: compositional_lib.Compositions | None = None
  selection_share: np.ndarray | None = None
  fit_correlation_label: np.ndarray | None = None
  simulator: "LayerExplanations | None" = None

  def summary(self) -> dict:
    """Layer means over units with a defined simulation; the recommended single label
    and the best explanation by mean held-out simulation; the share explained."""
    means = {}
    for key, values in ((LABEL, self.label_simulation),
                        (CORRELATION, self.correlation_simulation),
                        (LINEAR, self.simulation)):
      finite = values[~np.isnan(values)]
      means[key] = float(finite.mean()) if finite.size else None
    defined = ~np.isnan(self.p_value)
    out = {f"simulation_{key}": value for key, value in means.items()}
    single = [k for k in (LABEL, CORRELATION) if means[k] is not None]
    out["recommended_label"] = (max(single, key=lambda k: means[k]) if single else None)
    ranked = [k for k in (LABEL, CORRELATION, LINEAR) if means[k] is not None]
    out["best_explanation"] = max(ranked, key=lambda k: means[k]) if ranked else None
    out["explained_units"] = int(np.sum(self.explained))
    out["explained_share"] = (float(np.mean(self.explained[defined]))
                              if defined.any() else None)
    out["held_out_images"] = int(self.held_out)
    if self.compositions is not None:
      scores = self.compositions.score[~np.isnan(self.compositions.score)]
      out["simulation_compositional"] = float(scores.mean()) if scores.size else None
      shares = self.compositions.selection_share
      if shares is not None:
        shares = shares[~np.isnan(shares)]
        out["compositional_selection_share"] = (float(shares.mean()) if shares.size
                                                else None)
    if self.simulator is not None:
      for key, value in self.simulator.summary().items():
        if key.startswith("simulation_") or key in ("recommended_label",
                                                    "best_explanation",
                                                    "explained_share"):
          out[f"simulator_{key}"] = value
    if self.selection_share is not None:
      shares = self.selection_share[~np.isnan(self.selection_share)]
      first = self.selection_share[:, 0][~np.isnan(self.selection_share[:, 0])]
      out["mean_selection_share"] = float(shares.mean()) if shares.size else None
      out["first_concept_selection_share"] = float(first.mean()) if first.size else None
    return out

  def recommended_labels(self, label_ids: np.ndarray) -> np.ndarray:
    """(K,) the concept of each unit under the layer's recommended single label."""
    if self.summary()["recommended_label"] == CORRELATION:
      return self.correlation_label
    return np.asarray(label_ids)


def layer_explanations(activations, image_embeddings, text_embeddings,
                       label_ids: np.ndarray, usable: np.ndarray, *,
                       max_concepts: int = linear.DEFAULT_MAX_CONCEPTS,
                       holdout: float = DEFAULT_HOLDOUT, seed: int = 0,
                       mesh=None, concepts=None, beam: int = 0,
                       embed_texts=None, weights=None,
                       correlation_ids=None, visible=None) -> LayerExplanations:
  """All of the above for one layer.

  activations: (N, K), image_embeddings: (N, D), either may be a memmap;
  text_embeddings: (M, D); label_ids: (K,) the run's label of each unit; usable: (K,)
  False for dead or invalid units (no explanation, NaN scores, not explained).
  concepts, beam, embed_texts: with beam > 0, also each unit's compositional label
  (compositional.compose over the same split; embed_texts for the "X Y" prompts).
  weights: (R, N) bootstrap weights (stability.poisson_weights) or None: with them,
  each resample of the fit images is fitted again for the selection shares (the
  linear explanations' concepts' and the compositional labels').
  correlation_ids: (K,) the single label scored as the correlation label's simulation
  instead of this P's own (a simulator scores CLIP's), or None.
  visible: (M,) bool, the concepts the linear explanations, the correlation labels and
  the compositional candidates may choose (visibility.concept_visibility), or None for
  all.
  """
  num_images = activations.shape[0]
  usable = np.asarray(usable, bool)
  held_out = linear.holdout_mask(num_images, holdout, seed)
  fit_moments, test_moments, all_moments = linear.image_moments(
      image_embeddings, activations, held_out)
  geometry = linear.concept_geometry(text_embeddings, fit_moments.image_cov, visible)
  explanation = linear.fit(fit_moments, text_embeddings, usable, max_concepts, mesh,
                           geometry)
  fit_correlation = (linear.correlation_labels(fit_moments, text_embeddings, usable, mesh,
                                               geometry)
                     if correlation_ids is None else np.asarray(correlation_ids))
  live = usable & (fit_moments.activation_var > 0) & (test_moments.activation_var > 0)

  def held_out_simulation(directions):
    return np.where(live, linear.simulation(directions, test_moments), np.nan)

  simulation = held_out_simulation(explanation.directions)
  label_ids = np.where(usable, np.asarray(label_ids, np.int64), -1)
  p_value = linear.correlation_p_values(simulation, test_moments.count)
  q_value = linear.benjamini_hochberg(p_value)
  selection_share = resampled = None
  if weights is not None:
    resampled = linear.resampled_moments(image_embeddings, activations, ~held_out,
                                         weights)
    selection_share = _selection_share(explanation.concept_ids, resampled,
                                       text_embeddings, usable, max_concepts, mesh,
                                       visible)
  compositions = None
  if beam > 0:
    compositions = compositional_lib.compose(
        activations, image_embeddings, text_embeddings, concepts, usable, held_out,
        beam=beam, embed_texts=embed_texts, mesh=mesh,
        moments=(fit_moments, test_moments, all_moments), geometry=geometry,
        weights=weights, resampled=resampled)
  return LayerExplanations(
      explanation, simulation,
      held_out_simulation(linear.concept_directions(text_embeddings, label_ids)),
      held_out_simulation(linear.concept_directions(text_embeddings, fit_correlation)),
      p_value, q_value, np.nan_to_num(q_value, nan=1.0) < SIGNIFICANCE,
      linear.correlation_labels(
          all_moments, text_embeddings, usable, mesh,
          linear.concept_geometry(text_embeddings, all_moments.image_cov, visible)),
      int(test_moments.count), compositions, selection_share, fit_correlation)


def _selection_share(concept_ids: np.ndarray, resampled, text_embeddings, usable,
                     max_concepts: int, mesh, visible=None) -> np.ndarray:
  """(K, k) share of the resamples' fits (resampled: their fit moments) that choose
  each of concept_ids' concepts for the same unit, among the same `visible` concepts;
  NaN where concept_ids is -1."""
  counts = np.zeros(concept_ids.shape)
  for moments in resampled:
    geometry = linear.concept_geometry(text_embeddings, moments.image_cov, visible)
    chosen = linear.fit(moments, text_embeddings, usable, max_concepts, mesh,
                        geometry).concept_ids
    counts += np.any(concept_ids[:, :, None] == chosen[:, None, :], axis=2)
  return np.where(concept_ids >= 0, counts / max(len(resampled), 1), np.nan)


def run_explanations(name: str, activations, image_embeddings, text_embeddings,
                     label_ids, usable, config, mesh=None, concepts=None,
                     embed_texts=None, weights=None,
                     simulator=None, visible=None) -> LayerExplanations | None:
  """layer_explanations with the run's settings (config.explain_concepts, 0: off;
  config.explain_holdout; config.compose_beam, 0: no compositional labels;
  config.compose_prompts: embed "X Y" prompts with embed_texts; config.trust_seed;
  weights: the run's bootstrap weights for the selection shares, or None;
  simulator: (image embeddings (N, D'), text embeddings (M, D'), its visible concepts
  (M,) bool or None) of another model, or None; visible: (M,) bool, the concepts
  CLIP's probe images show, or None for all), logged; None when off."""
  max_concepts = int(config.get("explain_concepts", 0))
  if max_concepts <= 0:
    return None
  started = time.time()
  out = layer_explanations(activations, image_embeddings, text_embeddings, label_ids,
                           usable, max_concepts=max_concepts,
                           holdout=float(config.get("explain_holdout", DEFAULT_HOLDOUT)),
                           seed=int(config.trust_seed), mesh=mesh, concepts=concepts,
                           beam=int(config.get("compose_beam", 0)) if concepts else 0,
                           embed_texts=(embed_texts if config.get("compose_prompts", False)
                                        else None), weights=weights,
                           visible=visible)
  if simulator is not None:
    out.simulator = layer_explanations(
        activations, simulator[0], simulator[1], label_ids, usable,
        max_concepts=max_concepts,
        holdout=float(config.get("explain_holdout", DEFAULT_HOLDOUT)),
        seed=int(config.trust_seed), mesh=mesh, correlation_ids=out.fit_correlation_label,
        visible=simulator[2])
  summary = out.summary()
  logging.info("Layer %s: linear explanations (%d concepts) in %.1f s; held-out "
               "simulation label %s, correlation label %s, linear %s, compositional "
               "%s; %d/%d units explained.", name, max_concepts, time.time() - started,
               _fmt(summary["simulation_label"]),
               _fmt(summary["simulation_correlation_label"]),
               _fmt(summary["simulation_linear"]),
               _fmt(summary.get("simulation_compositional")), summary["explained_units"],
               len(out.simulation))
  if out.simulator is not None:
    logging.info("Layer %s, simulator %s: held-out simulation label %s, correlation "
                 "label %s, its own linear explanations %s.", name,
                 config.simulator_model, _fmt(summary["simulator_simulation_label"]),
                 _fmt(summary["simulator_simulation_correlation_label"]),
                 _fmt(summary["simulator_simulation_linear"]))
  return out


def _fmt(value) -> str:
  return "-" if value is None else f"{value:.3f}"

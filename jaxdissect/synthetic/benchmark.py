"""Label quality on the synthetic world, in the layout of the paper's Table 3.

For each probe set (in-distribution, shifted backgrounds) and each similarity function,
the final layer (fc, true labels = shape names) and the planted units (true labels =
colour names, "striped") are labelled and scored. Two reference rows:
  - oracle: soft-WPMI with P from the ground-truth annotations (P[i, m] = 1 when concept
    m is in scene i) instead of CLIP: the ceiling the CLIP model limits us to;
  - netdissect: each unit's activation map (CAM for fc units) upsampled to the image,
    thresholded at its top 0.5% quantile, labelled with the concept whose masks it
    overlaps best (IoU), as in Bau et al.
"""
import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect import activations as activations_lib
from jaxdissect import evaluate
from jaxdissect import explanations
from jaxdissect import labeling
from jaxdissect import metrics
from jaxdissect import registry
from jaxdissect import results
from jaxdissect import stability as stability_lib
from jaxdissect import trust
from jaxdissect import visibility
from jaxdissect.data import probe as probe_lib
from jaxdissect.models import clip as clip_lib
from jaxdissect.models import targets as targets_lib
from jaxdissect.synthetic import planted
from jaxdissect.synthetic import train as train_lib
from jaxdissect.synthetic import world

LAYERS = ("fc", "planted.colour", "planted.texture")
METHODS = registry.SIMILARITY_FUNCTIONS
NETDISSECT_QUANTILE = 0.995


@dataclasses.dataclass
class ProbeData:
  name: str
  images: np.ndarray  # (N, 64, 64, 3) uint8
  scenes: list
  masks: list  # per image {concept: (64, 64) bool}


def render_probe(name: str, num_images: int, seed: int = 0) -> ProbeData:
  images, scenes, masks = world.render_probe_set(name, num_images, seed, with_masks=True)
  return ProbeData(name, images, scenes, masks)


def activation_maps(target, images_pixels: np.ndarray, batch_size: int = 100):
  """Spatial maps per layer for NetDissect: {layer: (N, h, w, units)}; fc via CAM."""
  paths = {"layer4": target.layer_aliases["layer4"],
           "planted.colour": target.layer_aliases["planted.colour"],
           "planted.texture": target.layer_aliases["planted.texture"]}
  keep = targets_lib.capture_filter(list(paths.values()))
  dense = target.variables["params"]["target"]["classifier"]["1"]

  @jax.jit
  def maps(variables, pixels):
    _, inter = target.forward(variables, pixels, capture=keep)
    features = targets_lib.get_intermediate(inter, paths["layer4"])
    # Class activation maps: the fc layer applied at every position of layer4.
    cam = jnp.einsum("bhwc,ck->bhwk", features, dense["kernel"]) + dense["bias"]
    return {"fc": cam,
            "planted.colour": targets_lib.get_intermediate(inter, paths["planted.colour"]),
            "planted.texture": targets_lib.get_intermediate(inter, paths["planted.texture"])}

  out = {}
  for start in range(0, len(images_pixels), batch_size):
    part = maps(target.variables, images_pixels[start:start + batch_size])
    for key, value in part.items():
      out.setdefault(key, []).append(np.asarray(value))
  return {k: np.concatenate(v) for k, v in out.items()}


def netdissect_labels(unit_maps: np.ndarray, masks: list, concepts: Sequence[str],
                      image_size: int = world.IMAGE_SIZE) -> tuple[list[str], np.ndarray]:
  """unit_maps: (N, h, w, units). Returns (labels, iou (units, concepts))."""
  n, _, _, units = unit_maps.shape
  up = np.asarray(jax.image.resize(jnp.asarray(unit_maps), (n, image_size, image_size,
                                                             units), "bilinear"))
  concept_masks = np.zeros((len(concepts), n, image_size, image_size), bool)
  index = {c: i for i, c in enumerate(concepts)}
  for i, image_masks in enumerate(masks):
    for word, mask in image_masks.items():
      if word in index:
        concept_masks[index[word], i] = mask
  iou = np.zeros((units, len(concepts)))
  for u in range(units):
    values = up[..., u]
    active = values > np.quantile(values, NETDISSECT_QUANTILE)
    inter = np.einsum("nhw,cnhw->c", active, concept_masks, dtype=np.int64)
    union = active.sum() + concept_masks.sum(axis=(1, 2, 3)) - inter
    iou[u] = inter / np.maximum(union, 1)
  return [concepts[i] for i in iou.argmax(axis=1)], iou


def _layer_from_scores(scores, acts, concepts, tiebreak=None):
  dead = np.zeros(scores.shape[0], bool)
  return labeling.label_units(scores, acts, concepts, dead, dead.copy(), tiebreak=tiebreak)


def _world_models(checkpoint_dir: str | None, layers: Sequence[str]):
  """(clip, target, layer infos, concepts, text embeddings (num_concepts, dim)) of the
  synthetic world's checkpoints (the committed ones when checkpoint_dir is None)."""
  checkpoint_dir = checkpoint_dir or train_lib.CHECKPOINT_DIR
  clip = clip_lib.load_clip(f"{checkpoint_dir}/clip")
  target = planted.make_target(checkpoint_dir)
  concepts = list(world.CONCEPTS)
  return (clip, target, target.resolve_layers(list(layers)), concepts,
          np.asarray(clip_lib.embed_texts(clip, concepts)))


def _probe_pass(clip, target, infos, data: ProbeData):
  batches = probe_lib.ProbeSet([probe_lib.array_source(data.images)]).batches(
      clip.transform, target.transform, 100)
  return activations_lib.run_probe_pass(clip, target, infos, batches, len(data.images),
                                        log_every_s=60)


def run(num_images: int = 2000, probes: Sequence[str] = ("in_dist", "shifted"),
        methods: Sequence[str] = METHODS, netdissect: bool = True,
        oracle: bool = True, checkpoint_dir: str | None = None,
        seed: int = 0) -> list[dict]:
  """Returns one record per (method, probe, layer); `seed` draws another probe set."""
  clip, target, infos, concepts, text = _world_models(checkpoint_dir, LAYERS)
  embed = metrics.make_embedder(concepts, text, lambda t: clip_lib.embed_texts(clip, t))
  truths = {info.name: target.truth_for(info) for info in infos}
  records = []
  for probe_name in probes:
    data = render_probe(probe_name, num_images, seed)
    probe = _probe_pass(clip, target, infos, data)

    def add(method, result):
      for layer, row in metrics.evaluate_result(result, truths, embed).items():
        records.append({"method": method, "probe": probe_name, "layer": layer,
                        **{k: row[k] for k in ("top1", "top5", "clip_cos", "num_units")}})

    for method in methods:
      add(method, labeling.label_probe(probe, text, concepts, method))
    if oracle:
      # P from the annotations: 1 where the scene has the concept.
      p_oracle = world.annotation_matrix(data.scenes, concepts)
      layers = {}
      for name, acts in probe.activations.items():
        scored = labeling.score_layer("soft_wpmi", p_oracle, acts)
        layers[name] = _layer_from_scores(scored.scores, acts, concepts, scored.tiebreak)
      add("soft_wpmi (oracle P)", results.DissectionResult(
          concepts, probe.image_ids, layers))
    if netdissect:
      pixels = np.stack([b for b in _target_pixels(data.images, target)])
      maps = activation_maps(target, pixels)
      layers = {}
      for name in LAYERS:
        _, iou = netdissect_labels(maps[name], data.masks, concepts)
        layers[name] = _layer_from_scores(iou, probe.activations[name], concepts)
      add("netdissect (IoU)", results.DissectionResult(
          concepts, probe.image_ids, layers))
  return records


def mean_over_draws(draws: Sequence[Sequence[dict]]) -> list[dict]:
  """Records of several probe draws (each a `run` result, same rows in the same order)
  -> one record per row: top1 / top5 / clip_cos the means, with per-draw lists."""
  if not draws:
    raise ValueError("mean_over_draws needs at least one draw")
  keys = [[(r["method"], r["probe"], r["layer"]) for r in draw] for draw in draws]
  if any(k != keys[0] for k in keys):
    raise ValueError("draws do not hold the same (method, probe, layer) rows")
  merged = []
  for rows in zip(*draws):
    record = dict(rows[0])
    for metric in ("top1", "top5", "clip_cos"):
      values = [float(r[metric]) for r in rows]
      record[metric] = float(np.mean(values))
      if len(rows) > 1:
        record[f"{metric}_per_draw"] = values
    record["num_draws"] = len(rows)
    merged.append(record)
  return merged


def _target_pixels(images: np.ndarray, target) -> np.ndarray:
  from jaxdissect.data import preprocessing  # pylint: disable=g-import-not-at-top
  return np.stack([preprocessing.apply_transform(im, target.transform) for im in images])


def format_table(records: Sequence[dict]) -> str:
  """Rows: method x probe; columns: fc top-1 / top-5 / CLIP cos, planted top-1."""
  rows = {}
  for r in records:
    rows.setdefault((r["method"], r["probe"]), {})[r["layer"]] = r
  lines = [f"{'method':<22} {'probe':<9} {'fc top1':>8} {'fc top5':>8} {'fc cos':>7} "
           f"{'planted top1':>13} {'planted cos':>12}"]
  for (method, probe_name), layers in rows.items():
    fc = layers["fc"]
    planted_rows = [layers[k] for k in layers if k.startswith("planted.")]
    units = sum(r["num_units"] for r in planted_rows)
    planted_top1 = sum(r["top1"] * r["num_units"] for r in planted_rows) / units
    planted_cos = sum(r["clip_cos"] * r["num_units"] for r in planted_rows) / units
    lines.append(f"{method:<22} {probe_name:<9} {fc['top1']:>8.3f} {fc['top5']:>8.3f} "
                 f"{fc['clip_cos']:>7.3f} {planted_top1:>13.3f} {planted_cos:>12.3f}")
  return "\n".join(lines)


# ------------------------------------------------ label stability against fresh draws
HIDDEN_LAYERS = ("conv1", "layer1", "layer2", "layer3", "layer4")
STABILITY_LAYERS = HIDDEN_LAYERS + LAYERS
NUM_BINS = 5


@dataclasses.dataclass
class StabilityDraw:
  """One probe draw: labels[layer] (units,) concept ids of the run; stability[layer]
  (units,) pairwise agreement; keep_share[layer] (units,) the share of resamples that
  keep the run's label (the naive estimator, for comparison); ground_truth[layer]
  metrics.ground_truth_layer's measures against the world's annotations."""
  labels: dict
  stability: dict
  keep_share: dict
  ground_truth: dict = dataclasses.field(default_factory=dict)


def stability_draw(num_images: int, seed: int, num_resamples: int = 20,
                   checkpoint_dir: str | None = None,
                   layers: Sequence[str] = STABILITY_LAYERS,
                   probe_name: str = "in_dist") -> StabilityDraw:
  """Labels, label stability and explanations of `layers` on the probe set `probe_name`
  drawn with `seed`, as main.py computes them (soft-WPMI, trust_seed 0);
  num_resamples=0 leaves the stability out."""
  clip, target, infos, concepts, text = _world_models(checkpoint_dir, layers)
  data = render_probe(probe_name, num_images, seed)
  probe = _probe_pass(clip, target, infos, data)
  result = labeling.label_probe(probe, text, concepts, "soft_wpmi")
  weights = (stability_lib.poisson_weights(num_images, num_resamples, 0)
             if num_resamples else None)
  out = StabilityDraw({}, {}, {})
  words = list(world.ATTRIBUTE_WORDS)
  annotations = world.annotation_matrix(data.scenes, words)
  # The run's default: the explanations choose among the concepts the probe shows.
  shown = visibility.concept_visibility(probe.image_embeddings, text).visible
  for name, layer in result.layers.items():
    live = ~(layer.dead | layer.invalid)
    explained = explanations.layer_explanations(
        probe.activations[name], probe.image_embeddings, text, layer.alternative_ids[:, 0],
        live, concepts=concepts, beam=6, visible=shown,
        embed_texts=lambda texts: np.asarray(clip_lib.embed_texts(clip, texts)))
    result.trust[name] = trust.UnitTrust(np.full(layer.num_units, np.nan),
                                         np.full(layer.num_units, np.nan),
                                         explanations=explained)
    out.ground_truth[name] = explained.summary()
  # The ground truth exactly as evaluation.json has it (evaluate.add_ground_truth).
  evaluate.add_ground_truth(out.ground_truth, result, probe, (words, annotations))
  for name, layer in result.layers.items():
    if not num_resamples:  # the explanations only
      continue
    top = probe.top_for(name, min(stability_lib.depth("soft_wpmi"), num_images))
    unit = stability_lib.layer_stability(
        "soft_wpmi", probe.image_embeddings, text,
        labeling.top_images_of_zeroed(top, top.k), ~(layer.dead | layer.invalid),
        num_resamples=num_resamples, weights=weights)
    out.labels[name] = layer.alternative_ids[:, 0].copy()
    out.stability[name] = unit.stability
    out.keep_share[name] = unit.shares(layer.alternative_ids[:, :1])[:, 0]
  return out


def calibration(estimates: np.ndarray, outcomes: np.ndarray) -> dict:
  """Bins of `estimates` in fifths ([0, 0.2), ..., [0.8, 1]) against the mean outcome of
  their units: {"ece": sum over bins of (units in bin / units) |mean estimate - mean
  outcome|, "bins": [{"low", "units", "mean_estimate", "mean_outcome"}]}."""
  keep = ~np.isnan(estimates)
  estimates, outcomes = estimates[keep], outcomes[keep]
  index = np.minimum((estimates * NUM_BINS).astype(int), NUM_BINS - 1)
  bins, ece = [], 0.0
  for b in range(NUM_BINS):
    members = index == b
    if not members.any():
      continue
    gap = abs(float(estimates[members].mean()) - float(outcomes[members].mean()))
    ece += members.mean() * gap
    bins.append({"low": b / NUM_BINS, "units": int(members.sum()),
                 "mean_estimate": float(estimates[members].mean()),
                 "mean_outcome": float(outcomes[members].mean())})
  return {"ece": float(ece), "bins": bins}


def stability_report(draws: Sequence[StabilityDraw], stable: float = 0.8,
                     hidden: Sequence[str] = HIDDEN_LAYERS) -> dict:
  """Each draw's stability against the other draws: a unit's outcome is the share of
  the other draws that give it the same label. Pooled over `hidden` (calibration of the
  pairwise stability and of the naive keep share, units >= `stable` per draw and how
  often they keep their label) and per layer."""
  if len(draws) < 2:
    raise ValueError("stability_report needs at least 2 probe draws")
  layers = list(draws[0].labels)
  rows = {name: {"stability": [], "keep_share": [], "kept": [], "draw": []}
          for name in layers}
  for d, draw in enumerate(draws):
    for name in layers:
      others = [o.labels[name] for i, o in enumerate(draws) if i != d]
      rows[name]["kept"].append(np.mean([o == draw.labels[name] for o in others], axis=0))
      rows[name]["stability"].append(draw.stability[name])
      rows[name]["keep_share"].append(draw.keep_share[name])
      rows[name]["draw"].append(np.full(len(draw.labels[name]), d))
  rows = {name: {k: np.concatenate(v) for k, v in r.items()} for name, r in rows.items()}

  def summary(r):
    high = r["stability"] >= stable
    per_draw = [int(np.sum(high & (r["draw"] == d))) for d in range(len(draws))]
    return {"units_per_draw": int(len(r["kept"]) // len(draws)),
            "mean_stability": float(np.nanmean(r["stability"])),
            "mean_kept": float(np.mean(r["kept"])),
            "stable_units_per_draw": per_draw,
            "stable_kept": float(np.mean(r["kept"][high])) if high.any() else None,
            "ece": calibration(r["stability"], r["kept"])["ece"]}

  pooled = {k: np.concatenate([rows[n][k] for n in hidden if n in rows])
            for k in ("stability", "keep_share", "kept", "draw")}
  return {"num_draws": len(draws), "stable_threshold": stable,
          "hidden": {**summary(pooled),
                     "calibration": calibration(pooled["stability"], pooled["kept"]),
                     "naive_keep_share": {
                         "calibration": calibration(pooled["keep_share"], pooled["kept"]),
                         "stable_units_per_draw": [
                             int(np.sum((pooled["keep_share"] >= stable) &
                                        (pooled["draw"] == d))) for d in range(len(draws))],
                         "stable_kept": float(np.mean(pooled["kept"][
                             pooled["keep_share"] >= stable]))}},
          "layers": {name: summary(r) for name, r in rows.items()}}


def format_stability(report: dict) -> str:
  hidden = report["hidden"]
  lines = [f"{'layer':<16} {'units':>5} {'stability':>9} {'kept':>6} {'>=0.8/draw':>10} "
           f"{'their kept':>10} {'ECE':>6}"]
  for name, row in [("hidden (pooled)", hidden)] + list(report["layers"].items()):
    kept = "-" if row["stable_kept"] is None else f"{row['stable_kept']:.3f}"
    lines.append(f"{name:<16} {row['units_per_draw']:>5} {row['mean_stability']:>9.3f} "
                 f"{row['mean_kept']:>6.3f} {np.mean(row['stable_units_per_draw']):>10.1f} "
                 f"{kept:>10} {row['ece']:>6.3f}")
  lines.append("hidden bins (stability -> kept): " + " ".join(
      f"[{b['mean_estimate']:.2f}->{b['mean_outcome']:.2f} n{b['units']}]"
      for b in hidden["calibration"]["bins"]))
  naive = hidden["naive_keep_share"]
  lines.append(f"naive keep share: ECE {naive['calibration']['ece']:.3f}, "
               f">=0.8 per draw {np.mean(naive['stable_units_per_draw']):.1f}, their kept "
               f"{naive['stable_kept']:.3f}")
  return "\n".join(lines)


GROUND_TRUTH_KEYS = ("gt_distractor_share", "gt_label_corr", "gt_oracle_corr",
                     "gt_explained_share", "gt_label_auprc",
                     "gt_correlation_distractor_share", "gt_correlation_explained_share",
                     "simulation_label", "simulation_correlation_label",
                     "simulation_linear", "simulation_compositional", "explained_share",
                     "gt_recommended_explained_share", "gt_recommended_distractor_share",
                     "gt_explained_distractor_share", "gt_strong_unexplained_share")


def ground_truth_report(draws: Sequence[StabilityDraw]) -> dict:
  """{layer: {key: mean over draws, key + "_per_draw": [...]}} of GROUND_TRUTH_KEYS."""
  out = {}
  for name in draws[0].ground_truth:
    row = {}
    for key in GROUND_TRUTH_KEYS:
      values = [d.ground_truth[name][key] for d in draws]
      row[key] = (None if any(v is None for v in values) else float(np.mean(values)))
      row[f"{key}_per_draw"] = values
    row["recommended_label_per_draw"] = [d.ground_truth[name]["recommended_label"]
                                         for d in draws]
    out[name] = row
  return out


def format_ground_truth(report: dict) -> str:
  """Two tables: the labels' ground truth, and the explanations' (held-out simulations,
  the linear explanation against the oracle and the label, the recommended label's
  ground truth, the explained verdicts)."""
  titles = ("distractors", "label corr", "oracle corr", "explained", "label AUPRC",
            "corr-label distractors", "corr-label explained")
  widths = [max(11, len(t)) for t in titles]
  lines = [f"{'layer':<16} " + " ".join(f"{t:>{w}}" for t, w in zip(titles, widths))]
  for name, row in report.items():
    lines.append(f"{name:<16} " + " ".join(
        f"{'-' if row[k] is None else format(row[k], '.3f'):>{w}}"
        for k, w in zip(GROUND_TRUTH_KEYS, widths)))
  columns = (("sim label", lambda r: r["simulation_label"]),
             ("sim corr-label", lambda r: r["simulation_correlation_label"]),
             ("sim linear", lambda r: r["simulation_linear"]),
             ("sim compositional", lambda r: r["simulation_compositional"]),
             ("linear/oracle", lambda r: _ratio(r["simulation_linear"], r["gt_oracle_corr"])),
             ("linear/label", lambda r: _ratio(r["simulation_linear"], r["gt_label_corr"])),
             ("rec explained", lambda r: r["gt_recommended_explained_share"]),
             ("rec distractors", lambda r: r["gt_recommended_distractor_share"]),
             ("explained units", lambda r: r["explained_share"]),
             ("distractors|expl", lambda r: r["gt_explained_distractor_share"]),
             ("unexpl|oracle>=.3", lambda r: r["gt_strong_unexplained_share"]))
  lines += ["", f"{'layer':<16} " + " ".join(f"{t:>{max(9, len(t))}}" for t, _ in columns)
            + "  recommended (per draw)"]
  for name, row in report.items():
    cells = []
    for title, get in columns:
      value = get(row)
      cells.append(f"{'-' if value is None else format(value, '.3f'):>{max(9, len(title))}}")
    recommended = ",".join("corr" if r == explanations.CORRELATION else "label"
                           for r in row["recommended_label_per_draw"])
    lines.append(f"{name:<16} " + " ".join(cells) + f"  {recommended}")
  return "\n".join(lines)


def _ratio(a, b):
  return None if a is None or not b else a / b

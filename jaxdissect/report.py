"""The static HTML report: index.html and a page per layer, plus PNG strips of each
unit's top images with its activation map overlaid.

Each layer page has one card per unit (label, score, AUC, p-value, stability, its
correlation label, its linear explanation and its held-out simulation, "unexplained"
where that is not significant, its top-5 concepts with their scores, the top-image
strip), a bar chart of its most common labels and, where explanations were computed,
which explanation simulates the layer's units best; the cards sort by unit, score, AUC,
stability or simulation (buttons, or #sort=score in the URL).
Every string that comes from outside (concepts, layer names, image ids) is
HTML-escaped, attributes included; the pages load nothing from the network.
"""
import collections
import contextlib
import html
import logging as std_logging
import math
import os
import re
from typing import Mapping

from absl import logging
import numpy as np

from jaxdissect import results as results_lib

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
table{border-collapse:collapse}td,th{padding:.25em .6em;border-bottom:1px solid #ddd;
text-align:left;vertical-align:top}th{background:#f4f4f4}
.cards{display:flex;flex-wrap:wrap;gap:.8em}
.card{border:1px solid #ccc;border-radius:6px;padding:.6em;width:330px;background:#fff}
.card h3{margin:.1em 0 .3em;font-size:105%}.card.flagged{background:#fff4f4}
.card.unexplained{background:#f6f6f6;color:#666}.note{font-size:85%;color:#a33}
.stats{font-size:90%;color:#333}.alt{color:#555;font-size:88%;margin:.3em 0}
.strip{width:100%;image-rendering:pixelated;margin-top:.3em}
.ids{font-family:monospace;font-size:78%;color:#555;overflow-wrap:anywhere}
.bars{margin:1em 0}.bar{display:flex;align-items:center;gap:.5em;font-size:90%}
.bar span.fill{display:inline-block;height:.9em;background:#4a7fd0}
.bar span.name{width:14em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
button{margin-right:.4em}
"""
# Sorting the cards: no external resources. #sort=KEY in the URL applies on load.
_SORT_SCRIPT = """
(function(){
 var box=document.querySelector('.cards');
 function sortBy(key){
  if(!box)return;
  var cards=Array.prototype.slice.call(box.querySelectorAll('.card'));
  var desc=key!=='unit';
  cards.sort(function(a,b){
   var x=parseFloat(a.dataset[key]),y=parseFloat(b.dataset[key]);
   if(isNaN(x))x=-Infinity;if(isNaN(y))y=-Infinity;
   if(x===y)return parseFloat(a.dataset.unit)-parseFloat(b.dataset.unit);
   return desc?(y-x):(x-y);});
  cards.forEach(function(c){box.appendChild(c);});
  document.body.dataset.sortedBy=key;}
 document.querySelectorAll('button[data-sort]').forEach(function(b){
  b.addEventListener('click',function(){sortBy(b.dataset.sort);});});
 var m=/sort=(unit|score|auc|stability|simulation)/.exec(location.hash);if(m)sortBy(m[1]);
 document.body.dataset.ready='1';
})();
"""
NUM_BARS = 15
MAX_WARNINGS = 50


@contextlib.contextmanager
def collect_warnings():
  """Yields a list that fills with the warnings absl logs meanwhile (message text,
  each once), so that the report can say what went wrong during the run."""
  messages = []

  class _Collector(std_logging.Handler):

    def emit(self, record):
      message = record.getMessage()
      if message not in messages:
        messages.append(message)

  handler = _Collector(std_logging.WARNING)
  logger = logging.get_absl_logger()
  logger.addHandler(handler)
  try:
    yield messages
  finally:
    logger.removeHandler(handler)


def layer_filename(index: int, name: str) -> str:
  safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60]
  return f"layer-{index}-{safe}.html"


def strip_filename(layer_index: int, unit: int) -> str:
  return f"images/layer-{layer_index}/unit-{unit}.png"


def _page(title: str, body: str) -> str:
  esc = html.escape
  return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}"
          f"</title><style>{_STYLE}</style></head><body>{body}"
          f"<script>{_SORT_SCRIPT}</script></body></html>\n")


def _number(value: float, digits: int = 4) -> str:
  return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _bars(counts: collections.Counter) -> str:
  esc = html.escape
  top = counts.most_common(NUM_BARS)
  if not top:
    return ""
  most = top[0][1]
  rows = "".join(
      f"<div class='bar'><span class='name' title='{esc(label, quote=True)}'>"
      f"{esc(label)}</span><span class='fill' style='width:{200 * n / most:.0f}px'>"
      f"</span><span>{n}</span></div>" for label, n in top)
  return f"<div class='bars'><h2>Most common labels</h2>{rows}</div>"


def write_report(report_dir: str, result: "results_lib.DissectionResult",
                 strips: Mapping[tuple[str, int], np.ndarray] | None = None,
                 evaluation: Mapping[str, Mapping[str, object]] | None = None,
                 warnings: list[str] | None = None) -> None:
  """Writes index.html, a page per layer and, for units in `strips` ((layer, unit) ->
  (H, W, 3) uint8 image strip), images/layer-I/unit-N.png; `evaluation` (the contents
  of evaluation.json) is shown as a table on the index, and `warnings` (the run's
  logged warnings) as a list above it."""
  from jaxdissect import images as images_lib  # pylint: disable=g-import-not-at-top
  os.makedirs(report_dir, exist_ok=True)
  esc = html.escape
  strips = strips or {}
  index_rows = []
  for i, (name, layer) in enumerate(result.layers.items()):
    filename = layer_filename(i, name)
    counts = collections.Counter(layer.labels)
    unit_trust = result.trust.get(name)
    common = ", ".join(f"{esc(label)} ({n})" for label, n in counts.most_common(5))
    mean_auc = (float(np.nanmean(unit_trust.auc))
                if unit_trust is not None and np.isfinite(unit_trust.auc).any() else None)
    index_rows.append(
        f"<tr><td><a href='{esc(filename, quote=True)}'>{esc(name)}</a></td>"
        f"<td>{layer.num_units}</td><td>{len(counts)}</td><td>{int(layer.dead.sum())}</td>"
        f"<td>{_number(mean_auc, 3)}</td><td>{common}</td></tr>")
    stabilities = (unit_trust.stability_or_nan() if unit_trust is not None
                   else np.full(layer.num_units, np.nan))
    explained = None if unit_trust is None else unit_trust.explanations
    summary = None if explained is None else explained.summary()
    cards = []
    for unit in range(layer.num_units):
      label = layer.labels[unit]
      score = float(layer.label_scores[unit])
      auc = float(unit_trust.auc[unit]) if unit_trust is not None else float("nan")
      p_value = float(unit_trust.p_value[unit]) if unit_trust is not None else float("nan")
      stability = float(stabilities[unit])
      alternatives = ", ".join(
          f"{esc(result.concepts[c])} ({s:.3f})"
          for c, s in zip(layer.alternative_ids[unit][:5],
                          layer.alternative_scores[unit][:5]))
      image_ids = " ".join(esc(result.image_ids[j]) for j in layer.top_image_ids[unit][:5])
      flagged = " flagged" if layer.dead[unit] or layer.invalid[unit] else ""
      simulation, explanation = float("nan"), ""
      if explained is not None and not flagged:
        simulation = float(explained.simulation[unit])
        if not explained.explained[unit]:
          flagged = " unexplained"
        explanation = _explanation_lines(explained, unit, result.concepts, simulation)
      picture = ""
      if (name, unit) in strips:
        path = strip_filename(i, unit)
        images_lib.save_png(os.path.join(report_dir, path), strips[(name, unit)],
                           min_side=1)
        picture = (f"<img class='strip' src='{esc(path, quote=True)}' "
                   f"alt='top images of unit {unit}'>")
      cards.append(
          f"<div class='card{flagged}' data-unit='{unit}' data-score='{score!r}' "
          f"data-auc='{auc!r}' data-stability='{stability!r}' "
          f"data-simulation='{simulation!r}'><h3>{unit}: {esc(label)}</h3>"
          f"<div class='stats'>score {score:.4f} &middot; AUC {_number(auc, 3)} "
          f"&middot; p {_number(p_value, 3)} &middot; stability "
          f"{_number(stability, 2)}</div>{explanation}"
          f"<div class='alt'>top 5: {alternatives or '-'}</div>{picture}"
          f"<div class='ids'>{image_ids}</div></div>")
    body = (f"<p><a href='index.html'>all layers</a></p><h1>Layer {esc(name)}</h1>"
            f"<p>{layer.num_units} units, {len(counts)} distinct labels, "
            f"{int(layer.dead.sum())} dead. Top images: highest activation first, with "
            "the unit's activation map in yellow where the layer has spatial positions "
            "(a dense layer such as fc has none).</p>" + _bars(counts) +
            "<p>Sort: <button data-sort='unit'>unit</button>"
            "<button data-sort='score'>score</button>"
            "<button data-sort='auc'>AUC</button>"
            "<button data-sort='stability'>stability</button>"
            "<button data-sort='simulation'>simulation</button></p>"
            "<p>Stability: the share of pairs of bootstrap resamples of the probe images "
            "that give the unit the same label; on the synthetic world, labels at 0.8 or "
            "more were reproduced by a fresh probe draw about 80% of the time.</p>"
            + _recommendation(summary) +
            "<div class='cards'>" + "".join(cards) + "</div>")
    _write(os.path.join(report_dir, filename), _page(f"jaxdissect: {name}", body))
  body = ("<h1>jaxdissect report</h1>"
          f"<p>{len(result.concepts)} concepts, {len(result.image_ids)} probe images."
          + _visibility_line(result.visibility) + "</p>"
          "<table><thead><tr><th>layer</th><th>units</th><th>distinct labels</th>"
          "<th>dead</th><th>mean AUC</th><th>most common labels</th></tr></thead><tbody>"
          + "".join(index_rows) + "</tbody></table>" + _warning_list(warnings)
          + _evaluation_table(evaluation))
  _write(os.path.join(report_dir, "index.html"), _page("jaxdissect report", body))


_EXPLANATION_NAMES = {"label": "the label (descriptions.csv)",
                      "correlation_label": "the correlation label",
                      "linear": "the linear explanation"}


def _explanation_lines(explained, unit: int, concepts, simulation: float) -> str:
  """A card's correlation label, linear explanation and simulation."""
  esc = html.escape
  ids, weights = explained.linear.concept_ids[unit], explained.linear.weights[unit]
  shares = (explained.selection_share[unit] if explained.selection_share is not None
            else np.full(len(ids), np.nan))
  terms = " ".join(
      f"{w:+.3g}&nbsp;{esc(concepts[c])}" + ("" if np.isnan(share) else
                                            f"&nbsp;<small>[{share:.0%}]</small>")
      for c, w, share in zip(ids, weights, shares) if c >= 0)
  correlation = explained.correlation_label[unit]
  note = ("" if explained.explained[unit] else
          "<div class='note'>unexplained: no explanation predicts this unit on held-out "
          "images better than chance (Benjamini-Hochberg, 5%)</div>")
  composed = explained.compositions
  composed_share = (np.nan if composed is None or composed.selection_share is None
                    else float(composed.selection_share[unit]))
  composition = ("" if composed is None or not composed.expression[unit] else
                 f"<div class='alt'>compositional: {esc(composed.expression[unit])} "
                 f"({_number(float(composed.score[unit]), 3)})"
                 + ("" if np.isnan(composed_share) else
                    f"&nbsp;<small>[{composed_share:.0%}]</small>") + "</div>")
  return (f"<div class='alt'>correlation label: "
          f"{esc(concepts[correlation]) if correlation >= 0 else '-'}</div>{composition}"
          f"<div class='alt'>linear: {terms or '-'} &middot; simulation "
          f"{_number(simulation, 3)}</div>{note}")


def _visibility_line(visibility) -> str:
  if visibility is None or visibility.min_images == 0:
    return ""
  if visibility.fallback:
    return (f" No concept is among the top {visibility.rank} of "
            f"{visibility.min_images} or more images: the explanations choose among "
            "all concepts.")
  return (f" The explanations and correlation labels choose among the "
          f"{int(visibility.visible.sum())} concepts that {visibility.min_images} or more "
          f"images rank in their top {visibility.rank} (concept_visibility.csv); the "
          "labels among all.")


def _recommendation(summary) -> str:
  """The layer's held-out simulations and which explanation to read."""
  if not summary or summary.get("best_explanation") is None:
    return ""
  means = ", ".join(f"{_EXPLANATION_NAMES[k]} {_number(summary[f'simulation_{k}'], 3)}"
                    for k in ("label", "correlation_label", "linear"))
  return (f"<p class='recommendation'>Mean simulation on {summary['held_out_images']} "
          f"held-out images (the correlation of a unit's activations with what its "
          f"explanation predicts from CLIP): {means}. Best single label for this layer: "
          f"<b>{_EXPLANATION_NAMES[summary['recommended_label']]}</b>; best explanation: "
          f"<b>{_EXPLANATION_NAMES[summary['best_explanation']]}</b> "
          f"(explanations.csv; [n%] after a concept: the share of bootstrap resamples "
          f"whose linear explanation also chooses it, after a compositional label the "
          f"share that chooses the same expression). {summary['explained_units']} of "
          "the units are explained (significant on the held-out images); the others are "
          "greyed out.</p>")


def _warning_list(warnings) -> str:
  if not warnings:
    return ""
  items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings[:MAX_WARNINGS])
  more = (f"<p>and {len(warnings) - MAX_WARNINGS} more (see the run's log).</p>"
          if len(warnings) > MAX_WARNINGS else "")
  return (f"<h2>Warnings during the run ({len(warnings)})</h2>"
          f"<ul class='warnings'>{items}</ul>{more}")


def _evaluation_table(evaluation) -> str:
  """evaluation.json as an HTML table: a row per layer, a column per metric."""
  if not evaluation:
    return ""
  keys = list(dict.fromkeys(k for row in evaluation.values() for k in row))
  cell = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
  head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
  rows = "".join(
      f"<tr><td>{html.escape(name)}</td>" + "".join(
          f"<td>{html.escape(cell(row.get(k)))}</td>" for k in keys) + "</tr>"
      for name, row in evaluation.items())
  return (f"<h2>Label evaluation (evaluation.json)</h2><table class='evaluation'><thead>"
          f"<tr><th>layer</th>{head}</tr></thead><tbody>{rows}</tbody></table>")


def _write(path: str, text: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def unit_strips(target, probe_set, layer_paths: Mapping[str, str],
                result: "results_lib.DissectionResult", global_index: np.ndarray,
                num_images: int = 5, batch_size: int = 64,
                tile_size: int = 96) -> dict[tuple[str, int], np.ndarray]:
  """(layer, unit) -> (tile, num_images * tile, 3) uint8: the unit's top images with
  its activation map blended in, one scale per unit.

  layer_paths: layer name -> module path. global_index: (num_kept_images,) the probe
  index of each result row (skipped images removed).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from jaxdissect import images as images_lib  # pylint: disable=g-import-not-at-top
  from jaxdissect import activations as activations_lib  # pylint: disable=g-import-not-at-top
  if num_images <= 0:
    return {}
  transform = target.transform
  wanted = sorted({int(global_index[j]) for layer in result.layers.values()
                   for row in layer.top_image_ids for j in row[:num_images]})
  images = probe_set.read_images(wanted, transform)
  strips = {}
  logger = activations_lib.RateLogger(sum(l.num_units for l in result.layers.values()),
                                      "Report image strips", unit="units")
  for name, layer in result.layers.items():
    output_fn = images_lib.layer_output_fn(target, layer_paths[name])
    rows = sorted({int(global_index[j]) for row in layer.top_image_ids
                   for j in row[:num_images]} & set(images))
    maps = {}
    for start in range(0, len(rows), batch_size):
      part = rows[start:start + batch_size]
      pixels = np.stack([images[i] for i in part])
      if len(part) < batch_size:  # one compiled shape
        pixels = np.concatenate([pixels, np.zeros((batch_size - len(part),
                                                   *pixels.shape[1:]), pixels.dtype)])
      out = images_lib.unit_maps(target, layer_paths[name], pixels,
                                list(range(layer.num_units)), output_fn)
      for k, i in enumerate(part):
        maps[i] = None if out is None else out[k]
    for unit in range(layer.num_units):
      indices = [int(global_index[j]) for j in layer.top_image_ids[unit][:num_images]]
      indices = [i for i in indices if i in images]
      if not indices:
        continue
      unit_maps = [None if maps[i] is None else maps[i][..., unit] for i in indices]
      scale = max((float(np.max(m)) for m in unit_maps if m is not None), default=1.0)
      tiles = []
      for i, heat in zip(indices, unit_maps):
        tile = images_lib.heat_overlay(
            images_lib.to_display(images[i], transform.mean, transform.std), heat, scale)
        tiles.append(np.asarray(Image.fromarray(tile).resize((tile_size, tile_size),
                                                             Image.BILINEAR)))
      strips[(name, unit)] = images_lib.grid(tiles, columns=num_images, pad=2)
    logger.update(layer.num_units)
  return strips

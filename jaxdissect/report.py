"""A static HTML report: index.html and a page per layer. Every outside string escaped."""
import collections
import html
import os
import re

from jaxdissect import results as results_lib

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{padding:.25em .6em;border-bottom:1px solid #ddd;
text-align:left;vertical-align:top}th{cursor:pointer;background:#f4f4f4}
.alt{color:#555;font-size:90%}.ids{font-family:monospace;font-size:85%;color:#444}
.flag{color:#a00}
"""
# Sorting by a column: static, no external resources.
_SORT_SCRIPT = """
document.querySelectorAll('th[data-col]').forEach(function(th){
 th.addEventListener('click',function(){
  var table=th.closest('table'),body=table.tBodies[0],col=+th.dataset.col,
      num=th.dataset.num==='1',asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
  var rows=Array.prototype.slice.call(body.rows);
  rows.sort(function(a,b){var x=a.cells[col].dataset.v,y=b.cells[col].dataset.v;
   if(num){x=+x;y=+y;}return (x<y?-1:x>y?1:0)*(asc?1:-1);});
  rows.forEach(function(r){body.appendChild(r);});});});
"""


def layer_filename(index: int, name: str) -> str:
  safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60]
  return f"layer-{index}-{safe}.html"


def _page(title: str, body: str) -> str:
  return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
          f"</title><style>{_STYLE}</style></head><body>{body}"
          f"<script>{_SORT_SCRIPT}</script></body></html>\n")


def write_report(report_dir: str, result: "results_lib.DissectionResult") -> None:
  os.makedirs(report_dir, exist_ok=True)
  esc = html.escape
  index_rows = []
  for i, (name, layer) in enumerate(result.layers.items()):
    filename = layer_filename(i, name)
    counts = collections.Counter(layer.labels)
    common = ", ".join(f"{esc(label)} ({n})" for label, n in counts.most_common(5))
    index_rows.append(
        f"<tr><td><a href='{esc(filename)}'>{esc(name)}</a></td><td>{layer.num_units}</td>"
        f"<td>{len(counts)}</td><td>{int(layer.dead.sum())}</td><td>{common}</td></tr>")
    unit_rows = []
    for unit in range(layer.num_units):
      alternatives = ", ".join(
          f"{esc(result.concepts[c])} ({s:.3f})"
          for c, s in zip(layer.alternative_ids[unit][1:], layer.alternative_scores[unit][1:]))
      image_ids = " ".join(esc(result.image_ids[j]) for j in layer.top_image_ids[unit][:5])
      label = layer.labels[unit]
      flag = " class='flag'" if layer.dead[unit] or layer.invalid[unit] else ""
      score = float(layer.label_scores[unit])
      unit_rows.append(
          f"<tr class='unit'><td data-v='{unit}'>{unit}</td>"
          f"<td data-v='{esc(label, quote=True)}'{flag}>{esc(label)}</td>"
          f"<td data-v='{score!r}'>{score:.4f}</td><td class='alt'>{alternatives}</td>"
          f"<td class='ids'>{image_ids}</td></tr>")
    body = (f"<p><a href='index.html'>all layers</a></p><h1>Layer {esc(name)}</h1>"
            f"<p>{layer.num_units} units, {len(counts)} distinct labels. Click a column "
            "header to sort.</p><table><thead><tr><th data-col='0' data-num='1'>unit</th>"
            "<th data-col='1'>label</th><th data-col='2' data-num='1'>score</th>"
            "<th>alternatives</th><th>top images</th></tr></thead><tbody>"
            + "".join(unit_rows) + "</tbody></table>")
    with open(os.path.join(report_dir, filename), "w", encoding="utf-8") as f:
      f.write(_page(f"jaxdissect: {name}", body))
  body = ("<h1>jaxdissect report</h1>"
          f"<p>{len(result.concepts)} concepts, {len(result.image_ids)} probe images.</p>"
          "<table><thead><tr><th>layer</th><th>units</th><th>distinct labels</th>"
          "<th>dead</th><th>most common labels</th></tr></thead><tbody>"
          + "".join(index_rows) + "</tbody></table>")
  with open(os.path.join(report_dir, "index.html"), "w", encoding="utf-8") as f:
    f.write(_page("jaxdissect report", body))

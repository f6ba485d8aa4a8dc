"""Runs the rows of the paper's Tables 1-3 and prints our numbers beside the paper's.

    python benchmarks/reproduce_tables.py --table 3 --out table3.json \
        [--setup auto|paper|synthetic] [--num_images 2000] [--max_rows N]

The paper's numbers are data (configs/paper_tables.json). Each row is run through
main.py's run (jaxdissect.dissect.run) with configs/paper.py's config for it:
  - setup "paper": the paper's models, probe sets and concept sets (configs/paper.py
    says which environment variables point at them);
  - setup "synthetic", where those are absent (as on a machine without internet): the
    row's method (similarity function, probe-set role, concept-set role) on the
    synthetic world, whose fc units' truth is known. Its numbers measure the method on
    that world, not the paper's setting, and the record says so.
"auto" takes "paper" for a row whose data and weights are all present, else
"synthetic". The JSON holds one record per row:
  {"row", "table", "paper": {...}, "ours": {...}, "setup": "paper" | "synthetic",
   "why"?: why not the paper's setup, "source": where the paper numbers come from}.
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "configs"))

import paper as paper_configs  # noqa: E402  (configs/paper.py)
from jaxdissect import resources  # noqa: E402

# The synthetic stand-in for each probe set: the in-distribution scenes for ImageNet
# val, scenes on backgrounds never seen in training for Broden and CIFAR-100 (other
# image distributions than the target's training set), both for ImageNet + Broden.
SYNTHETIC_PROBES = {
    "imagenet_val": "synthetic:in_dist:{n}",
    "broden": "synthetic:shifted:{n}",
    "cifar100_train": "synthetic:shifted:{n}:1",
    "imagenet_broden": "synthetic:in_dist:{n},synthetic:shifted:{n}",
}
SYNTHETIC_NOTE = ("the row's similarity function on the synthetic world: target = the "
                  "shape-classifier ResNet's fc (8 shapes), CLIP = the world's CLIP, probe "
                  "set = {probe}, concept set = {concepts}")


def _tfds_prepared(name: str) -> bool:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return tfds.builder(name, data_dir=os.environ.get("TFDS_DATA_DIR")).is_prepared()
  except Exception:  # pylint: disable=broad-except
    return False


def _hub_cached(repo: str) -> bool:
  if os.path.isdir(repo):
    return True
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    return isinstance(huggingface_hub.try_to_load_from_cache(repo, "config.json"), str)
  except Exception:  # pylint: disable=broad-except
    return False


def paper_setup_missing(row: dict) -> list[str]:
  """What the paper's setup of this row lacks here (empty: it can run)."""
  from jaxdissect.data import probe as probe_lib  # pylint: disable=g-import-not-at-top
  missing = []

  def leaves(name: str) -> list[str]:
    spec = probe_lib.NAMED_PROBE_SETS.get(name, name)
    return [leaf for part in spec.split("+")
            for leaf in (leaves(part) if part in probe_lib.NAMED_PROBE_SETS else [part])]

  for part in leaves(row["d_probe"]):
    if part.startswith("tfds:") and not _tfds_prepared(part.split(":")[1]):
      missing.append(f"TFDS {part.split(':')[1]} (TFDS_DATA_DIR)")
    if part.startswith("broden:") and not os.path.isdir(os.environ.get("BRODEN_DIR", "")):
      missing.append("Broden (BRODEN_DIR)")
  for concepts in row["concept_sets"].values():
    spec = paper_configs.concept_spec(concepts)
    if not resources.available_locally(spec):
      missing.append(f"{spec} (CLIP_DISSECT_DATA or {resources.RESOURCES[spec].cache_path})")
  target = paper_configs.target_for(row)
  if resources.is_resource(target):
    if not resources.available_locally(target):
      missing.append(f"the paper's torchvision {row['target']} (JAXDISSECT_RESNET50 or "
                     f"{resources.RESOURCES[target].cache_path})")
  elif not os.path.isdir(target):
    missing.append(f"the paper's torchvision {row['target']} (JAXDISSECT_RESNET18_PLACES)")
  for model in ("openai/clip-vit-base-patch16", "sentence-transformers/all-mpnet-base-v2"):
    if not _hub_cached(model):
      missing.append(model)
  return sorted(set(missing))


def row_config(row: dict, which: str, setup: str, num_images: int):
  if setup == "paper":
    return paper_configs.get_config(f"{row['table']}:{row['row']}:{which}")
  from jaxdissect.synthetic import world  # pylint: disable=g-import-not-at-top
  import synthetic as synthetic_config  # pylint: disable=g-import-not-at-top  (configs/)
  config = synthetic_config.get_config()
  config.target_layers = "fc"
  config.d_probe = SYNTHETIC_PROBES[row["d_probe"]].format(n=num_images)
  role = row["concept_sets"][which]
  config.concept_set = "classes:target" if role == "imagenet_classes" else world.CONCEPTS_FILE
  config.similarity_fn = row["similarity_fn"]
  config.report_top_images = 0
  config.trust_permutations = 0
  return config


def run_row(row: dict, setup: str, workdir: str, num_images: int) -> dict:
  """Our metrics for the row: clip_cos and sentence_cos with the "cos" concept set,
  top1 / top5 / mean_rank with the "accuracy" one."""
  from jaxdissect import dissect as dissect_lib  # pylint: disable=g-import-not-at-top
  ours = {}
  for which in row["concept_sets"]:
    config = row_config(row, which, setup, num_images)
    config.result_dir = os.path.join(workdir, "results",
                                     f"t{row['table']}-{row['row'].replace('/', '-')}-{which}")
    config.overwrite = True
    result_dir = dissect_lib.run(config, workdir)
    with open(os.path.join(result_dir, "evaluation.json"), encoding="utf-8") as f:
      evaluation = json.load(f)[row["layer"]]
    if which == "cos":
      ours["clip_cos"] = evaluation.get("clip_cos")
      ours["sentence_cos"] = evaluation.get("sentence_cos")
      ours["sentence_model"] = config.sentence_model
    if which == "accuracy" or row["concept_sets"].get("accuracy") == row["concept_sets"][which]:
      for key in ("top1", "top5", "mean_rank", "median_rank", "label_auc"):
        ours[key] = evaluation.get(key)
    ours[f"concepts_{which}"] = config.concept_set
    ours["d_probe"] = config.d_probe
  return ours


# The authors' published hidden-layer labels and the setup that produced them.
PUBLISHED = {"resnet50_imagenet": {
    "csv": "clip_dissect:resnet50_imagenet_broden", "d_probe": "imagenet_broden",
    "concept_set": "clip_dissect:20k", "layers": "conv1,layer1,layer2,layer3,layer4"}}


def compare_published(workdir: str) -> dict:
  """Our ResNet-50 labels (configs/resnet50.py on the authors' probe set) unit by unit
  against the labels the authors published; a record saying what is missing without
  the paper's setup (no synthetic stand-in: the units are the real network's)."""
  setup = PUBLISHED["resnet50_imagenet"]
  row = {"d_probe": setup["d_probe"], "target": "resnet50_imagenet",
         "concept_sets": {"cos": "20k"}}
  missing = paper_setup_missing(row)
  if not resources.available_locally(setup["csv"]):
    missing.append(f"{setup['csv']} (CLIP_DISSECT_DATA)")
  if missing:
    return {"csv": setup["csv"], "skipped": "missing: " + ", ".join(sorted(missing))}
  from jaxdissect import compare  # pylint: disable=g-import-not-at-top
  from jaxdissect import dissect as dissect_lib  # pylint: disable=g-import-not-at-top
  import resnet50 as resnet50_config  # pylint: disable=g-import-not-at-top  (configs/)
  config = resnet50_config.get_config()
  config.d_probe, config.concept_set = setup["d_probe"], setup["concept_set"]
  config.target_layers = setup["layers"]
  config.result_dir = os.path.join(workdir, "results", "published-resnet50")
  config.overwrite = True
  result_dir = dissect_lib.run(config, workdir)
  return compare.compare_run(result_dir, setup["csv"])


def _fmt(value, digits=4) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def format_records(records: list[dict]) -> str:
  lines = [f"{'table':>5} {'row':<36} {'setup':<9} {'clip_cos':>17} {'mpnet|sentence':>17} "
           f"{'top1':>15} {'mean_rank':>15}",
           f"{'':>5} {'':<36} {'':<9} {'paper / ours':>17} {'paper / ours':>17} "
           f"{'paper / ours':>15} {'paper / ours':>15}"]
  for r in records:
    paper, ours = r["paper"] or {}, r["ours"]
    lines.append(
        f"{r['table']:>5} {r['row']:<36} {r['setup']:<9} "
        f"{_fmt(paper.get('clip_cos')):>8}/{_fmt(ours.get('clip_cos')):<8} "
        f"{_fmt(paper.get('mpnet_cos')):>8}/{_fmt(ours.get('sentence_cos')):<8} "
        f"{_fmt(paper.get('top1'), 3):>7}/{_fmt(ours.get('top1'), 3):<7} "
        f"{_fmt(paper.get('mean_rank'), 2):>7}/{_fmt(ours.get('mean_rank'), 2):<7}")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--table", default="3", choices=["1", "2", "3", "all"])
  parser.add_argument("--out", required=True, help="JSON file to write")
  parser.add_argument("--setup", default="auto", choices=["auto", "paper", "synthetic"])
  parser.add_argument("--num_images", type=int, default=2000,
                      help="synthetic setup: scenes per probe set")
  parser.add_argument("--max_rows", type=int, default=0, help="run only the first N rows")
  parser.add_argument("--workdir", default=None, help="default: a temporary directory")
  parser.add_argument("--compare_published", action="store_true",
                      help="also compare ResNet-50's conv1-layer4 labels unit by unit with "
                      "the authors' published ones (needs the paper's setup)")
  args = parser.parse_args(argv)
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  rows = [r for r in paper_configs.load_rows()
          if args.table == "all" or r["table"] == int(args.table)]
  if args.max_rows:
    rows = rows[:args.max_rows]
  workdir = args.workdir or tempfile.mkdtemp(prefix="reproduce-tables-")
  records = []
  for row in rows:
    missing = paper_setup_missing(row) if args.setup != "synthetic" else ["--setup synthetic"]
    setup = "paper" if not missing else "synthetic"
    if args.setup == "paper" and missing:
      print(f"error: setup: row {row['table']}:{row['row']} lacks {', '.join(missing)}. "
            "Fix: provide them (configs/paper.py) or use --setup auto.", file=sys.stderr)
      return 2
    started = time.time()
    ours = run_row(row, setup, workdir, args.num_images)
    record = {"row": row["row"], "table": row["table"], "paper": row["paper"],
              "ours": ours, "setup": setup, "source": row["source"],
              "seconds": round(time.time() - started, 1)}
    if setup == "synthetic":
      record["why"] = "missing: " + ", ".join(missing)
      record["synthetic_setup"] = SYNTHETIC_NOTE.format(
          probe=ours["d_probe"], concepts=", ".join(
              f"{k}: {v}" for k, v in ours.items() if k.startswith("concepts_")))
    records.append(record)
    print(format_records([record]).splitlines()[-1], flush=True)
  print(format_records(records))
  output = {"table": args.table, "records": records}
  if args.compare_published:
    output["published_labels"] = compare_published(workdir)
    print("Against the authors' published labels:",
          json.dumps(output["published_labels"].get("layers")
                     or output["published_labels"]["skipped"]))
  temporary = f"{args.out}.tmp-{os.getpid()}"
  with open(temporary, "w", encoding="utf-8") as f:
    json.dump(output, f, indent=1)
  os.replace(temporary, args.out)
  print(f"Written {args.out} ({len(records)} rows, setups: "
        f"{sorted({r['setup'] for r in records})}).")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""One row of the paper's Tables 1-3 (final-layer label quality), by name:

    python main.py --config configs/paper.py:3:soft_wpmi/imagenet_val:cos
    python main.py --config configs/paper.py:3:soft_wpmi/imagenet_val:accuracy
    python main.py --config configs/paper.py:1:soft_wpmi/imagenet_val/3k:cos
    python main.py --config configs/paper.py:2:soft_wpmi/broden/broden_labels:cos

TABLE:ROW:CONCEPTS, with ROW as listed in configs/paper_tables.json and CONCEPTS the
row's concept set for the cosine metrics ("cos") or for top-1/top-5 ("accuracy").
Each row names its probe set (imagenet_val, cifar100_train, broden, imagenet_broden:
data/probe.py NAMED_PROBE_SETS; Broden from BRODEN_DIR) and concept set. The resources
are those of configs/resnet50.py, pinned and fetched once (jaxdissect/resources.py):
the authors' word lists and class names (clip_dissect:20k, :10k, :3k, :broden_labels,
:imagenet_labels; offline, CLIP_DISSECT_DATA names a directory holding them) and
torchvision's ResNet-50 (torchvision:resnet50; offline, JAXDISSECT_RESNET50). The
Places365 ResNet-18 has no pinned download: JAXDISSECT_RESNET18_PLACES names its
converted directory (python -m jaxdissect.models.torchvision). Evaluation uses
all-mpnet-base-v2, as the authors' notebooks do. benchmarks/reproduce_tables.py runs
every row.
"""
import json
import os

from jaxdissect import config as base_config

TABLES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_tables.json")
CONCEPT_RESOURCES = {"20k": "clip_dissect:20k", "10k": "clip_dissect:10k",
                     "3k": "clip_dissect:3k", "broden_labels": "clip_dissect:broden_labels",
                     "imagenet_classes": "clip_dissect:imagenet_labels"}
CLASS_NAMES = {"resnet50_imagenet": "clip_dissect:imagenet_labels",
               "resnet18_places": "clip_dissect:places365_labels"}


def load_rows() -> list[dict]:
  with open(TABLES_FILE, encoding="utf-8") as f:
    return json.load(f)["rows"]


def find_row(table: int, name: str) -> dict:
  for row in load_rows():
    if row["table"] == table and row["row"] == name:
      return row
  names = [f"{r['table']}:{r['row']}" for r in load_rows()]
  raise ValueError(f"no row {table}:{name} in {TABLES_FILE}; rows: {', '.join(names)}")


def target_for(row: dict) -> str:
  if row["target"] == "resnet50_imagenet":
    return "torchvision:resnet50"
  return os.environ.get("JAXDISSECT_RESNET18_PLACES", "<set JAXDISSECT_RESNET18_PLACES>")


def concept_spec(name: str) -> str:
  return CONCEPT_RESOURCES[name]


def get_config(spec: str = "3:soft_wpmi/imagenet_val:cos"):
  table, name, which = spec.split(":")
  row = find_row(int(table), name)
  config = base_config.get_base_config()
  config.clip_model = "openai/clip-vit-base-patch16"
  config.target_model = target_for(row)
  config.target_layers = row["layer"]
  config.d_probe = row["d_probe"]
  config.concept_set = concept_spec(row["concept_sets"][which])
  config.class_names = CLASS_NAMES.get(row["target"], "")
  config.similarity_fn = row["similarity_fn"]
  config.sentence_model = "sentence-transformers/all-mpnet-base-v2"
  config.batch_size = 256
  config.report_top_images = 0
  return config

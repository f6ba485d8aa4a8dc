"""One row of the paper's Tables 1-3 (final-layer label quality), by name:

    python main.py --config configs/paper.py:3:soft_wpmi/imagenet_val:cos
    python main.py --config configs/paper.py:3:soft_wpmi/imagenet_val:accuracy
    python main.py --config configs/paper.py:1:soft_wpmi/imagenet_val/3k:cos
    python main.py --config configs/paper.py:2:soft_wpmi/broden/broden_labels:cos

TABLE:ROW:CONCEPTS, with ROW as listed in configs/paper_tables.json and CONCEPTS the
row's concept set for the cosine metrics ("cos") or for top-1/top-5 ("accuracy").
Each row names its probe set (imagenet_val, cifar100_train, broden, imagenet_broden:
data/probe.py NAMED_PROBE_SETS; Broden from BRODEN_DIR) and concept set, read from
CLIP_DISSECT_DATA: the directory of the official repository's data/ files (20k.txt,
10k.txt, 3k.txt, broden_labels_clean.txt; github.com/Trustworthy-ML-Lab/CLIP-dissect).
The targets are the paper's torchvision models, converted once with
`python -m jaxdissect.models.torchvision`: JAXDISSECT_RESNET50 (resnet50 IMAGENET1K_V1)
and JAXDISSECT_RESNET18_PLACES (the Places365 ResNet-18); without the first,
microsoft/resnet-50 stands in. benchmarks/reproduce_tables.py runs every row.
"""
import json
import os

from jaxdissect import config as base_config

TABLES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_tables.json")
CONCEPT_FILES = {"20k": "20k.txt", "10k": "10k.txt", "3k": "3k.txt",
                 "broden_labels": "broden_labels_clean.txt"}


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
    return os.environ.get("JAXDISSECT_RESNET50", "microsoft/resnet-50")
  return os.environ.get("JAXDISSECT_RESNET18_PLACES", "<set JAXDISSECT_RESNET18_PLACES>")


def concept_spec(name: str) -> str:
  if name == "imagenet_classes":
    return "classes:target"
  data = os.environ.get("CLIP_DISSECT_DATA", "<set CLIP_DISSECT_DATA>")
  return os.path.join(data, CONCEPT_FILES[name])


def get_config(spec: str = "3:soft_wpmi/imagenet_val:cos"):
  table, name, which = spec.split(":")
  row = find_row(int(table), name)
  config = base_config.get_base_config()
  config.clip_model = "openai/clip-vit-base-patch16"
  config.target_model = target_for(row)
  config.target_layers = row["layer"]
  config.d_probe = row["d_probe"]
  config.concept_set = concept_spec(row["concept_sets"][which])
  config.similarity_fn = row["similarity_fn"]
  config.sentence_model = "sentence-transformers/all-mpnet-base-v2"
  config.batch_size = 256
  config.report_top_images = 0
  return config

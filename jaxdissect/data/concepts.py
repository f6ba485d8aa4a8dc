"""Concept sets: text files, wordfreq's most frequent words, or the target's class names."""
import os
import re
from typing import Iterable, Mapping

from absl import logging

from jaxdissect import errors
from jaxdissect import resources
from jaxdissect.data import broden

_HAS_LETTER = re.compile(r"[^\W\d_]", re.UNICODE)


def clean_concepts(raw: Iterable[str], source: str) -> list[str]:
  """Strips, drops blank lines and duplicates (first occurrence kept), logs the counts."""
  concepts, seen = [], set()
  blank = duplicates = 0
  for line in raw:
    concept = line.strip()
    if not concept:
      blank += 1
      continue
    if concept in seen:
      duplicates += 1
      continue
    seen.add(concept)
    concepts.append(concept)
  if blank or duplicates:
    logging.info("Concept set %s: dropped %d blank line(s) and %d duplicate(s); %d concepts "
                 "remain.", source, blank, duplicates, len(concepts))
  return concepts


def read_concept_file(path: str, field: str = "concept_set") -> list[str]:
  """One concept a line, UTF-8."""
  if not os.path.isfile(path):
    raise errors.UserError(field, f"concept file {path!r} does not exist.",
                           "give a UTF-8 text file with one concept a line, "
                           "wordfreq:en:20000, or classes:target.")
  try:
    with open(path, encoding="utf-8-sig") as f:
      lines = f.read().splitlines()
  except UnicodeDecodeError as err:
    raise errors.UserError(field, f"concept file {path!r} is not UTF-8 (byte "
                           f"{err.start}).", "re-save it as UTF-8.") from None
  concepts = clean_concepts(lines, path)
  if not concepts:
    raise errors.UserError(field, f"concept file {path!r} holds no concept (empty or only "
                           "blank lines).", "put one concept on each line.")
  return concepts


def wordfreq_concepts(lang: str, count: int, field: str = "concept_set") -> list[str]:
  """The `count` most frequent words of `lang` that contain a letter."""
  try:
    import wordfreq  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise errors.UserError(field, "the wordfreq package is not installed.",
                           "pip install wordfreq, or use a concept file.") from None
  if lang not in wordfreq.available_languages():
    raise errors.UserError(field, f"wordfreq has no language {lang!r}.",
                           f"use one of {sorted(wordfreq.available_languages())}.")
  words, asked = [], count
  # Tokens without letters are dropped, so ask for more until we have enough.
  while len(words) < count:
    candidates = wordfreq.top_n_list(lang, asked)
    words = clean_concepts((w for w in candidates if _HAS_LETTER.search(w)),
                           f"wordfreq:{lang}")
    if len(candidates) < asked:
      break
    asked = int(asked * 1.2) + 10
  return words[:count]


_BRODEN_SUFFIX = re.compile(r"-[a-z]$")


def broden_label_concepts(path: str, field: str = "concept_set") -> list[str]:
  """Broden's label names (label.csv of broden1_224 / broden1_227, or its directory):
  the category suffix (sky-s, black-c) dropped, underscores as spaces, duplicates and the
  "-" placeholder removed."""
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    path = os.path.join(path, "label.csv")
  if not os.path.isfile(path):
    raise errors.UserError(field, f"Broden label file {path!r} does not exist.",
                           "give broden_labels:PATH of broden1_224 (or its label.csv).")
  names = [_BRODEN_SUFFIX.sub("", name).replace("_", " ")
           for name in broden.csv_column(path, "name", field, "label.csv")]
  concepts = clean_concepts((n for n in names if _HAS_LETTER.search(n)), path)
  if not concepts:
    raise errors.UserError(field, f"{path} names no label.", "give Broden's label.csv.")
  return concepts


def load_concepts(spec: str, id2label: Mapping[int, str] | None = None,
                  field: str = "concept_set") -> list[str]:
  """`wordfreq:LANG:N`, `classes:target`, `broden_labels:PATH`, a pinned resource
  (`clip_dissect:20k`, `:10k`, `:3k`, `:broden_labels`, `:imagenet_labels`: the authors'
  lists, fetched once), or a path to a text file (one concept a line)."""
  spec = str(spec).strip()
  if resources.is_resource(spec):
    return read_concept_file(resources.local_path(spec, field), field)
  if spec.startswith("broden_labels:"):
    return broden_label_concepts(spec[len("broden_labels:"):], field)
  if spec.startswith("wordfreq:"):
    parts = spec.split(":")
    if len(parts) != 3 or not parts[2].isdigit() or int(parts[2]) < 1:
      raise errors.UserError(field, f"{spec!r} is not wordfreq:LANG:N.",
                             "e.g. wordfreq:en:20000.")
    return wordfreq_concepts(parts[1], int(parts[2]), field)
  if spec == "classes:target":
    if not id2label:
      raise errors.UserError(field, "classes:target needs a target with class names "
                             "(id2label) in its config.",
                             "use a classifier target or a concept file.")
    return clean_concepts((id2label[i] for i in sorted(id2label)), "classes:target")
  return read_concept_file(os.path.expanduser(spec), field)

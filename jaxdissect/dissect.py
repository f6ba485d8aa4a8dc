"""CLIP-Dissect in one place: `dissect(...)` from Python, `run(config, workdir)` for main.py.

Both: layers resolved before any image is read, one probe pass (CLIP image embeddings,
pooled activations), text embeddings, similarity per layer, labels; `run` adds the store,
evaluation and files. The module is callable: `jaxdissect.dissect(...)` always works."""
import contextlib
import os
import sys
import time
import types

from absl import logging
import jax
import numpy as np

from jaxdissect import activations
from jaxdissect import config as config_lib
from jaxdissect import errors
from jaxdissect import evaluate
from jaxdissect import labeling
from jaxdissect import probe_pass
from jaxdissect import registry
from jaxdissect import report
from jaxdissect import resources
from jaxdissect import results
from jaxdissect import sharding
from jaxdissect import similarity
from jaxdissect import streaming
from jaxdissect import trust
from jaxdissect.data import concepts as concepts_lib
from jaxdissect.data import probe as probe_lib
from jaxdissect.models import clip as clip_lib
from jaxdissect.models import targets as targets_lib


def dissect(target, concepts, images, clip, layers, *, image_ids=None,
            similarity_fn: str = registry.DEFAULT_SIMILARITY, pool_mode: str = "avg",
            token_pool: str = "cls", batch_size: int = 64, text_batch_size: int = 256,
            num_alternatives: int = 5, num_top_images: int = 10, mesh=None,
            keep_scores: bool = True, progress: bool = True) -> results.DissectionResult:
  """Labels every unit of `layers` of `target` with a concept, from a notebook.

  target: a TargetModel, HF id / directory, `torchvision:resnet50`, python:pkg.mod:factory
    or (flax module, variables[, ImageTransform]); concepts: a list of strings or a
    concept-set spec; images: (N, H, W, 3) uint8, a probe spec ("folder:PATH") or a
    ProbeSet; clip: a ClipModel or an HF id / directory; layers: "layer4,fc" or a list.
  progress: log the steps and the probe pass's rate (absl INFO) during the call.
  Returns .layers[name].labels, .scores[name] (units, concepts), .to_dataframe()."""
  with _progress_logs(progress):
    target = targets_lib.as_target(target)
    layer_infos = target.resolve_layers(config_lib.split_layers(layers))
    concepts = (concepts_lib.load_concepts(concepts, target.id2label) if isinstance(
        concepts, str) else concepts_lib.clean_concepts(concepts, "concepts argument"))
    if not concepts:
      raise errors.UserError("concepts", "no concept given.", "pass a non-empty list.")
    if similarity_fn not in similarity.SIMILARITY_FUNCTIONS:
      raise errors.UserError("similarity_fn", f"unknown {similarity_fn!r}.",
                             f"use one of {sorted(similarity.SIMILARITY_FUNCTIONS)}.")
    probe_set = probe_lib.as_probe_set(images, image_ids)
    labeling.check_enough_images(probe_set.num_images, similarity_fn, "images")
    clip = clip if isinstance(clip, clip_lib.ClipModel) else clip_lib.load_clip(clip)
    mesh = mesh or sharding.make_mesh()
    sharding.check_batch_size(batch_size, mesh)
    batches = probe_set.batches(clip.transform, target.transform, batch_size)
    probe = activations.run_probe_pass(clip, target, layer_infos, batches,
                                       probe_set.num_images, pool_mode, token_pool, mesh)
    text_embeddings = clip_lib.embed_texts(clip, concepts, text_batch_size)
    return labeling.label_probe(probe, text_embeddings, concepts, similarity_fn,
                                num_alternatives, num_top_images, keep_scores=keep_scores)


@contextlib.contextmanager
def _progress_logs(show: bool):
  absl_logger = logging.get_absl_logger()
  before = absl_logger.level  # 0 (inherit) as a rule: restored exactly, not as -1
  if show and logging.get_verbosity() < logging.INFO:
    logging.set_verbosity(logging.INFO)
  try:
    yield
  finally:
    absl_logger.setLevel(before)


def run(config, workdir: str = "./workdir") -> str:
  """Dissects as `config` says and writes result_dir; returns its path."""
  with report.collect_warnings() as warnings:  # listed in the report
    return _run(config, workdir, warnings)


def _run(config, workdir: str, warnings: list[str]) -> str:
  config_lib.validate(config)
  config = config_lib.resolve_paths(config, workdir)
  results.check_output_dirs(config)
  mesh = sharding.mesh_from_config(config)
  sharding.check_batch_size(config.batch_size, mesh)
  resources.fetch_required(config, ("target_model", "concept_set"))
  # What needs no model is checked before the models load (tens of seconds).
  probe_set = probe_lib.probe_set_from_config(config)
  labeling.check_enough_images(probe_set.num_images, config.similarity_fn)
  by_target = config.concept_set.strip() == "classes:target"
  concepts = None if by_target else concepts_lib.load_concepts(config.concept_set)
  target = targets_lib.load_target(config.target_model, class_names=config.class_names)
  layer_infos = target.resolve_layers(config_lib.split_layers(config.target_layers))
  clip = clip_lib.load_clip(config.clip_model)
  logging.info("Layers: %s", ", ".join(f"{i.name} ({i.path}, {i.num_units} units)"
                                       for i in layer_infos))
  if by_target:
    concepts = concepts_lib.load_concepts(config.concept_set, target.id2label)
  logging.info("Concept set %s: %d concepts.", config.concept_set, len(concepts))
  clip_hash = targets_lib.params_fingerprint(clip.params)
  pass_mesh = mesh  # the simulator's pass runs on the same devices
  probe, probe_key, mesh = probe_pass.load_or_run(config, probe_set, clip, target,
                                                  layer_infos, mesh, len(concepts), clip_hash)
  skipped = probe_pass.check_skipped(config, probe, probe_set)
  text_embeddings, text_key = probe_pass.load_or_embed_texts(config, clip, concepts, clip_hash)
  logging.info("Scoring %d layer(s) with %s.", len(layer_infos), config.similarity_fn)
  truths = evaluate.layer_truths(target, layer_infos)
  # Each image's softmax normaliser over the concepts, computed once for the layers'
  # streamed similarity and their label stability.
  row_normalisers = streaming.RowNormalisers(probe.image_embeddings, text_embeddings,
                                             reused=trust.computes_stability(config))
  # Wall seconds of the stages after the probe pass, in config.json: what a run of these
  # settings costs, compiles included (benchmarks/similarity_bench.py --default-run).
  stage_seconds = {}
  started = time.time()
  result = labeling.label_with_config(config, probe, text_embeddings, concepts,
                                      list(truths), mesh, row_normalisers)
  stage_seconds["similarity"] = round(time.time() - started, 3)
  started = time.time()
  result.visibility = trust.run_visibility(config, probe.image_embeddings, text_embeddings,
                                           mesh)
  result.trust = trust.layer_trust(
      config, probe, result, text_embeddings, mesh,
      lambda texts: np.asarray(clip_lib.embed_texts(clip, texts, config.text_batch_size)),
      probe_pass.simulator_embeddings(config, probe_set, target, pass_mesh, concepts),
      result.visibility, row_normalisers, stage_seconds)
  stage_seconds["unit_trust"] = round(time.time() - started, 3)
  logging.info("Softmax normalisers over the %d concepts: %d of %d images, each computed "
               "once for the streamed similarity and the label stability of %d layer(s).",
               len(concepts), row_normalisers.rows_computed, len(probe.image_embeddings),
               len(layer_infos))
  evaluation = evaluate.evaluate_run(config, result, truths, concepts, text_embeddings, clip,
                                     probe=probe, annotations=probe_set.annotations())
  config_json = {"config": config.to_dict(), "workdir": os.path.abspath(workdir),
                 "layers": {i.name: {"path": i.path, "units": i.num_units} for i in layer_infos},
                 "num_images": probe_set.num_images, "num_concepts": len(concepts),
                 "probe_key": probe_key, "text_key": text_key, "stage_seconds": stage_seconds,
                 **results.environment()}
  if jax.process_index() != 0:
    return config.result_dir
  kept = np.setdiff1d(np.arange(probe_set.num_images), np.asarray(probe.skipped, int))
  strips = report.unit_strips(target, probe_set, {i.name: i.path for i in layer_infos},
                              result, kept, config.report_top_images
                              ) if config.report_top_images > 0 else {}

  def write_contents(directory):
    results.write_files(directory, result, config_json,
                        lambda d, r: report.write_report(d, r, strips, evaluation, warnings),
                        skipped)
    evaluate.write_json(evaluate.evaluation_path(directory), evaluation)

  logging.info("Writing results to %s.", config.result_dir)
  path = results.write_result_dir(config.result_dir, config.overwrite, write_contents)
  logging.info("Results written to %s.", path)
  return path


class _CallableModule(types.ModuleType):
  """`import jaxdissect.dissect` binds `jaxdissect.dissect` to this module: it dissects."""

  def __call__(self, *args, **kwargs):
    return dissect(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

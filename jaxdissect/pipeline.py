"""Orchestration: the Python API `dissect(...)` and the CLI's `run(config, workdir)`.

Both go through the same steps: resolve layers (before any image is read), one probe
pass (CLIP image embeddings + pooled activations), concept text embeddings, similarity
per layer, labels. `run` adds the activation store and writes the result files.
"""
import functools
import os
import platform
import time
from typing import Any, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from jaxdissect import activations as activations_lib
from jaxdissect import config as config_lib
from jaxdissect import errors
from jaxdissect import evaluate
from jaxdissect import labeling
from jaxdissect import report
from jaxdissect import resources
from jaxdissect import results as results_lib
from jaxdissect import sharding
from jaxdissect import similarity
from jaxdissect import store
from jaxdissect import streaming
from jaxdissect import topk
from jaxdissect import trust
from jaxdissect.data import concepts as concepts_lib
from jaxdissect.data import probe as probe_lib
from jaxdissect.models import clip as clip_lib
from jaxdissect.models import sentence as sentence_lib
from jaxdissect.models import targets as targets_lib


def _split_layers(layers: str | Sequence[str]) -> list[str]:
  if isinstance(layers, str):
    layers = layers.split(",")
  return [name.strip() for name in layers if name and name.strip()]


def _as_target(target) -> targets_lib.TargetModel:
  if isinstance(target, str):
    return targets_lib.load_target(target)
  name = type(target[0]).__name__ if isinstance(target, tuple) and target else "target"
  made = targets_lib.as_target_model(target, name)
  if made is not None:
    return made
  raise errors.UserError("target", f"cannot use a {type(target).__name__} as a target.",
                         "pass a TargetModel, an HF id / directory, or (module, variables"
                         "[, transform]).")


def _as_probe_set(images, image_ids=None) -> probe_lib.ProbeSet:
  if isinstance(images, probe_lib.ProbeSet):
    return images
  if isinstance(images, probe_lib.ProbeSource):
    return probe_lib.ProbeSet([images])
  if isinstance(images, str):
    return probe_lib.ProbeSet(probe_lib.parse_probe_spec(images, "images"))
  return probe_lib.ProbeSet([probe_lib.array_source(images, image_ids)])


DEFAULT_CONCEPT_MATRIX_MAX_GB = 2.0


def check_enough_images(num_images: int, similarity_fn: str, field: str = "d_probe"):
  needed = similarity.min_images(similarity_fn)
  if num_images < needed:
    raise errors.UserError(
        field, f"{num_images} probe images, but {similarity_fn} needs at least {needed} "
        "(its top-k).", f"give at least {needed} probe images.")


def _concept_matrix_gb(num_images: int, num_concepts: int) -> float:
  """Size of P (float32) in GB."""
  return num_images * num_concepts * 4 / 2**30


def _matrix_out_of_memory(err: Exception, doing: str, num_images: int, num_concepts: int,
                          similarity_fn: str) -> Exception:
  """The one-line error for an in-memory P that did not fit; other errors unchanged."""
  if isinstance(err, jax.errors.JaxRuntimeError) and not any(
      s in str(err) for s in ("RESOURCE_EXHAUSTED", "Out of memory")):
    return err
  gb = _concept_matrix_gb(num_images, num_concepts)
  how = (f"so that {similarity_fn} streams P" if similarity_fn in
         streaming.STREAMING_FUNCTIONS else "and use a similarity_fn that streams P "
         f"({', '.join(streaming.STREAMING_FUNCTIONS)})")
  return errors.UserError(
      "concept_matrix_max_gb", f"{doing} held in memory ({num_images} images x "
      f"{num_concepts} concepts, {gb:.2f} GB) ran out of memory.",
      f"set --config.concept_matrix_max_gb below {gb:.2f} {how}.")


def streams(similarity_fn: str, num_images: int, num_concepts: int,
            concept_matrix_max_gb: float) -> bool:
  """Whether label_probe streams P from the embeddings instead of holding it."""
  return (similarity_fn in streaming.STREAMING_FUNCTIONS
          and _concept_matrix_gb(num_images, num_concepts) > concept_matrix_max_gb)


def label_probe(probe: activations_lib.ProbeActivations, text_embeddings: np.ndarray,
                concepts: Sequence[str], similarity_fn: str = "soft_wpmi",
                num_alternatives: int = 5, num_top_images: int = 10,
                neuron_chunk_size: int | None = None,
                keep_scores: bool | Sequence[str] = False,
                concept_matrix_max_gb: float = DEFAULT_CONCEPT_MATRIX_MAX_GB,
                mesh=None, kernel: str = "auto",
                compute_dtype: str = "float32") -> results_lib.DissectionResult:
  """Similarity and labels for every layer of a probe pass.

  P (num_images x num_concepts) is held in memory only while it takes at most
  concept_matrix_max_gb; beyond that the streaming functions compute what they need of
  it from the embeddings (rank_reorder has no streaming form and always holds P), with
  the neurons split over the devices of `mesh`. Which path is taken depends on the sizes
  only, never on the device count, so the labels are the same on any number of devices.
  keep_scores: True for every layer, or the names of the layers whose (units, concepts)
  scores go into the result's .scores.
  """
  num_images, num_concepts = len(probe.image_embeddings), len(text_embeddings)
  matrix_gb = _concept_matrix_gb(num_images, num_concepts)
  stream = streams(similarity_fn, num_images, num_concepts, concept_matrix_max_gb)
  if stream:
    logging.info("P (%d images x %d concepts, %.2f GB) exceeds concept_matrix_max_gb=%g: "
                 "streaming %s from the embeddings.", num_images, num_concepts, matrix_gb,
                 concept_matrix_max_gb, similarity_fn)
    concept_activations = None
    embeddings = (probe.image_embeddings, text_embeddings)
  else:
    try:
      concept_activations = labeling.concept_activation(probe.image_embeddings,
                                                        text_embeddings)
    except (MemoryError, jax.errors.JaxRuntimeError) as err:
      raise _matrix_out_of_memory(err, "computing P", num_images, num_concepts,
                                  similarity_fn) from None
    embeddings = None
  layers, scores = {}, {}
  top_k = max(num_top_images, similarity.default_top_k(similarity_fn)
              if similarity_fn in labeling.PRIOR_FUNCTIONS else 0)
  for name, acts in probe.activations.items():
    # The probe pass's running top-k: (soft-)WPMI and the listed top images need
    # nothing else of the (num_images, num_units) matrix.
    top = probe.top_for(name, min(top_k, num_images))
    try:
      scored = labeling.score_layer(similarity_fn, concept_activations, acts,
                                    neuron_chunk_size, embeddings=embeddings, top=top,
                                    mesh=mesh if stream else None, kernel=kernel,
                                    compute_dtype=compute_dtype)
    except (MemoryError, jax.errors.JaxRuntimeError) as err:
      raise _matrix_out_of_memory(err, f"scoring layer {name} with P", num_images,
                                  num_concepts, similarity_fn) from None
    layers[name] = labeling.label_units(scored.scores, None, concepts, scored.dead,
                                        scored.invalid, num_alternatives, num_top_images,
                                        tiebreak=scored.tiebreak, top=top)
    if similarity_fn in labeling.PRIOR_FUNCTIONS:
      _warn_of_ties_at_the_cap(name, similarity_fn, scored)
    if keep_scores is True or (keep_scores and name in keep_scores):
      scores[name] = scored.scores
    logging.info("Layer %s: %d units labelled with %s (%d distinct labels).", name,
                 layers[name].num_units, similarity_fn, len(set(layers[name].labels)))
  return results_lib.DissectionResult(list(concepts), list(probe.image_ids), layers, scores)


def _warn_of_ties_at_the_cap(name: str, similarity_fn: str, scored) -> None:
  tied = labeling.tied_at_best(scored.scores, ~(scored.dead | scored.invalid))
  if tied.any():
    num_units = len(tied)
    logging.warning(
        "Layer %s: %d of %d units have two or more concepts tied at their best %s score. "
        "A concept that one unit owns scores lam * log K (K = %d units, log K = %.4f) to "
        "float32 precision, so the margin over the other units chose among them. This "
        "binds on small layers (the paper's have 512 or more units)%s.", name,
        int(tied.sum()), num_units, similarity_fn, num_units, np.log(num_units),
        ": compare with similarity_fn=wpmi there" if similarity_fn == "soft_wpmi" else "")


def dissect(target, concepts, images, clip, layers, *, image_ids=None,
            similarity_fn: str = "soft_wpmi", pool_mode: str = "avg",
            token_pool: str = "cls", batch_size: int = 64, text_batch_size: int = 256,
            num_alternatives: int = 5, num_top_images: int = 10, mesh=None,
            keep_scores: bool = True) -> results_lib.DissectionResult:
  """Labels every unit of `layers` of `target` with a concept, from a notebook.

  Args:
    target: a TargetModel, an HF id / directory, a python:pkg.module:factory spec, or a
      (flax module, variables[, ImageTransform]) tuple (module called on NHWC pixels).
    concepts: a list of strings, or a concept-set spec (file, wordfreq:en:N,
      classes:target).
    images: (N, H, W, 3) uint8 array, a probe spec ("folder:PATH", "tfds:NAME:SPLIT"),
      or a ProbeSource / ProbeSet.
    clip: a ClipModel or an HF id / directory of a Flax CLIP.
    layers: comma-separated string or list of friendly names / module paths.
    image_ids: ids for array images (default "0", "1", ...).
  Returns:
    DissectionResult: .layers[name].labels, .scores[name] (num_units, num_concepts),
    .to_dataframe().
  """
  target = _as_target(target)
  layer_infos = target.resolve_layers(_split_layers(layers))
  clip = clip if isinstance(clip, clip_lib.ClipModel) else clip_lib.load_clip(clip)
  if isinstance(concepts, str):
    concepts = concepts_lib.load_concepts(concepts, target.id2label)
  else:
    concepts = concepts_lib.clean_concepts(concepts, "concepts argument")
  if not concepts:
    raise errors.UserError("concepts", "no concept given.", "pass a non-empty list.")
  if similarity_fn not in similarity.SIMILARITY_FUNCTIONS:
    raise errors.UserError("similarity_fn", f"unknown {similarity_fn!r}.",
                           f"use one of {sorted(similarity.SIMILARITY_FUNCTIONS)}.")
  probe_set = _as_probe_set(images, image_ids)
  check_enough_images(probe_set.num_images, similarity_fn, "images")
  mesh = mesh or sharding.make_mesh()
  sharding.check_batch_size(batch_size, mesh)
  batches = probe_set.batches(clip.transform, target.transform, batch_size)
  probe = activations_lib.run_probe_pass(clip, target, layer_infos, batches,
                                         probe_set.num_images, pool_mode, token_pool, mesh)
  text_embeddings = clip_lib.embed_texts(clip, concepts, text_batch_size)
  return label_probe(probe, text_embeddings, concepts, similarity_fn, num_alternatives,
                     num_top_images, keep_scores=keep_scores)


# --------------------------------------------------------------------------- CLI
def _load_models(config):
  resources.fetch_required(config, ("target_model", "concept_set"))
  target = targets_lib.load_target(config.target_model, class_names=config.class_names)
  layer_infos = target.resolve_layers(_split_layers(config.target_layers))
  clip = clip_lib.load_clip(config.clip_model)
  return target, layer_infos, clip


def _warn_of_missing_truth(target, layer_infos, truths) -> None:
  for info in layer_infos:
    if info.path == target.layer_aliases.get("fc") and info.name not in truths:
      logging.warning(
          "Layer %s has no accuracy in evaluation.json: %s has no real class names "
          "(placeholders such as class_0 or LABEL_0 are not truth). Set "
          "--config.class_names to its class-name list (e.g. clip_dissect:imagenet_labels "
          "for ImageNet models).", info.name, target.name)


def list_layers(config: ml_collections.ConfigDict) -> str:
  """The table --list_layers prints: friendly names, then every module path."""
  target = targets_lib.load_target(config.target_model)
  lines = [f"{'name':<50} {'units':>6}  output shape (batch of 1)"]
  for info in target.layer_table():
    lines.append(f"{info.name:<50} {info.num_units:>6}  {info.shape}")
  return "\n".join(lines)


def _environment() -> dict[str, Any]:
  import flax  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  versions = {"python": platform.python_version(), "jax": jax.__version__,
              "flax": flax.__version__, "transformers": transformers.__version__,
              "numpy": np.__version__}
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    versions["tensorflow"] = tf.__version__
  except ImportError:
    pass
  return {"versions": versions, "devices": [str(d) for d in jax.devices()],
          "process_count": jax.process_count()}


def probe_chunks(num_images: int, chunk_images: int, batch_size: int) -> list[tuple[int, int]]:
  """[start, stop) ranges of the resumable probe pass. Chunks are whole batches, so a
  resumed pass forms exactly the batches of an uninterrupted one."""
  size = -(-chunk_images // batch_size) * batch_size
  return [(start, min(start + size, num_images)) for start in range(0, num_images, size)]


def _resumable_probe_pass(config, probe_key, probe_set, clip, target, layer_infos, mesh,
                          meta) -> activations_lib.ProbeActivations:
  """The probe pass in chunks, each saved atomically as it finishes; chunks saved by an
  earlier (killed) run with the same key are reused, not recomputed. The chunks are then
  assembled into the store entry, which is returned memory-mapped.

  In a multi-process run, probe_key names this process's shard; each process reads
  every process_count-th image and a chunk is reused only where every process has it
  (the steps are collective: all processes must run the same ones).
  """
  shard_index, num_shards = jax.process_index(), jax.process_count()
  chunks = probe_chunks(probe_set.num_images, config.probe_chunk_images, config.batch_size)
  step = activations_lib.make_probe_step(clip, target, layer_infos, config.pool_mode,
                                         config.token_pool, mesh)
  reused = 0
  for number, (start, stop) in enumerate(chunks, 1):
    have = store.load_probe_chunk(config.activation_dir, probe_key, start, stop,
                                  mmap=True) is not None
    if sharding.all_processes_agree(have):
      reused += 1
      continue
    batches = probe_set.batches(clip.transform, target.transform,
                                config.batch_size // num_shards,
                                config.num_decode_threads, shard_index=shard_index,
                                num_shards=num_shards, start=start, stop=stop)
    part = activations_lib.run_probe_pass(
        clip, target, layer_infos, batches, stop - start, config.pool_mode,
        config.token_pool, mesh, config.log_every_s, first_index=start, step=step,
        shard_index=shard_index, num_shards=num_shards)
    if store.save_probe_chunk(config.activation_dir, probe_key, start, stop,
                              part) is None:
      raise errors.UserError("activation_dir", f"cannot save probe chunks under "
                             f"{config.activation_dir}.", "give a writable activation_dir.")
    logging.info("Probe chunk %d/%d saved (images %d..%d).", number, len(chunks), start,
                 stop - 1)
  if reused:
    logging.info("Probe pass: %d of %d chunk(s) reused from an earlier run, %d computed.",
                 reused, len(chunks), len(chunks) - reused)
  return store.assemble_probe(config.activation_dir, probe_key, chunks, meta)


def gather_probe(local: activations_lib.ProbeActivations, num_images: int,
                 with_activations: bool = True) -> activations_lib.ProbeActivations:
  """Every process's rows (each process holds every process_count-th image) in global
  image order, in every process. The running top-k is global already.

  with_activations=False leaves the activation matrices out (zero-width): (soft-)WPMI
  from the running top-k needs only the embeddings.
  """
  shard_index, num_shards = jax.process_index(), jax.process_count()
  width = -(-num_images // num_shards)
  skipped = set(local.skipped)
  indices = np.array([i for i in range(shard_index, num_images, num_shards)
                      if i not in skipped], np.int64)

  def padded(array, fill=0):
    array = np.asarray(array)
    pad = np.full((width - len(array), *array.shape[1:]), fill, array.dtype)
    return np.concatenate([array, pad])

  all_indices = sharding.allgather(padded(indices, -1)).reshape(-1)
  order = np.argsort(all_indices, kind="stable")
  order = order[all_indices[order] >= 0]

  def gather(array):
    return sharding.allgather(padded(array)).reshape(-1, *np.shape(array)[1:])[order]

  encoded = [image_id.encode("utf-8") for image_id in local.image_ids]
  id_width = int(
      sharding.allgather(np.array([max(map(len, encoded), default=1)])).max())
  id_bytes = np.zeros((len(encoded), id_width), np.uint8)
  for row, raw in enumerate(encoded):
    id_bytes[row, :len(raw)] = np.frombuffer(raw, np.uint8)
  image_ids = [bytes(row).rstrip(b"\0").decode("utf-8") for row in gather(id_bytes)]
  all_skipped = sharding.allgather(
      padded(np.array(sorted(skipped), np.int64), -1)).reshape(-1)
  activations = {
      name: gather(values) if with_activations else np.zeros((len(order), 0), np.float32)
      for name, values in local.activations.items()}
  return activations_lib.ProbeActivations(
      gather(local.image_embeddings), activations, image_ids,
      sorted(int(i) for i in all_skipped if i >= 0), local.top)


def label_with_config(config, probe: activations_lib.ProbeActivations,
                      text_embeddings: np.ndarray, concepts: Sequence[str],
                      keep_scores: Sequence[str], mesh=None) -> results_lib.DissectionResult:
  """label_probe with the similarity settings of `config` (main.py and the evaluate
  CLI label the same way)."""
  return label_probe(probe, text_embeddings, concepts, config.similarity_fn,
                     config.num_alternatives, config.num_top_images,
                     config.neuron_chunk_size or None, keep_scores=keep_scores,
                     concept_matrix_max_gb=config.concept_matrix_max_gb, mesh=mesh,
                     kernel=config.similarity_kernel, compute_dtype=config.similarity_dtype)


def layer_trust(config, probe: activations_lib.ProbeActivations,
                result: results_lib.DissectionResult, text_embeddings: np.ndarray
                ) -> dict[str, trust.UnitTrust]:
  """Per-unit AUC and permutation p-value of every layer's labels."""
  out = {}
  for name, layer in result.layers.items():
    top_ids = None
    if config.similarity_fn in labeling.PRIOR_FUNCTIONS:
      top_k = similarity.default_top_k(config.similarity_fn)
      top = probe.top_for(name, min(top_k, len(probe.image_ids)))
      top_ids = labeling.top_images_of_zeroed(top, top.k)
    activations = probe.activations.get(name)
    if activations is not None and activations.shape[1] != layer.num_units:
      activations = None  # not gathered (multi-process, top-k only): no AUC
    started = time.time()
    out[name] = trust.unit_trust(
        name, config.similarity_fn, activations, probe.image_embeddings, text_embeddings,
        layer.alternative_ids[:, 0], ~(layer.dead | layer.invalid), top_ids,
        top_fraction=config.trust_top_fraction,
        num_permutations=config.trust_permutations, seed=config.trust_seed)
    logging.info("Layer %s: unit trust (AUC, %d permutations) in %.1f s.", name,
                 config.trust_permutations, time.time() - started)
  return out


def evaluate_run(config, result, truths, concepts, text_embeddings, clip) -> dict:
  """evaluation.json's contents, logged as a table. clip: a ClipModel, or a callable
  returning one (loaded only if a true label is not in the concept set)."""
  sentence_embed = None
  if truths:
    encoder = sentence_lib.load_optional(config.sentence_model)
    sentence_embed = encoder.embed if encoder is not None else None
  embed = evaluate.make_embedder(
      concepts, text_embeddings,
      lambda texts: clip_lib.embed_texts(clip() if callable(clip) else clip, texts))
  evaluation = evaluate.evaluate_result(result, truths, embed, sentence_embed)
  logging.info("Label evaluation%s:\n%s",
               " (precision against known truth)" if truths else "",
               evaluate.format_table(evaluation))
  return evaluation


def probe_store_key(config, clip, target, layer_infos, probe_set,
                    clip_hash: str | None = None) -> str:
  """The activation-store key of a probe pass: everything that changes its values
  (weights, computation, layers, pooling, probe files, preprocessing) and nothing that
  does not (batch size, device count, similarity, output paths). clip_hash: the CLIP
  weights' params_fingerprint, when the caller has it already."""
  return store.fingerprint({
      "clip": clip.name,
      "clip_params": clip_hash or targets_lib.params_fingerprint(clip.params),
      "target": target.name, "target_params": targets_lib.params_fingerprint(
          target.variables),
      "layers": [[i.name, i.path] for i in layer_infos],
      "pool_mode": config.pool_mode, "token_pool": config.token_pool,
      "probe": probe_set.identity, "num_images": probe_set.num_images,
      "clip_transform": clip.transform.to_json(),
      "target_transform": target.transform.to_json(),
      "computation": activations_lib.computation_fingerprint(
          clip, target, layer_infos, config.pool_mode, config.token_pool),
  })


def text_store_key(clip, concepts: Sequence[str], clip_hash: str | None = None) -> str:
  return store.fingerprint({"clip": clip.name,
                            "clip_params": clip_hash or targets_lib.params_fingerprint(
                                clip.params),
                            "concepts": list(concepts),
                            "max_text_length": clip.max_text_length})


def run(config: ml_collections.ConfigDict, workdir: str = "./workdir") -> str:
  """Dissects as `config` says and writes result_dir; returns its path."""
  config_lib.validate(config)
  config = config_lib.resolve_paths(config, workdir)
  results_lib.check_result_dir(config.result_dir, config.overwrite)
  mesh = sharding.mesh_from_config(config)
  sharding.check_batch_size(config.batch_size, mesh)

  target, layer_infos, clip = _load_models(config)
  logging.info("Layers: %s", ", ".join(f"{i.name} ({i.path}, {i.num_units} units)"
                                       for i in layer_infos))
  concepts = concepts_lib.load_concepts(config.concept_set, target.id2label)
  logging.info("Concept set %s: %d concepts.", config.concept_set, len(concepts))
  probe_set = probe_lib.ProbeSet(probe_lib.parse_probe_spec(config.d_probe))
  check_enough_images(probe_set.num_images, config.similarity_fn)

  # Hashing every CLIP weight takes seconds for a large model: once for both keys.
  clip_hash = targets_lib.params_fingerprint(clip.params)
  probe_key = probe_store_key(config, clip, target, layer_infos, probe_set, clip_hash)
  # Each process of a multi-process run stores its own shard of the pass.
  shard_key = probe_key if jax.process_count() == 1 else (
      f"{probe_key}.shard-{jax.process_index()}-of-{jax.process_count()}")
  # Memory-mapped: the (num_images, ...) arrays are read from disk as they are used.
  probe = store.load_probe(config.activation_dir, shard_key, mmap=True)
  if sharding.all_processes_agree(probe is not None):
    logging.info("Probe activations reused from %s (key %s).", config.activation_dir,
                 shard_key)
  else:
    probe = _resumable_probe_pass(config, shard_key, probe_set, clip, target, layer_infos,
                                  mesh, {"clip": clip.name, "target": target.name,
                                         "num_images": probe_set.num_images})
    store.remove_probe_chunks(config.activation_dir, shard_key)
  if jax.process_count() > 1:
    num_kept = probe_set.num_images - int(
        sharding.allgather(np.array([len(probe.skipped)])).sum())
    # More listed top images than the running top-k keeps are recomputed from the
    # matrices, which then have to be gathered too.
    top_k_only = (config.similarity_fn in labeling.PRIOR_FUNCTIONS
                  and config.num_top_images <= topk.RUNNING_TOP_K
                  and streams(config.similarity_fn, num_kept, len(concepts),
                              config.concept_matrix_max_gb))
    probe = gather_probe(probe, probe_set.num_images, with_activations=not top_k_only)
    # Every process now holds the whole pass; each scores it on its own devices (the
    # results are the same everywhere) and process 0 writes them.
    mesh = sharding.make_mesh(local=True)

  skipped = [(i, probe_set.describe(i)) for i in probe.skipped]
  if skipped and config.on_bad_image == "error":
    listed = ", ".join(name for _, name in skipped[:5])
    raise errors.UserError(
        "d_probe", f"{len(skipped)} probe image(s) could not be decoded ({listed}"
        f"{', ...' if len(skipped) > 5 else ''}).",
        "repair or remove them, or set --config.on_bad_image=skip to skip them.")
  if skipped:
    logging.warning("Skipped %d undecodable probe image(s); they are listed in "
                    "skipped_images.txt.", len(skipped))
  check_enough_images(len(probe.image_ids), config.similarity_fn)

  text_key = text_store_key(clip, concepts, clip_hash)
  cached_text = store.load_text(config.activation_dir, text_key)
  if cached_text is not None:
    text_embeddings, _ = cached_text
    logging.info("Text embeddings reused from %s (key %s).", config.activation_dir,
                 text_key)
  else:
    logging.info("Embedding %d concepts.", len(concepts))
    text_embeddings = clip_lib.embed_texts(clip, concepts, config.text_batch_size)
    store.save_text(config.activation_dir, text_key, text_embeddings, concepts,
                    {"clip": clip.name})

  logging.info("Scoring %d layer(s) with %s.", len(layer_infos), config.similarity_fn)
  truths = {info.name: truth for info in layer_infos
            if (truth := target.truth_for(info)) is not None}
  _warn_of_missing_truth(target, layer_infos, truths)
  # The true concepts' ranks need those layers' scores.
  result = label_with_config(config, probe, text_embeddings, concepts, list(truths), mesh)
  result.trust = layer_trust(config, probe, result, text_embeddings)
  evaluation = evaluate_run(config, result, truths, concepts, text_embeddings, clip)
  config_json = {
      "config": config.to_dict(), "workdir": os.path.abspath(workdir),
      "layers": {i.name: {"path": i.path, "units": i.num_units} for i in layer_infos},
      "num_images": probe_set.num_images, "num_concepts": len(concepts),
      "probe_key": probe_key, "text_key": text_key, **_environment(),
  }
  if jax.process_index() != 0:
    return config.result_dir

  strips = {}
  if config.report_top_images > 0:
    global_index = np.setdiff1d(np.arange(probe_set.num_images),
                                np.asarray(probe.skipped, np.int64))
    strips = report.unit_strips(target, probe_set, {i.name: i.path for i in layer_infos},
                                result, global_index, config.report_top_images)

  def write_contents(directory):
    results_lib.write_files(directory, result, config_json,
                            functools.partial(report.write_report, strips=strips))
    if skipped:
      with open(os.path.join(directory, "skipped_images.txt"), "w", encoding="utf-8") as f:
        f.write("".join(f"{index}\t{name}\n" for index, name in skipped))
    evaluate.write_json(evaluate.evaluation_path(directory), evaluation)

  logging.info("Writing results to %s.", config.result_dir)
  path = results_lib.write_result_dir(config.result_dir, config.overwrite, write_contents)
  logging.info("Results written to %s.", path)
  return path

"""The probe pass as main.py runs it: stored, resumable, and gathered across processes.

The store key of a pass covers everything that changes its values (models and their
weights, the lowered probe step, layers, pooling, probe files, preprocessing, image
count); a pass is saved chunk by chunk, so a run killed at any point resumes from its
last chunk and ends with results identical to an uninterrupted run. In a multi-process
run each process keeps its own shard (`KEY.shard-P-of-N`) and the rows are gathered
into every process afterwards. Text embeddings of the concept set are cached likewise.
"""
import collections
import dataclasses
from typing import Sequence

from absl import logging
import jax
import numpy as np

from jaxdissect import activations as activations_lib
from jaxdissect import errors
from jaxdissect import labeling
from jaxdissect import sharding
from jaxdissect import store
from jaxdissect import topk
from jaxdissect.data import decode
from jaxdissect.models import clip as clip_lib
from jaxdissect.models import targets as targets_lib


def load_or_run(config, probe_set, clip, target, layer_infos, mesh, num_concepts: int,
                clip_hash: str):
  """(probe, probe_key, mesh): the stored pass for this config, computed (resumably) if
  it is not stored. With several processes every process ends up holding the whole
  pass, and the returned mesh is this process's devices (each scores it alone)."""
  probe_key = probe_store_key(config, clip, target, layer_infos, probe_set, clip_hash)
  shard_key = probe_key if jax.process_count() == 1 else shard_store_key(
      probe_key, config.batch_size // jax.process_count())
  # Memory-mapped: the (num_images, ...) arrays are read from disk as they are used.
  probe = store.load_probe(config.activation_dir, shard_key, mmap=True)
  if sharding.all_processes_agree(probe is not None):
    logging.info("Probe activations reused from %s (key %s).", config.activation_dir,
                 shard_key)
  else:
    probe = resumable_probe_pass(config, shard_key, probe_set, clip, target, layer_infos,
                                 mesh, {"clip": clip.name, "target": target.name,
                                        "num_images": probe_set.num_images})
    store.remove_probe_chunks(config.activation_dir, shard_key)
  if jax.process_count() > 1:
    num_kept = probe_set.num_images - int(
        sharding.allgather(np.array([len(probe.skipped)])).sum())
    top_k_only = _top_k_only(config, probe, num_kept, num_concepts)
    probe = gather_probe(probe, probe_set.num_images,
                         config.batch_size // jax.process_count(),
                         with_activations=not top_k_only)
    mesh = sharding.make_mesh(local=True)
  return probe, probe_key, mesh


def _top_k_only(config, probe: store.ProbeActivations, num_images: int,
                num_concepts: int) -> bool:
  """Whether a multi-process run gathers only the running top-k and the embeddings,
  not the (images x units) activations: a streamed (soft-)WPMI labels from those, but
  the AUC, the correlation labels and the explanations read the activations, so they
  are gathered unless they exceed config.activation_gather_max_gb (a warning then
  says what is left out). More listed top images than the running top-k keeps are
  recomputed from the activations, which then are always gathered."""
  if not (config.similarity_fn in labeling.PRIOR_FUNCTIONS
          and config.num_top_images <= topk.RUNNING_TOP_K
          and labeling.streams(config.similarity_fn, num_images, num_concepts,
                               config.concept_matrix_max_gb)):
    return False
  units = sum(values.shape[1] for values in probe.activations.values())
  gather_gb = labeling.float32_matrix_gb(num_images, units)
  if gather_gb <= float(config.activation_gather_max_gb):
    return False
  logging.warning(
      "The activations of %d images x %d units (%.1f GB) exceed "
      "activation_gather_max_gb=%g: each process keeps its own rows, and the labels "
      "come from the gathered running top-k. unit_trust.csv gets no AUC, correlation "
      "label or simulation, and no explanations are written; set "
      "--config.activation_gather_max_gb=%d to gather them (that much memory in every "
      "process).", num_images, units, gather_gb, config.activation_gather_max_gb,
      int(gather_gb) + 1)
  return True


def shard_store_key(probe_key: str, local_batch: int) -> str:
  """The store key of this process's shard of a multi-process pass. A shard's rows
  depend on the local batch (sharding.shard_offsets), so it is in the key; "blocks"
  also keeps shards of the earlier layout (every process_count-th image) from being
  read as this one."""
  return (f"{probe_key}.blocks-{local_batch}.shard-{jax.process_index()}-of-"
          f"{jax.process_count()}")


def load_or_embed_texts(config, clip, concepts: Sequence[str], clip_hash: str):
  """(text_embeddings (num_concepts, dim), text_key), from the store when cached."""
  text_key = text_store_key(clip, concepts, clip_hash)
  cached_text = store.load_text(config.activation_dir, text_key)
  if cached_text is not None:
    logging.info("Text embeddings reused from %s (key %s).", config.activation_dir,
                 text_key)
    return cached_text[0], text_key
  logging.info("Embedding %d concepts.", len(concepts))
  text_embeddings = clip_lib.embed_texts(clip, concepts, config.text_batch_size)
  store.save_text(config.activation_dir, text_key, text_embeddings, concepts,
                  {"clip": clip.name})
  return text_embeddings, text_key


def probe_chunks(num_images: int, chunk_images: int, batch_size: int) -> list[tuple[int, int]]:
  """[start, stop) ranges of the resumable probe pass. Chunks are whole batches, so a
  resumed pass forms exactly the batches of an uninterrupted one."""
  size = -(-chunk_images // batch_size) * batch_size
  return [(start, min(start + size, num_images)) for start in range(0, num_images, size)]


def resumable_probe_pass(config, probe_key, probe_set, clip, target, layer_infos, mesh,
                          meta) -> store.ProbeActivations:
  """The probe pass in chunks, each saved atomically as it finishes; chunks saved by an
  earlier (killed) run with the same key are reused, not recomputed. The chunks are then
  assembled into the store entry, which is returned memory-mapped.

  In a multi-process run, probe_key names this process's shard; each process reads its
  slice of every global batch (sharding.shard_offsets) and a chunk is reused only
  where every process has it (the steps are collective: all processes must run the
  same ones).
  """
  shard_index, num_shards = jax.process_index(), jax.process_count()
  local_batch = config.batch_size // num_shards
  chunks = probe_chunks(probe_set.num_images, config.probe_chunk_images, config.batch_size)
  step = activations_lib.make_probe_step(clip, target, layer_infos, config.pool_mode,
                                         config.token_pool, mesh)
  reused = 0
  for number, (start, stop) in enumerate(chunks, 1):
    finished = store.load_probe(config.activation_dir, probe_key, mmap=True)
    if sharding.all_processes_agree(finished is not None):
      logging.info("Probe activations finished by another run sharing %s; reused.",
                   config.activation_dir)
      return finished
    have = store.load_probe_chunk(config.activation_dir, probe_key, start, stop,
                                  mmap=True) is not None
    if sharding.all_processes_agree(have):
      reused += 1
      continue
    batches = probe_set.batches(clip.transform, target.transform, local_batch,
                                config.num_decode_threads, shard_index=shard_index,
                                num_shards=num_shards, start=start, stop=stop)
    part = activations_lib.run_probe_pass(
        clip, target, layer_infos, batches, stop - start, config.pool_mode,
        config.token_pool, mesh, config.log_every_s, first_index=start, step=step,
        shard_offsets=sharding.shard_offsets(stop - start, local_batch, shard_index,
                                             num_shards))
    try:
      store.save_probe_chunk(config.activation_dir, probe_key, start, stop, part)
    except OSError as err:
      finished = store.load_probe(config.activation_dir, probe_key, mmap=True)
      if finished is not None:  # another run finished the pass and removed its chunks
        return finished
      raise errors.from_os_error("activation_dir", err, "saving probe chunks") from None
    logging.info("Probe chunk %d/%d saved (images %d..%d).", number, len(chunks), start,
                 stop - 1)
  if reused:
    logging.info("Probe pass: %d of %d chunk(s) reused from an earlier run, %d computed.",
                 reused, len(chunks), len(chunks) - reused)
  try:
    return store.assemble_probe(config.activation_dir, probe_key, chunks, meta)
  except OSError as err:
    raise errors.from_os_error("activation_dir", err, "assembling the probe pass") from None


def gather_probe(local: store.ProbeActivations, num_images: int, local_batch: int,
                 with_activations: bool = True) -> store.ProbeActivations:
  """Every process's rows (each holds its slice of every global batch of process_count
  x local_batch images, sharding.shard_offsets) in global image order, in every
  process. The running top-k is global already.

  with_activations=False leaves the activation matrices out (zero-width): (soft-)WPMI
  from the running top-k needs only the embeddings.
  """
  shard_index, num_shards = jax.process_index(), jax.process_count()
  held = sharding.shard_offsets(num_images, local_batch, shard_index, num_shards)
  # Process 0's slice of each global batch comes first, so it holds the most rows.
  width = len(sharding.shard_offsets(num_images, local_batch, 0, num_shards))
  indices = held[~np.isin(held, np.asarray(local.skipped, np.int64))]

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
      padded(np.array(sorted(local.skipped), np.int64), -1)).reshape(-1)
  activations = {
      name: gather(values) if with_activations else np.zeros((len(order), 0), np.float32)
      for name, values in local.activations.items()}
  return store.ProbeActivations(
      gather(local.image_embeddings), activations, image_ids,
      sorted(int(i) for i in all_skipped if i >= 0), local.top)


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
      "decoding": {"decoder": decode.DECODER, **dataclasses.asdict(probe_set.limits)},
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


def check_skipped(config, probe: store.ProbeActivations,
                  probe_set) -> list[tuple[int, str, str]]:
  """(global index, image id, reason) of the images that could not be decoded; an error
  if config.on_bad_image says so, else a warning. Enough images must remain."""
  reasons = probe_set.skip_reasons(probe.skipped) if probe.skipped else {}
  skipped = [(i, probe_set.describe(i), reasons[i]) for i in probe.skipped]
  if skipped and config.on_bad_image == "error":
    index, name, reason = skipped[0]
    raise errors.UserError(
        "d_probe", f"{len(skipped)} probe image(s) cannot be used; the first, {name!r} "
        f"(#{index}): {reason}.",
        "repair or remove them, or set --config.on_bad_image=skip to skip them.")
  if skipped:
    logging.warning("Skipped %d probe image(s) that cannot be used (%s); they are listed "
                    "with the reason in skipped_images.csv.", len(skipped),
                    _reason_counts(skipped))
  labeling.check_enough_images(
      len(probe.image_ids), config.similarity_fn,
      skipped=f"{len(skipped)} skipped: {_reason_counts(skipped)}" if skipped else "")
  return skipped


def _reason_counts(skipped) -> str:
  # "cannot decode (OSError: ...)" and "cannot decode (SyntaxError: ...)" count together.
  counts = collections.Counter(reason.split(" (")[0].split(":")[0] for _, _, reason in skipped)
  return ", ".join(f"{n} {what}" for what, n in counts.most_common())


def simulator_embeddings(config, probe_set, target, mesh, concepts):
  """(image embeddings (N, D'), text embeddings (M, D')) of config.simulator_model over
  the probe set and the concepts (its own pass, stored and resumable like the run's),
  or None when no simulator is set."""
  if not config.get("simulator_model", ""):
    return None
  simulator = clip_lib.load_clip(config.simulator_model, field="simulator_model")
  simulator_hash = targets_lib.params_fingerprint(simulator.params)
  logging.info("Simulator %s: embedding the probe images and the concepts.",
               config.simulator_model)
  # No target layers: only the simulator's image embeddings are kept.
  probe, _, _ = load_or_run(config, probe_set, simulator, target, [], mesh, len(concepts),
                            simulator_hash)
  texts, _ = load_or_embed_texts(config, simulator, concepts, simulator_hash)
  return np.asarray(probe.image_embeddings), np.asarray(texts)

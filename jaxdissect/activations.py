"""The probe pass: one jitted step per batch gives CLIP image embeddings and the pooled
activations of every requested layer; only (batch, units) arrays leave the device.
"""
import collections
import hashlib
import time
from typing import Iterable, Sequence

from absl import logging
import jax
import numpy as np

from jaxdissect import sharding
from jaxdissect import store
from jaxdissect import topk
from jaxdissect.models import clip as clip_lib
from jaxdissect.models import targets as targets_lib


def make_probe_step(clip: clip_lib.ClipModel, target: targets_lib.TargetModel,
                    layers: Sequence[targets_lib.LayerInfo], pool_mode: str,
                    token_pool: str, mesh=None):
  """jit(clip_params, target_variables, clip_pixels, target_pixels, index, mask, state)
  -> (embeddings (B, dim), {layer name: (B, units)}, state).

  index: (B,) int32 global image indices; mask: (B,) bool, False on padding rows.
  state: {layer name: topk state}, the running top-k merged with this batch in-graph
  (donated: it stays on the device between steps).
  """
  paths = [info.path for info in layers]
  keep = targets_lib.capture_filter(paths)

  def step(clip_params, target_variables, clip_pixels, target_pixels, index, mask, state):
    embeddings = clip.image_embeddings(clip_params, clip_pixels)
    _, intermediates = target.forward(target_variables, target_pixels, capture=keep)
    pooled, new_state = {}, {}
    for info in layers:
      array = targets_lib.get_intermediate(intermediates, info.path)
      pooled[info.name] = targets_lib.pool(array, pool_mode, token_pool).astype(np.float32)
      new_state[info.name] = topk.update_state(state[info.name], pooled[info.name], index,
                                               mask)
    return embeddings.astype(np.float32), pooled, new_state

  if mesh is None:
    return jax.jit(step, donate_argnums=6)
  data = sharding.batch_sharding(mesh)
  rep = sharding.replicated(mesh)
  return jax.jit(step, in_shardings=(rep, rep, data, data, data, data, rep),
                 out_shardings=(data, data, rep), donate_argnums=6)


def initial_state(layers: Sequence[targets_lib.LayerInfo], k: int = topk.RUNNING_TOP_K):
  return {info.name: topk.empty_state(k, info.num_units) for info in layers}


def prefetch_to_device(batches: Iterable[dict], mesh=None, size: int = 2):
  """Yields (batch, (clip_pixels, target_pixels, index, mask)) with those arrays already
  on the device(s) (split over the mesh's "data" axis; this process's rows in a
  multi-process run), `size` batches ahead of the consumer."""
  queue = collections.deque()
  for batch in batches:
    queue.append((batch, sharding.put_local_batch(
        (batch["clip_pixels"], batch["target_pixels"],
         np.asarray(batch["index"], np.int32), np.asarray(batch["mask"], bool)), mesh)))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def computation_fingerprint(clip: clip_lib.ClipModel, target: targets_lib.TargetModel,
                            layers: Sequence[targets_lib.LayerInfo], pool_mode: str,
                            token_pool: str) -> str:
  """A hash of the probe step's StableHLO, lowered unsharded at batch size 1.

  Why: weights, layer names and transforms do not say what the code computes. Editing a
  module's __call__ (a python: target, a patched library) keeps every one of them, and a
  store keyed on them alone would return the old activations. The lowered program holds
  the computation (weights are arguments, not constants) and no source locations, and it
  does not depend on batch size or device count, so stored entries stay reusable across
  both.
  """
  step = make_probe_step(clip, target, layers, pool_mode, token_pool)

  def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.result_type(x)),
                        tree)

  clip_pixels = jax.ShapeDtypeStruct((1, *clip.transform.output_size, 3), np.float32)
  target_pixels = jax.ShapeDtypeStruct((1, *target.transform.output_size, 3), np.float32)
  text = step.lower(abstract(clip.params), abstract(target.variables), clip_pixels,
                    target_pixels, jax.ShapeDtypeStruct((1,), np.int32),
                    jax.ShapeDtypeStruct((1,), bool),
                    abstract(initial_state(layers))).as_text()
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


class RateLogger:
  """Logs items/s (images by default) and ETA at most every `every_s` seconds."""

  def __init__(self, total: int, what: str, every_s: float = 10.0, unit: str = "images"):
    self.total, self.what, self.every_s, self.unit = total, what, every_s, unit
    self.start = self.last = time.monotonic()
    self.done = 0

  def update(self, count: int) -> None:
    self.done += count
    now = time.monotonic()
    if now - self.last >= self.every_s or self.done >= self.total:
      self.last = now
      elapsed = max(now - self.start, 1e-9)
      rate = self.done / elapsed
      eta = (self.total - self.done) / rate if rate > 0 else float("inf")
      logging.info("%s: %d/%d %s, %.1f %s/s, ETA %.0fs.", self.what, self.done,
                   self.total, self.unit, rate, self.unit, eta)

  @property
  def rate(self) -> float:
    return self.done / max(time.monotonic() - self.start, 1e-9)


def run_probe_pass(clip: clip_lib.ClipModel, target: targets_lib.TargetModel,
                   layers: Sequence[targets_lib.LayerInfo], batches: Iterable[dict],
                   num_images: int, pool_mode: str = "avg", token_pool: str = "cls",
                   mesh=None, log_every_s: float = 10.0, first_index: int = 0,
                   step=None, shard_offsets: np.ndarray | None = None
                   ) -> store.ProbeActivations:
  """Runs the probe step over every batch; padding rows are dropped by the mask.

  The batches hold images first_index..first_index+num_images-1 (global indices); in a
  multi-process pass only this process's share of them, whose offsets from first_index
  are shard_offsets (ascending; sharding.shard_offsets, ProbeSet.batches' layout), and
  the rows returned are those. The running top-k is global: every process gets the
  same one. Pass the same `step` (make_probe_step) to every chunk of one pass so it
  compiles once.
  """
  step = step or make_probe_step(clip, target, layers, pool_mode, token_pool, mesh)
  # Parameters go to the device(s) once; left on the host they would be copied again
  # at every step.
  param_placement = None if mesh is None else sharding.replicated(mesh)
  params = (clip.params, target.variables)
  if mesh is not None and sharding.is_multi_process(mesh):
    # A multi-process device_put replicates host data, not another device's arrays.
    params = jax.tree.map(np.asarray, params)
  clip_params, target_variables = jax.device_put(params, param_placement)
  if shard_offsets is None:
    shard_offsets = np.arange(num_images, dtype=np.int64)
  num_rows = len(shard_offsets)
  embeddings = np.zeros((num_rows, clip.embedding_dim), np.float32)
  activations = {info.name: np.zeros((num_rows, info.num_units), np.float32)
                 for info in layers}
  image_ids = [None] * num_rows
  seen = np.zeros(num_rows, bool)
  progress = RateLogger(num_rows, "Probe pass", log_every_s)

  def collect(batch, outputs):
    out_embeddings, out_pooled = outputs
    mask = batch["mask"]
    row = np.searchsorted(shard_offsets, batch["index"][mask] - first_index)
    embeddings[row] = sharding.local_rows(out_embeddings)[mask]
    for name, values in out_pooled.items():
      activations[name][row] = sharding.local_rows(values)[mask]
    for i, image_id in zip(row, batch["image_id"][mask]):
      image_ids[i] = image_id.decode("utf-8") if isinstance(image_id, bytes) else str(
          image_id)
    seen[row] = True
    progress.update(int(mask.sum()))

  # Committed from the start, as the step's outputs are: an uncommitted first state
  # would give the step a second cache entry (a recompile at the second batch).
  # Host arrays: a multi-process device_put replicates host data, not another device's.
  state = jax.device_put(jax.tree.map(np.asarray, initial_state(layers)),
                         param_placement or jax.devices()[0])
  # Dispatch is asynchronous: the next batches are already on the device (prefetch) and
  # a step's outputs are read back only after the next step is dispatched, so decoding,
  # transfer and compute overlap.
  pending = None
  for batch, arrays in prefetch_to_device(batches, mesh):
    *outputs, state = step(clip_params, target_variables, *arrays, state)
    if pending is not None:
      collect(*pending)
    pending = (batch, outputs)
  if pending is not None:
    collect(*pending)
  logging.info("Probe pass done: %d images at %.1f images/s.", num_rows, progress.rate)
  top = {name: topk.RunningTopK(*(sharding.to_host(x) for x in layer_state))
         for name, layer_state in state.items()}
  if seen.all():
    return store.ProbeActivations(embeddings, activations, image_ids, top=top)
  # The input pipeline drops images it cannot decode; they leave the rows here.
  skipped = [first_index + int(shard_offsets[i]) for i in np.flatnonzero(~seen)]
  logging.warning("%d of %d probe image(s) could not be decoded and were skipped.",
                  len(skipped), num_rows)
  return store.ProbeActivations(embeddings[seen], {k: v[seen] for k, v in activations.items()},
                          [image_ids[i] for i in np.flatnonzero(seen)], skipped, top)

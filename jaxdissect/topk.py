"""Running per-neuron top-k and activation statistics, kept during the probe pass.

(soft-)WPMI only reads each neuron's top images, and the labels only list a few top
images per unit: with a running top-k (values and global image ids) and three running
statistics (min, max, all-finite) per unit, neither needs the (num_images, num_units)
activation matrix in memory.

One order everywhere (docs/DESIGN.md): the higher activation first, then the lower global
image index. The in-graph merge (jnp, inside the probe step) and the host merge (NumPy,
across chunks, processes and resumed runs) both sort by exactly that key, so the result
does not depend on batch size, chunking, sharding or the number of hosts, and equals
jax.lax.top_k over the whole matrix (similarity.top_activations).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# How many top images per unit the probe pass keeps: soft_wpmi's top_k (100), the listed
# top images and the label stability's 200 (stability.depth) fit. A run that asks for
# more recomputes them from the stored activations (top_k_from_activations).
RUNNING_TOP_K = 256
# The id of an empty slot: sorts after every real image.
EMPTY_ID = np.iinfo(np.int32).max


@dataclasses.dataclass
class RunningTopK:
  """values: (k, num_units) descending per unit; ids: (k, num_units) int32 global image
  indices (EMPTY_ID where fewer than k images were seen). minimum, maximum: (num_units,)
  over the images seen; finite: (num_units,) bool, no NaN/Inf seen."""
  values: np.ndarray
  ids: np.ndarray
  minimum: np.ndarray
  maximum: np.ndarray
  finite: np.ndarray

  @property
  def k(self) -> int:
    return self.values.shape[0]

  @property
  def dead(self) -> np.ndarray:
    """(num_units,) bool: finite and constant over the probe set."""
    return self.finite & (self.maximum == self.minimum)

  @property
  def invalid(self) -> np.ndarray:
    return ~self.finite


def empty_state(k: int, num_units: int):
  """The in-graph state before any image: (values, ids, minimum, maximum, finite)."""
  return (jnp.full((k, num_units), -jnp.inf, jnp.float32),
          jnp.full((k, num_units), EMPTY_ID, jnp.int32),
          jnp.full((num_units,), jnp.inf, jnp.float32),
          jnp.full((num_units,), -jnp.inf, jnp.float32),
          jnp.ones((num_units,), bool))


def _sort_key_values(values):
  # NaN/Inf units are flagged invalid and labelled apart; ranking their non-finite
  # values last keeps the sort total and lists their finite top images, as
  # labeling.label_units does from the matrix.
  return jnp.where(jnp.isfinite(values), values, -jnp.inf)


def update_state(state, batch_values, batch_ids, mask):
  """Merges one batch into the running state, in-graph.

  batch_values: (batch, num_units); batch_ids: (batch,) int32 global image indices;
  mask: (batch,) bool, False for padding rows.
  """
  values, ids, minimum, maximum, finite = state
  k = values.shape[0]
  batch_values = batch_values.astype(jnp.float32)
  valid = mask[:, None]
  finite = finite & jnp.all(jnp.isfinite(batch_values) | ~valid, axis=0)
  minimum = jnp.minimum(minimum, jnp.min(jnp.where(valid, batch_values, jnp.inf), axis=0))
  maximum = jnp.maximum(maximum, jnp.max(jnp.where(valid, batch_values, -jnp.inf), axis=0))
  new_values = jnp.where(valid, _sort_key_values(batch_values), -jnp.inf).T  # (units, B)
  new_ids = jnp.broadcast_to(jnp.where(mask, batch_ids, EMPTY_ID)[None, :],
                             new_values.shape)
  if new_values.shape[1] > k:
    # A large batch: its own top k first, so the sort below stays small. lax.top_k keeps
    # equal values in position order, so the columns go in id order first (a
    # multi-process batch is process 0's rows, then process 1's: not in id order).
    by_id = jnp.argsort(jnp.where(mask, batch_ids, EMPTY_ID), stable=True)
    new_values, new_ids = new_values[:, by_id], new_ids[:, by_id]
    new_values, positions = jax.lax.top_k(new_values, k)
    new_ids = jnp.take_along_axis(new_ids, positions, axis=1)
  all_values = jnp.concatenate([values.T, new_values], axis=1)  # (units, k + ...)
  all_ids = jnp.concatenate([ids.T, new_ids], axis=1)
  # Ascending sort on (-value, id): the higher value first, then the lower image id.
  neg_values, sorted_ids = jax.lax.sort((-all_values, all_ids), dimension=1, num_keys=2)
  return (-neg_values[:, :k].T, sorted_ids[:, :k].T, minimum, maximum, finite)


def from_state(state) -> RunningTopK:
  return RunningTopK(*(np.asarray(x) for x in state))


def merge(parts: list[RunningTopK], k: int | None = None) -> RunningTopK:
  """The host merge of running states over disjoint image sets (chunks, processes)."""
  if not parts:
    raise ValueError("merge needs at least one part.")
  k = k or parts[0].k
  values = np.concatenate([p.values for p in parts], axis=0)
  ids = np.concatenate([p.ids for p in parts], axis=0)
  # lexsort along the image axis: the last key is the primary one.
  order = np.lexsort((ids, -values), axis=0)[:k]
  keep_values = np.take_along_axis(values, order, axis=0)
  keep_ids = np.take_along_axis(ids, order, axis=0)
  return RunningTopK(keep_values, keep_ids,
                     np.min([p.minimum for p in parts], axis=0),
                     np.max([p.maximum for p in parts], axis=0),
                     np.all([p.finite for p in parts], axis=0))


def from_activations(activations: np.ndarray, k: int, first_index: int = 0,
                     chunk_images: int = 65536) -> RunningTopK:
  """The running state of a whole (num_images, num_units) matrix (it may be a memmap:
  read chunk_images rows at a time)."""
  num_images, num_units = activations.shape
  parts = []
  for start in range(0, num_images, chunk_images):
    block = np.asarray(activations[start:start + chunk_images], np.float32)
    state = update_state(empty_state(k, num_units), jnp.asarray(block),
                         jnp.arange(first_index + start, first_index + start + len(block),
                                    dtype=jnp.int32),
                         jnp.ones(len(block), bool))
    parts.append(from_state(state))
  return merge(parts, k)


def rows_of(global_ids: np.ndarray, skipped: list[int]) -> np.ndarray:
  """Global image indices -> rows of the kept images (skipped images have no row).
  The map is increasing, so the tie order is unchanged."""
  if not skipped:
    return global_ids
  skipped_sorted = np.sort(np.asarray(skipped, np.int64))
  return global_ids - np.searchsorted(skipped_sorted, global_ids, side="left")

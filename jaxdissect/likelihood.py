"""The (soft-)WPMI log-likelihood of every neuron, blocked over concepts.

  L[k, m] = sum_j log t_j(S[top[k, j], m]),   S = softmax over concepts of a P,
  t_j(s) = 1 + p_j (s - 1) + min_prob (soft-WPMI, p_j the membership of rank j) or
  t_j(s) = s + min_prob (WPMI),
with top[k] the rows of neuron k's top_k images, highest activation first.

The plan, which never holds S (images x concepts):
  1. every row's softmax log-normaliser, lse[r] = logsumexp_m a P[r, m], a few whole
     rows at a time (row_log_normalisers);
  2. per block of concepts: S on the block for the rows some neuron reads
     (rows x block, the one temporary of that size), then, for all neurons at once and
     `group` ranks at a time, the product of their terms gathered from the block, one
     log per group (log_likelihood).
The logits come from callables (a few whole rows; a block of concepts for the rows
read): slices of P in memory (similarity.py), or recomputed from the CLIP embeddings
(streaming.py). One code path serves both.

Why this shape (measured on a 2-core CPU, 10,000 images x 20,000 concepts x 256
neurons; BENCHMARKS.md): a materialised S costs 800 MB and 0.35 s to write; gathering
100 rows into one fused loop per neuron runs about 1 ns per term (100 concurrent
streams); `group` rows per fused gather for all neurons runs about 0.2 ns per term; and
an XLA reduction over a major axis is several times slower than these elementwise
products, so ranks are summed by an explicit loop, not jnp.sum.
"""
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# Ranks multiplied before one log: terms lie in [floor, 1 + min_prob], so a product of
# `group` of them stays in float32's normal range when floor ** group > 1e-37. Ten
# divides the default top_k of 100 (1.25x faster than groups of 4, measured).
MAX_GROUP = 10
# The one (rows x block) temporary: at most BLOCK_BYTES, and between MIN_BLOCK and
# MAX_BLOCK concepts. Long blocks make each gathered row a long contiguous read: on 2
# CPU cores 2,000-4,000 concepts ran 1.4x faster than 335 at 50,000 rows, and 8,000
# ran 1.5x slower than 4,000 at 10,000 rows (BENCHMARKS.md).
BLOCK_BYTES = 512 * 2**20
MIN_BLOCK = 128
MAX_BLOCK = 4096
# Bytes of whole rows of logits per step of the normalisers: a few rows, cache-sized
# when they are slices of P; more when each step is a matmul of embeddings, whose
# efficiency, not the cache, sets the best size (measured).
ROW_BLOCK_BYTES = 2 * 2**20
MATMUL_ROW_BLOCK_BYTES = 8 * 2**20


def likelihood_terms(probs, membership=None, min_prob: float = 1e-7):
  """The factors whose log, summed over a unit's top images, is its log-likelihood L.

  probs: S = softmax(a P) at the unit's top images, with `membership` broadcast against
  it. WPMI (membership None): S + min_prob. Soft-WPMI: 1 + p_j (S - 1) + min_prob, p_j
  the membership of the unit's j-th image. Plain arithmetic, so the jnp paths, the
  Pallas kernel and trust's NumPy float64 nulls all use this one formula.
  """
  if membership is None:
    return probs + min_prob
  return 1.0 + membership * (probs - 1.0) + min_prob


def soft_wpmi_term_floor(p_start: float, p_end: float, min_prob: float) -> float:
  """The least value of a soft-WPMI term 1 + p (S - 1) + min_prob, S in [0, 1]."""
  return 1.0 - max(p_start, p_end) + min_prob


def log_group_size(term_floor: float, top_k: int) -> int:
  """Ranks multiplied before one log, for terms >= term_floor > 0.

  A divisor of top_k when one is at least half the largest safe size: a last, shorter
  group would be a separate fused loop, which XLA:CPU ran 4x slower than the rest
  together (it fuses it into the write of the output block). Otherwise the largest
  safe size, and the ranks are padded (log_likelihood masks them).
  """
  largest = MAX_GROUP
  if term_floor < 1.0:
    largest = max(1, min(MAX_GROUP, int(math.floor(-37.0 / math.log10(term_floor)))))
  for size in range(largest, (largest + 1) // 2 - 1, -1):
    if top_k % size == 0:
      return size
  return largest


def block_size(num_rows: int, num_concepts: int, budget_bytes: int = BLOCK_BYTES) -> int:
  """Concepts per block: the (rows x block) float32 temporary within budget_bytes
  unless that is under MIN_BLOCK concepts."""
  block = min(MAX_BLOCK, max(MIN_BLOCK, budget_bytes // (4 * max(1, num_rows))))
  return int(min(num_concepts, block))


def rows_per_block(num_concepts: int, budget_bytes: int = ROW_BLOCK_BYTES) -> int:
  """Whole rows of logits per step of row_log_normalisers within budget_bytes."""
  return int(max(1, budget_bytes // (4 * max(1, num_concepts))))


def num_blocks(num_concepts: int, block: int) -> int:
  return -(-num_concepts // block)


def block_start(index, num_concepts: int, block: int):
  """The last block is moved back to end at num_concepts, so every block is full."""
  return jnp.minimum(index * block, num_concepts - block)


def logsumexp_rows(logits: jax.Array) -> jax.Array:
  """(rows,) logsumexp of each row of finite logits (rows, columns), max-shifted."""
  row_max = jnp.max(logits, axis=1)
  return row_max + jnp.log(jnp.sum(jnp.exp(logits - row_max[:, None]), axis=1))


def row_log_normalisers(row_logits: Callable, num_rows: int, rows_per_block: int
                        ) -> jax.Array:
  """lse: (num_rows,), logsumexp over all concepts of each row's logits.

  row_logits(start, size) -> (size, num_concepts) logits of rows start.. (whole
  rows: the max and the sum run along contiguous memory, about 2x faster on CPU than
  a running max and sum over blocks of concepts, and 5x at 50,000 images).
  """
  rows_per_block = min(rows_per_block, num_rows)

  def body(index, lse):
    # The last block is moved back to end at num_rows; its rows repeat equal values.
    start = jnp.minimum(index * rows_per_block, num_rows - rows_per_block)
    return jax.lax.dynamic_update_slice(
        lse, logsumexp_rows(row_logits(start, rows_per_block)), (start,))

  return jax.lax.fori_loop(0, -(-num_rows // rows_per_block), body,
                           jnp.zeros((num_rows,), jnp.float32))


def log_likelihood(block_logits: Callable, row_lse: jax.Array, top_rows: jax.Array,
                   membership: jax.Array | None, min_prob, *, num_concepts: int,
                   block: int, group: int) -> jax.Array:
  """L: (num_neurons, num_concepts), the formula of the module docstring.

  block_logits(start) -> (rows, block) logits; row_lse: (rows,) from
  row_log_normalisers; top_rows: (num_neurons, top_k) int32 rows, highest activation
  first; membership: (top_k,) soft-WPMI weights, or None for WPMI; group: ranks per
  log (log_group_size of the terms' floor).

  Each entry of L is computed by the same operations in the same order whatever the
  number of neurons or the block, so a neuron's row is bit-identical however the
  neurons are split over devices.
  """
  return layers_log_likelihood(block_logits, row_lse, (top_rows,), membership, min_prob,
                               num_concepts=num_concepts, block=block, group=group)[0]


def layers_log_likelihood(block_logits: Callable, row_lse: jax.Array,
                          top_rows_by_layer: tuple, membership: jax.Array | None,
                          min_prob, *, num_concepts: int, block: int, group: int) -> tuple:
  """log_likelihood of several sets of neurons (a run's layers) reading the same rows:
  a tuple of (num_neurons_l, num_concepts), one per top_rows_by_layer[l]
  (num_neurons_l, top_k).

  Why together: each block's logits and S are computed once for every layer. When the
  logits are recomputed from the embeddings (streaming.py), that matmul is the pass's
  main cost at CLIP widths on a CPU, and the layers' top images are mostly the same
  images.
  """
  top_k = top_rows_by_layer[0].shape[1]
  padded = [pad_ranks(top_rows, None, group)[0] for top_rows in top_rows_by_layer]
  membership = pad_membership(membership, top_k, group)

  def block_body(index, outs):
    start = block_start(index, num_concepts, block)
    probs = block_probs(block_logits(start), row_lse)
    return tuple(
        jax.lax.dynamic_update_slice(out, block_log_likelihood(
            probs, top_rows, membership, min_prob, top_k=top_k, group=group), (0, start))
        for out, top_rows in zip(outs, padded))

  return jax.lax.fori_loop(0, num_blocks(num_concepts, block), block_body,
                           tuple(jnp.zeros((top_rows.shape[0], num_concepts), jnp.float32)
                                 for top_rows in top_rows_by_layer))


def block_probs(logits: jax.Array, row_lse: jax.Array) -> jax.Array:
  """S on one block of concepts, (rows, block), from its logits and the rows' lse.

  Materialised once per block: fused into the gathers of block_log_likelihood it would
  be recomputed for every (neuron, rank), 2.6 times per row at the benchmark's shape.
  """
  return jax.lax.optimization_barrier(jnp.exp(logits - row_lse[:, None]))


def block_log_likelihood(probs: jax.Array, top_rows: jax.Array, membership, min_prob, *,
                         top_k: int, group: int) -> jax.Array:
  """Every neuron's L on one block: (num_neurons, block).

  probs: block_probs; top_rows (num_neurons, ranks) and membership: pad_ranks' output
  for top_k ranks in groups of `group`.
  """

  def add_log_of_group(group_index, acc):
    return acc + log_of_group(lambda rank: probs[top_rows[:, rank]],
                              group_index * group, group, top_k, membership, min_prob)

  return jax.lax.fori_loop(0, top_rows.shape[1] // group, add_log_of_group,
                           jnp.zeros((top_rows.shape[0], probs.shape[1]), jnp.float32))


def pad_ranks(top_rows, membership, group: int):
  """top_rows (num_neurons, top_k) and membership (top_k,) or None, padded to whole
  groups of ranks (log_of_group counts a padded rank's term as 1)."""
  top_k = top_rows.shape[1]
  padding = -(-top_k // group) * group - top_k
  if padding:
    top_rows = jnp.pad(top_rows, ((0, 0), (0, padding)))
  return top_rows, pad_membership(membership, top_k, group)


def pad_membership(membership, top_k: int, group: int):
  """membership (top_k,) or None, padded to whole groups of ranks as pad_ranks pads
  the rows (for layers that share it)."""
  padding = -(-top_k // group) * group - top_k
  if padding and membership is not None:
    membership = jnp.pad(membership, (0, padding))
  return membership


def log_of_group(probs_at: Callable, first_rank, group: int, top_k: int,
                 membership, min_prob) -> jax.Array:
  """log of the product of the terms of ranks first_rank .. first_rank + group - 1.

  probs_at(rank) -> S at each neuron's row of that rank, (num_neurons, columns);
  ranks >= top_k (padding) count as a term of 1. One log per group: see the module
  docstring and log_group_size.
  """
  product = None
  for offset in range(group):
    rank = first_rank + offset
    weight = None if membership is None else membership[rank]
    term = likelihood_terms(probs_at(rank), weight, min_prob)
    if (top_k % group) != 0:
      term = jnp.where(rank < top_k, term, 1.0)
    product = term if product is None else product * term
  return jnp.log(product)


def unique_rows(top_images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(sorted distinct image rows, top_images as int32 indices into them), host-side."""
  rows, local = np.unique(np.asarray(top_images), return_inverse=True)
  return rows, local.reshape(np.shape(top_images)).astype(np.int32)


def layers_unique_rows(top_images_by_layer, num_images: int, name: str, what: str
                       ) -> tuple[np.ndarray, list]:
  """(sorted distinct image rows of all the layers, [each layer's top_images as int32
  indices into them, its own shape]), host-side; a row outside 0..num_images - 1 is a
  ValueError naming `what`."""
  arrays = [np.asarray(t) for t in top_images_by_layer]
  rows, local = unique_rows(np.concatenate([a.ravel() for a in arrays]))
  if rows.size and (rows[0] < 0 or rows[-1] >= num_images):
    raise ValueError(f"{name}: {what} holds rows outside 0..{num_images - 1}.")
  parts = np.split(local, np.cumsum([a.size for a in arrays])[:-1])
  return rows, [part.reshape(a.shape) for part, a in zip(parts, arrays)]

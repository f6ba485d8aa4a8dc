"""Similarity between neuron activations and CLIP concept activations, pure jnp.

Every public function takes
  concept_activation: (num_images, num_concepts), P[i, m] = cos(CLIP image i, text m)
  activations:        (num_images, num_neurons), pooled activations of one layer
and returns (num_neurons, num_concepts) scores, higher = better match. The formulas
are those of docs/DESIGN.md. All functions are vectorised over neurons, so no Python
loop runs per neuron, and memory stays bounded: (soft-)WPMI works through blocks of
concepts (`block_size`, likelihood.py), rank_reorder through chunks of neurons
(`chunk_size`), both chosen from a memory budget when None.

Ties among a neuron's top activations are broken by the lower image index (the rule
of jax.lax.top_k), so results do not depend on batch size or sharding.
"""
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect import likelihood
from jaxdissect import registry
from jaxdissect import sharding

# Bytes one chunk's largest intermediate may take when chunk_size is None.
DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024
# rank_reorder divides by (mean concept activation)**scale_p: clamp the mean here.
RANK_REORDER_MIN_MEAN = 1e-6
# Columns whose L2 norm is below this are treated as having norm TINY (no NaN).
TINY = 1e-12
# The paper code's constants (jaxdissect/registry.py).
_SOFT = registry.SIMILARITY["soft_wpmi"].defaults
_WPMI = registry.SIMILARITY["wpmi"].defaults
_RANK = registry.SIMILARITY["rank_reorder"].defaults
_CUBED = registry.SIMILARITY["cos_similarity_cubed"].defaults
NUM_BASELINE_SHUFFLES = 5
FOLD_ROWS = 32
# Below this many elements _fold_rows takes one row per iteration: the 32-row unrolled
# body compiled in 1.6 s where the whole fold ran in well under a millisecond.
FOLD_UNROLL_MIN_ELEMENTS = 2**20


def _check_inputs(concept_activation, activations, name: str) -> tuple[int, int, int]:
  if concept_activation.ndim != 2 or activations.ndim != 2:
    raise ValueError(
        f"{name}: concept_activation must be (num_images, num_concepts) and activations "
        f"(num_images, num_neurons); got shapes {concept_activation.shape} and "
        f"{activations.shape}.")
  if concept_activation.shape[0] != activations.shape[0]:
    raise ValueError(
        f"{name}: concept_activation has {concept_activation.shape[0]} images but "
        f"activations has {activations.shape[0]}; both must be rows of the same images.")
  num_images, num_concepts = concept_activation.shape
  return num_images, num_concepts, activations.shape[1]


def _chunk(chunk_size: int | None, num_neurons: int, bytes_per_neuron: int) -> int:
  if chunk_size is None:
    chunk_size = max(1, DEFAULT_CHUNK_BYTES // max(1, bytes_per_neuron))
  return int(max(1, min(chunk_size, num_neurons)))


def top_activations(activations: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Each neuron's k largest activations, largest first, ties to the lower image index.

  Exactly jax.lax.top_k over each neuron's column (its order: NaN above +inf, -0 below
  +0, ties to the lower index), computed in two stages when the images are many:
  `chunk` consecutive images per chunk, each neuron's k chunks with the largest maximum
  (ties to the lower chunk), then lax.top_k over those chunks' images only, in image
  order. The k largest lie in those chunks: an image outside them sits in a chunk
  whose maximum is below, or tied with and after, k chosen chunks, each of which holds
  an image that ranks above it. Why: lax.top_k along the images needs the
  (neurons, images) transpose, and the two took 0.58-0.82 s at 50,000 images x 2,048
  neurons on 2 CPU cores; the two stages 0.27 s for k = 28 and 0.41 s for k = 100
  (BENCHMARKS.md).

  Args:
    activations: (num_images, num_neurons).
    k: how many images per neuron.
  Returns:
    values: (num_neurons, k) descending; indices: (num_neurons, k) image indices.
  """
  activations = jnp.asarray(activations)
  num_images = activations.shape[0]
  chunk = top_k_chunk(num_images, k)
  if chunk < MIN_TOP_K_CHUNK:
    return jax.lax.top_k(activations.T, k)
  return _chunked_top_k(activations, k=k, chunk=chunk)


# Below this many images per chunk the two stages of top_activations save little.
MIN_TOP_K_CHUNK = 4


def top_k_chunk(num_images: int, k: int) -> int:
  """Images per chunk for top_activations: the chunks (num_images / chunk) and the
  candidates (k x chunk) about equal, the two top-k stages then costing about the same."""
  return int(math.isqrt(num_images // max(1, k))) if k <= num_images else 0


def _flip_negative_bits(bits: jax.Array) -> jax.Array:
  """int32 float bits -> keys ordered as lax.top_k orders float32 values (-NaN < -inf
  < ... < -0 < +0 < ... < +inf < NaN, the IEEE total order), by flipping the non-sign
  bits of negatives; its own inverse, so it also maps keys back to float bits."""
  return bits ^ ((bits >> 31) & 0x7FFFFFFF)


# The least float32 of the total order (a negative NaN): padding never outranks an image.
_LEAST_FLOAT32 = np.uint32(0xFFFFFFFF).view(np.float32)


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def _chunked_top_k(activations, k: int, chunk: int):
  num_images, num_neurons = activations.shape
  num_chunks = -(-num_images // chunk)
  activations = activations.astype(jnp.float32)
  # The padding is the least float32, so it never outranks an image. (Padding the
  # activations fuses into the maximum; padding the int32 keys ran 6x slower on CPU.)
  padded = jnp.pad(activations, ((0, num_chunks * chunk - num_images), (0, 0)),
                   constant_values=_LEAST_FLOAT32)
  keys = _flip_negative_bits(jax.lax.bitcast_convert_type(padded, jnp.int32))
  chunk_max = jnp.max(keys.reshape(num_chunks, chunk, num_neurons), axis=1)
  # Back to float32: lax.top_k over int32 ran 25x slower than over float32 on CPU.
  chunk_max = jax.lax.bitcast_convert_type(_flip_negative_bits(chunk_max), jnp.float32)
  _, chunks = jax.lax.top_k(chunk_max.T, k)  # (num_neurons, k)
  # Candidates in image order, so that lax.top_k's tie rule picks the lower image.
  candidates = (jnp.sort(chunks, axis=1)[:, :, None] * chunk
                + jnp.arange(chunk)[None, None, :]).reshape(num_neurons, k * chunk)
  values = jnp.where(
      candidates < num_images,
      activations[jnp.minimum(candidates, num_images - 1), jnp.arange(num_neurons)[:, None]],
      _LEAST_FLOAT32)
  values, positions = jax.lax.top_k(values, k)
  return values, jnp.take_along_axis(candidates, positions, axis=1)


def _fold_rows(step, init, x):
  """step(row index, carry) over the rows of x in order, FOLD_ROWS rows per iteration.

  Why: XLA:CPU runs a reduction over a major axis of (neurons, concepts) about 7x
  slower than this loop of row-wide elementwise steps, and one row per iteration 5x
  slower than 32 (2,048 x 20,000, BENCHMARKS.md). Small x: one row per iteration, as
  its compile, not its run, is what costs (FOLD_UNROLL_MIN_ELEMENTS).
  """
  num_rows = x.shape[0]
  per_step = min(FOLD_ROWS, num_rows) if x.size >= FOLD_UNROLL_MIN_ELEMENTS else 1
  full_steps = num_rows // per_step

  def body(index, carry):
    for offset in range(per_step):
      carry = step(index * per_step + offset, carry)
    return carry

  carry = jax.lax.fori_loop(0, full_steps, body, init)
  for row in range(full_steps * per_step, num_rows):
    carry = step(row, carry)
  return carry


def _best_neuron_parts(log_likelihood: jax.Array):
  """(is_best (K, M) bool, logsumexp over all neurons (M,), over all but the best (M,),
  the best neuron's L (M,)).

  The best neuron is the first with the largest L (jnp.argmax's rule).
  """
  num_neurons, num_concepts = log_likelihood.shape
  low = jnp.full((num_concepts,), -jnp.inf, log_likelihood.dtype)

  def best_step(k, carry):
    best_value, best = carry
    higher = log_likelihood[k] > best_value
    return jnp.where(higher, log_likelihood[k], best_value), jnp.where(higher, k, best)

  best_value, best = _fold_rows(best_step, (low, jnp.zeros((num_concepts,), jnp.int32)),
                                log_likelihood)
  second_value = _fold_rows(
      lambda k, value: jnp.where(best == k, value, jnp.maximum(value, log_likelihood[k])),
      low, log_likelihood)
  # With one neuron there is no other: its logsumexp is -inf (exp sums to 0).
  second_shift = jnp.where(jnp.isfinite(second_value), second_value, 0.0)

  def sum_step(k, sums):
    all_sum, other_sum = sums
    return (all_sum + jnp.exp(log_likelihood[k] - best_value),
            other_sum + jnp.where(best == k, 0.0,
                                  jnp.exp(log_likelihood[k] - second_shift)))

  zeros = jnp.zeros((num_concepts,), log_likelihood.dtype)
  all_sum, other_sum = _fold_rows(sum_step, (zeros, zeros), log_likelihood)
  is_best = jnp.arange(num_neurons)[:, None] == best[None, :]
  return (is_best, best_value + jnp.log(all_sum), second_shift + jnp.log(other_sum),
          best_value)


def prior_score(log_likelihood, gap, lam: float, num_neurons: int):
  """The (soft-)WPMI score from a neuron's L and its gap, in jnp or NumPy alike.

  L - lam (log sum_o exp L_o - log K) written as (1 - lam) L + lam (log K - gap), with
  gap = log sum_o exp(L_o) - L >= 0 over all K neurons o of the layer at the concept;
  callers compute the gap without cancellation (subtract_prior below; trust's nulls,
  where the unit's L is replaced and gap = softplus(logsumexp of the others - L)).
  """
  return prior_score_at_log_size(log_likelihood, gap, lam, math.log(num_neurons))


def prior_score_at_log_size(log_likelihood, gap, lam: float, log_size):
  """prior_score with log K given: a Python float, or a float32 array that holds the
  float32 a Python math.log(K) becomes (padded layers: stability's stacked prior)."""
  return (1.0 - lam) * log_likelihood + lam * (log_size - gap)


@jax.jit
def subtract_prior(log_likelihood: jax.Array, lam: float) -> jax.Array:
  """L - lam * (logsumexp over neurons of L - log K). Couples all neurons of a layer.

  Computed as (1 - lam) L + lam (log K - gap), gap = logsumexp(L) - L, where for the
  neuron with the largest L the gap is softplus(logsumexp(others) - L): no cancellation
  of two large numbers, so a concept that one neuron owns scores exactly lam log K
  (less (1 - lam) L) instead of that plus float32 noise of order ulp(L). Exact ties are
  then broken by prior_margin.
  """
  return _prior_scores(log_likelihood, _best_neuron_parts(log_likelihood), lam)


@jax.jit
def prior_margin(log_likelihood: jax.Array) -> jax.Array:
  """L[k, m] - logsumexp over the other neurons o != k of L[o, m]: (num_neurons, num_concepts).

  Why: when one neuron's L for a concept exceeds every other neuron's by more than about
  17 nats, its (soft-)WPMI score is lam log K to float32 precision, whatever the
  precision of L, and in a small layer several concepts tie there. The exact score,
  (1 - lam) L + lam log K - lam softplus(-margin), still grows with the margin, which is
  representable for any gap: it orders those ties the way exact arithmetic would. For
  the neuron with the largest L the best neuron is left out of the logsumexp; for the
  others the logsumexp over all neurons stands in (leaving out a neuron that is not the
  largest changes little, and their scores do not saturate).
  """
  return _prior_margins(log_likelihood, _best_neuron_parts(log_likelihood))


@functools.partial(jax.jit, static_argnames=("lam",))
def prior_labels(log_likelihood: jax.Array, lam: float) -> jax.Array:
  """The label (num_neurons,) int32 that subtract_prior's scores give, ties ordered as
  labeling.order_with_ties orders them: by score, then by prior_margin, then by the
  lower concept index. One pass of _best_neuron_parts serves both keys, so relabelling
  a layer many times (stability.py's resamples) costs one prior per resample.
  """
  return best_prior_concept(log_likelihood, lam)[2]


def best_prior_concept(log_likelihood: jax.Array, lam: float, log_size=None):
  """(score, margin, concept), each (num_neurons,): every neuron's best column of
  log_likelihood (num_neurons, columns) in prior_labels' order, with its score and
  prior margin. Columns are independent, so a running best over blocks of concepts
  that keeps the earlier block on equal (score, margin) gives prior_labels' label
  (streaming.resampled_labels).

  log_size: log K of the layer, when rows of L at -inf pad it (a traced float32 under
  vmap over padded layers); None: log of the number of rows. A padded row changes no
  sum, maximum or logsumexp bit, so a padded layer's rows score exactly as the same
  layer unpadded with the same log_size.
  """
  parts = _best_neuron_parts(log_likelihood)
  scores = _prior_scores(log_likelihood, parts, lam, log_size)
  margin = _prior_margins(log_likelihood, parts)
  best = jnp.max(scores, axis=1, keepdims=True)
  key = jnp.where(scores == best, margin, -jnp.inf)
  # argmax returns the first of equal keys: the lower concept index.
  concept = jnp.argmax(key, axis=1)
  return (best[:, 0], jnp.take_along_axis(key, concept[:, None], axis=1)[:, 0],
          concept.astype(jnp.int32))


# Layers padded together into one prior (stacked_best_prior_concept): at most this
# share of padding rows, or any padding while the stack is this small (elements).
STACK_PADDING = 0.25
SMALL_STACK_ELEMENTS = 2**22


def prior_stacks(sizes, num_columns: int) -> tuple[tuple[int, ...], ...]:
  """Groups of layer indices whose priors run as one vmapped program, each layer padded
  to its group's widest.

  sizes: each layer's units; num_columns: the concepts of L per call. Why: a program per
  layer compiled 1.6 s a layer, however small (the synthetic default's 8 layers: 14 s
  of stability for 0.1 s of work), while padding a small layer to a large one at scale
  multiplies its prior's work. Layers are taken narrowest first; one joins the group
  while the padded rows stay within STACK_PADDING of the real ones or the stack within
  SMALL_STACK_ELEMENTS. Equal widths (a ViT's blocks) always share one program.
  """
  groups, current = [], []
  for layer in sorted(range(len(sizes)), key=lambda index: (sizes[index], index)):
    joined = current + [layer]
    padded_rows = len(joined) * sizes[layer]
    real_rows = sum(sizes[index] for index in joined)
    if current and not (padded_rows <= (1.0 + STACK_PADDING) * real_rows or
                        padded_rows * num_columns <= SMALL_STACK_ELEMENTS):
      groups.append(tuple(current))
      joined = [layer]
    current = joined
  if current:
    groups.append(tuple(current))
  return tuple(groups)


def stacked_best_prior_concept(log_likelihood: jax.Array, lam: float, sizes, stacks):
  """best_prior_concept of consecutive layers stacked in log_likelihood's rows, each with
  the prior over its own rows: row for row each layer's margins alone, bit for bit, its
  scores to float32 rounding (log K is a traced value here, which XLA cannot fold into
  the arithmetic as it folds the constant of a layer alone), so its labels unless two
  concepts' scores tie to that rounding.

  log_likelihood: (sum(sizes), columns); stacks: prior_stacks(sizes, columns), static.
  Each stack's layers are padded with rows of -inf to its widest and vmapped, so one
  program serves the stack. Returns (score, margin, concept), each (sum(sizes),).
  """
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  # A row of -inf, L's last, is every layer's padding.
  padded = jnp.concatenate(
      [log_likelihood, jnp.full((1, log_likelihood.shape[1]), -jnp.inf,
                                log_likelihood.dtype)])
  outs = [None] * len(sizes)
  for stack in stacks:
    width = max(sizes[layer] for layer in stack)
    rows = np.full((len(stack), width), offsets[-1], np.int32)
    for position, layer in enumerate(stack):
      rows[position, :sizes[layer]] = np.arange(offsets[layer], offsets[layer + 1])
    # The float32 that best_prior_concept's math.log(K) becomes, per layer.
    log_sizes = np.asarray([math.log(sizes[layer]) for layer in stack], np.float32)
    results = jax.vmap(lambda x, log_size: best_prior_concept(x, lam, log_size))(
        padded[rows], jnp.asarray(log_sizes))
    for position, layer in enumerate(stack):
      outs[layer] = tuple(result[position, :sizes[layer]] for result in results)
  return tuple(jnp.concatenate([out[index] for out in outs]) for index in range(3))


def _prior_scores(log_likelihood, parts, lam, log_size=None):
  """subtract_prior from _best_neuron_parts(log_likelihood)."""
  is_best, lse_all, lse_without_best, best_value = parts
  # The best neuron's L is best_value, so its softplus is one per concept, not one per
  # entry (12 ms of a 256 x 20,000 prior on 2 CPU cores).
  best_gap = jax.nn.softplus(lse_without_best - best_value)
  gap = jnp.where(is_best, best_gap[None, :], lse_all[None, :] - log_likelihood)
  if log_size is None:
    log_size = math.log(log_likelihood.shape[0])
  return prior_score_at_log_size(log_likelihood, gap, lam, log_size)


def _prior_margins(log_likelihood, parts):
  """prior_margin from _best_neuron_parts(log_likelihood); +inf for a single neuron,
  which has no other to be compared with (as padded: its lse_without_best is -inf)."""
  if log_likelihood.shape[0] == 1:
    return jnp.full_like(log_likelihood, jnp.inf)
  is_best, lse_all, lse_without_best, _ = parts
  return jnp.where(is_best, log_likelihood - lse_without_best[None, :],
                   log_likelihood - lse_all[None, :])


def _map_neurons(fn: Callable, xs, chunk: int):
  """jax.lax.map over neurons, `chunk` neurons vectorised at a time."""
  return jax.lax.map(fn, xs, batch_size=chunk)


def l2_normalise(x, axis: int = -1, xp=jnp):
  """x divided by its L2 norm along `axis` (at least TINY); xp=np keeps NumPy float64."""
  return x / xp.maximum(xp.linalg.norm(x, axis=axis, keepdims=True), TINY)


def cos_similarity(concept_activation, activations):
  """Cosine over images between every neuron and every concept: (num_neurons, num_concepts).

  Columns with zero norm (a neuron that is always 0) score 0 instead of NaN.
  """
  _check_inputs(concept_activation, activations, "cos_similarity")
  return _cos_similarity(sharding.to_device(concept_activation),
                         sharding.to_device(activations))


def max_abs(x):
  """Per column max |x| (1 where the column is all 0): (1, num_columns)."""
  scale = jnp.max(jnp.abs(x), axis=0, keepdims=True)
  return jnp.where(scale > 0, scale, 1.0)


@jax.jit
def _cos_similarity(concept_activation, activations):
  def normalise(x):  # columns: over images
    # Dividing by the max first keeps the sum of squares finite for huge activations.
    return l2_normalise(x / max_abs(x), axis=0)

  return jnp.matmul(normalise(activations).T, normalise(concept_activation),
                    precision=jax.lax.Precision.HIGHEST)


def cos_similarity_cubed(concept_activation, activations,
                         min_norm=_CUBED["min_norm"]):
  """Cosine of centred, cubed columns (CLIP-Dissect's cos^3): (num_neurons, num_concepts)."""
  _check_inputs(concept_activation, activations, "cos_similarity_cubed")
  return _cos_similarity_cubed(sharding.to_device(concept_activation),
                               sharding.to_device(activations), min_norm)


def centre_cube_normalise(x, min_norm):
  """Columns centred, cubed and divided by max(norm, min_norm): (rows, columns).

  (c / s) ** 3 with s = max |c| stays in [-1, 1], where c ** 3 overflows float32 for
  |c| > 7e12. c ** 3 / max(|c ** 3|, min_norm) is then y / |y| where |y| s ** 3 >=
  min_norm, else y s ** 3 / min_norm (a near-constant column).
  """
  centred = x - jnp.mean(x, axis=0, keepdims=True)
  scale = max_abs(centred)
  cubed = (centred / scale) ** 3
  norm = jnp.linalg.norm(cubed, axis=0, keepdims=True)
  large = norm * scale ** 3 >= min_norm
  factor = jnp.where(large, 1.0 / jnp.maximum(norm, TINY),
                     jnp.where(large, 1.0, scale) ** 3 / min_norm)
  return cubed * factor


@jax.jit
def _cos_similarity_cubed(concept_activation, activations, min_norm):
  return jnp.matmul(centre_cube_normalise(activations, min_norm).T,
                    centre_cube_normalise(concept_activation, min_norm),
                    precision=jax.lax.Precision.HIGHEST)


def wpmi(concept_activation, activations, top_k=_WPMI["top_k"], a=_WPMI["a"],
         lam=_WPMI["lam"], min_prob=_WPMI["min_prob"], block_size=None,
         return_log_likelihood=False):
  """WPMI: sum over a neuron's top_k images of log softmax(a P), minus lam * prior.

  Returns scores (num_neurons, num_concepts), and with return_log_likelihood also L
  (num_neurons, num_concepts), from which prior_margin breaks float32 ties.
  block_size: concepts per block (likelihood.py); None: from a memory budget.
  """
  # WPMI's terms S + min_prob are at least min_prob.
  log_likelihood = _top_k_log_likelihood(concept_activation, activations, top_k, a,
                                         min_prob, None, min_prob, block_size, "wpmi")
  scores = subtract_prior(log_likelihood, lam)
  return (scores, log_likelihood) if return_log_likelihood else scores


def _top_k_log_likelihood(concept_activation, activations, top_k, a, min_prob,
                          membership, term_floor, block_size, name):
  """L (num_neurons, num_concepts) through likelihood.py, S never materialised.

  Only the rows some neuron's top_k holds are read; when that is every image, P's
  column blocks are sliced without a gather.
  """
  num_images, _, _ = _check_inputs(concept_activation, activations, name)
  check_top_k(top_k, num_images, name)
  _, top_images = top_activations(sharding.to_device(activations), top_k)
  return _layers_top_k_log_likelihood(concept_activation, [np.asarray(top_images)], top_k,
                                      a, min_prob, membership, term_floor, block_size)[0]


def layers_log_likelihood(similarity_fn: str, concept_activation, top_images_by_layer,
                          block_size=None) -> list:
  """The L of several layers under (soft-)WPMI at its default settings, in one pass over
  blocks of P's columns for all of them: [(num_neurons_l, num_concepts)] for
  top_images_by_layer [(num_neurons_l, >= top_k) image rows, highest activation
  first]; each layer's scores are subtract_prior(L, lam), as soft_wpmi and wpmi compute
  them from the activations. concept_activation: P (num_images, num_concepts)."""
  if similarity_fn not in ("wpmi", "soft_wpmi"):
    raise ValueError(f"layers_log_likelihood is defined for wpmi and soft_wpmi, not "
                     f"{similarity_fn!r}.")
  params = _SOFT if similarity_fn == "soft_wpmi" else _WPMI
  top_k = params["top_k"]
  check_top_k(top_k, concept_activation.shape[0], similarity_fn)
  for top_images in top_images_by_layer:
    if np.shape(top_images)[1] < top_k:
      raise ValueError(f"{similarity_fn}: top_images has {np.shape(top_images)[1]} images "
                       f"per neuron, fewer than top_k={top_k}.")
  membership, floor = None, params["min_prob"]
  if similarity_fn == "soft_wpmi":
    membership = soft_wpmi_membership(top_k, params["p_start"], params["p_end"])
    floor = likelihood.soft_wpmi_term_floor(params["p_start"], params["p_end"],
                                            params["min_prob"])
  return _layers_top_k_log_likelihood(
      concept_activation, [np.asarray(t)[:, :top_k] for t in top_images_by_layer], top_k,
      params["a"], params["min_prob"], membership, floor, block_size)


def _layers_top_k_log_likelihood(concept_activation, top_images_by_layer, top_k, a,
                                 min_prob, membership, term_floor, block_size) -> list:
  """[L_l] of top_images_by_layer [(num_neurons_l, top_k)], in one pass over P's column
  blocks (likelihood.layers_log_likelihood) reading the union of their rows."""
  num_images, num_concepts = concept_activation.shape
  concept_activation = sharding.to_device(concept_activation)
  rows, top_rows = likelihood.layers_unique_rows(top_images_by_layer, num_images,
                                                 "similarity", "top_images")
  num_rows = rows.size
  block = block_size or likelihood.block_size(num_rows, num_concepts)
  block = int(min(block, num_concepts))
  return list(_blocked_log_likelihood(
      concept_activation, None if num_rows == num_images else jnp.asarray(rows),
      tuple(jnp.asarray(t) for t in top_rows),
      None if membership is None else jnp.asarray(membership, jnp.float32),
      jnp.float32(a), jnp.float32(min_prob), block=block,
      group=likelihood.log_group_size(term_floor, top_k)))


@functools.partial(jax.jit, static_argnames=("block", "group"))
def _blocked_log_likelihood(concept_activation, rows, top_rows, membership, a, min_prob,
                            *, block, group):
  """rows: (num_rows,) image rows read, or None for all; top_rows: a tuple, per layer,
  of (num_neurons_l, top_k) indices into them."""
  num_concepts = concept_activation.shape[1]

  def block_logits(start):
    columns = jax.lax.dynamic_slice_in_dim(concept_activation, start, block, axis=1)
    return a * (columns if rows is None else columns[rows])

  num_rows = concept_activation.shape[0] if rows is None else rows.shape[0]

  def row_logits(start, size):
    if rows is None:
      return a * jax.lax.dynamic_slice_in_dim(concept_activation, start, size)
    return a * concept_activation[jax.lax.dynamic_slice_in_dim(rows, start, size)]

  row_lse = likelihood.row_log_normalisers(row_logits, num_rows,
                                           likelihood.rows_per_block(num_concepts))
  return likelihood.layers_log_likelihood(block_logits, row_lse, top_rows, membership,
                                          min_prob, num_concepts=num_concepts, block=block,
                                          group=group)


def soft_wpmi_membership(top_k: int, p_start: float, p_end: float) -> np.ndarray:
  """p_j = p_start - (j / top_k)(p_start - p_end), j = 0 for the highest activation."""
  ranks = np.arange(top_k, dtype=np.float64)
  return p_start - (ranks / top_k) * (p_start - p_end)


def soft_wpmi(concept_activation, activations, top_k=_SOFT["top_k"], a=_SOFT["a"],
              lam=_SOFT["lam"], min_prob=_SOFT["min_prob"], p_start=_SOFT["p_start"],
              p_end=_SOFT["p_end"], block_size=None, return_log_likelihood=False):
  """Soft-WPMI (CLIP-Dissect's default): (num_neurons, num_concepts).

  L[k, m] = sum_j log(1 + p_j (S[idx_k[j], m] - 1) + min_prob), S = softmax(a P) over
  concepts, idx_k the neuron's top_k images; returns L - lam * prior (and L with
  return_log_likelihood). block_size: concepts per block (likelihood.py); None: from
  a memory budget.
  """
  log_likelihood = _top_k_log_likelihood(
      concept_activation, activations, top_k, a, min_prob,
      soft_wpmi_membership(top_k, p_start, p_end),
      likelihood.soft_wpmi_term_floor(p_start, p_end, min_prob), block_size, "soft_wpmi")
  scores = subtract_prior(log_likelihood, lam)
  return (scores, log_likelihood) if return_log_likelihood else scores


def rank_reorder_baseline_permutations(num_top: int, seed: int) -> np.ndarray:
  """The seeded shuffles of rank_reorder's random baseline: (5, num_top) int32."""
  rng = np.random.default_rng(seed)
  return np.stack([rng.permutation(num_top) for _ in range(NUM_BASELINE_SHUFFLES)]
                 ).astype(np.int32)


def rank_reorder(concept_activation, activations, top_fraction=_RANK["top_fraction"],
                 p=_RANK["p"], scale_p=_RANK["scale_p"], seed=_RANK["seed"],
                 chunk_size=None):
  """Rank-reorder similarity: (num_neurons, num_concepts).

  For each neuron, its top n = floor(N * top_fraction) activations are re-ordered by
  each concept's ranking of the same images; the error against the true order,
  relative to a seeded random-shuffle baseline, is divided by
  (mean concept activation over those images) ** scale_p and negated.

  Deliberate deviation: that mean is clamped at RANK_REORDER_MIN_MEAN, because a small
  CLIP can give negative means and the power would be NaN; a zero random baseline
  (a constant neuron) is clamped likewise.
  """
  num_images, num_concepts, num_neurons = _check_inputs(concept_activation, activations,
                                                        "rank_reorder")
  num_top = int(math.floor(num_images * top_fraction))
  if num_top < 2:
    raise ValueError(
        f"rank_reorder: top_fraction={top_fraction} of {num_images} images keeps "
        f"{num_top} images; at least 2 are needed. Use more probe images or a larger "
        f"top_fraction.")
  # argsort twice needs a few (num_top, num_concepts) int32 buffers per neuron.
  chunk = _chunk(chunk_size, num_neurons, 4 * num_top * num_concepts * 4)
  permutations = jnp.asarray(rank_reorder_baseline_permutations(num_top, seed))
  return _rank_reorder(sharding.to_device(concept_activation),
                       sharding.to_device(activations), permutations, p, scale_p,
                       num_top=num_top, chunk=chunk)


@functools.partial(jax.jit, static_argnames=("num_top", "chunk"))
def _rank_reorder(concept_activation, activations, permutations, p, scale_p, *, num_top,
                  chunk):
  values, top_images = top_activations(activations, num_top)

  def neuron_scores(args):
    top_values, image_ids = args  # (num_top,), descending
    # error / baseline is unchanged by shifting and scaling the values; mapping them to
    # [0, 1] first keeps |v - v'| ** p finite for activations near float32's limits.
    span = top_values[0] - top_values[-1]
    top_values = (top_values - top_values[-1]) / jnp.where(span > 0, span, 1.0)
    ascending = top_values[::-1]
    rows = concept_activation[image_ids]  # (num_top, num_concepts)
    ranks = jnp.argsort(jnp.argsort(rows, axis=0, stable=True), axis=0, stable=True)
    reorganised = ascending[ranks]
    error = jnp.mean(jnp.abs(top_values[:, None] - reorganised) ** p, axis=0)
    baseline = jnp.mean(jnp.abs(ascending[None, :] - ascending[permutations]) ** p)
    error = error / jnp.maximum(baseline, TINY)
    mean_rows = jnp.maximum(jnp.mean(rows, axis=0), RANK_REORDER_MIN_MEAN)
    return -error / mean_rows ** scale_p

  return _map_neurons(neuron_scores, (values, top_images), chunk)


def check_top_k(top_k: int, num_images: int, name: str) -> None:
  if top_k > num_images:
    raise ValueError(
        f"{name}: top_k={top_k} needs at least {top_k} probe images, got {num_images}. "
        f"Use more probe images.")


SIMILARITY_FUNCTIONS: dict[str, Callable] = {
    name: globals()[name] for name in registry.SIMILARITY_FUNCTIONS}


def default_top_k(similarity_fn: str) -> int:
  """The top_k default of soft_wpmi / wpmi (the images per neuron they read)."""
  return registry.SIMILARITY[similarity_fn].top_k


def min_images(similarity_fn: str) -> int:
  """The fewest probe images a similarity function accepts with its defaults."""
  return registry.SIMILARITY[similarity_fn].min_images

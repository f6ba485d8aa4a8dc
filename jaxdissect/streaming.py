"""Similarity without the (num_images, num_concepts) matrix P in memory.

The functions here take the CLIP embeddings instead of P and compute the parts of P they
need on demand, so their peak memory does not grow with images x concepts:
  - (soft-)WPMI only reads P at each neuron's top_k images: those rows are recomputed
    from the image and text embeddings, a chunk of neurons at a time; their softmax
    normalisers over all concepts come from a RowNormalisers, which a run shares between
    its layers and its label stability, so each image's is computed once;
  - the cosine similarities are sums over images: accumulated over image chunks (cos^3
    in two passes, the column means first).
Each equals its in-memory counterpart in similarity.py to float32 rounding (tested).
P is defined as in labeling.concept_activation: norm(I) @ norm(T).T.
"""
import contextlib
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec
import numpy as np

from jaxdissect import kernels
from jaxdissect import likelihood
from jaxdissect import registry
from jaxdissect import sharding
from jaxdissect import similarity

# Bytes of temporaries a chunk (of neurons or of images) may take.
CHUNK_BUDGET_BYTES = 256 * 2**20
COMPUTE_DTYPES = ("float32", "bfloat16")
# Neurons per vectorised step of (soft-)WPMI at most: bounds the padding of small layers.
MAX_NEURON_CHUNK = 32
# With bfloat16 products, each neuron's best concepts by the bfloat16 scores whose L is
# recomputed with float32 products before the prior and the labels, this many per
# round until each neuron's best is a recomputed one (_rescored). On random
# CLIP-like data (50,000 images x 20,000 concepts x 2,048 neurons, soft-WPMI, whose
# labels are full of near ties), 98.9% of the labels equalled float32's without it and
# 99.7% with it (BENCHMARKS.md).
RESCORED_CANDIDATES = 4
# Neurons per step of that recomputation: (neurons x top_k x dim) gathered rows.
RESCORE_CHUNK = 64
STREAMING_FUNCTIONS = registry.STREAMING_FUNCTIONS
_SOFT = registry.SIMILARITY["soft_wpmi"].defaults
_WPMI = registry.SIMILARITY["wpmi"].defaults


def _normalise(x):
  return similarity.l2_normalise(jnp.asarray(x, jnp.float32), axis=1)


def _rows(images, texts, compute_dtype: str = "float32"):
  """P rows for some images: (..., D) x (M, D) -> (..., M), float32.

  compute_dtype "bfloat16": the products in bfloat16, accumulated in float32 (the
  matmul is the FLOP-heavy part on an accelerator; softmax and logs stay float32; the
  labels' candidates are recomputed in float32, _rescored).
  """
  if compute_dtype == "bfloat16":
    return jnp.matmul(images.astype(jnp.bfloat16), texts.astype(jnp.bfloat16).T,
                      preferred_element_type=jnp.float32)
  return jnp.matmul(images, texts.T, precision=jax.lax.Precision.HIGHEST)


def _image_chunk(num_images: int, num_concepts: int, num_columns: int) -> int:
  per_image = 4 * (num_concepts + num_columns) * 3
  return max(1, min(num_images, CHUNK_BUDGET_BYTES // per_image))


def _neuron_chunk(top_k: int, num_concepts: int) -> int:
  return max(1, CHUNK_BUDGET_BYTES // (top_k * num_concepts * 4 * 3))


def _check_width(image_embeddings, text_embeddings, name):
  if image_embeddings.shape[1] != text_embeddings.shape[1]:
    raise ValueError(f"{name}: image and text embeddings differ in width "
                     f"({image_embeddings.shape[1]} vs {text_embeddings.shape[1]}).")


def _check(image_embeddings, text_embeddings, activations, name):
  if image_embeddings.shape[0] != activations.shape[0]:
    raise ValueError(f"{name}: {image_embeddings.shape[0]} image embeddings but "
                     f"activations for {activations.shape[0]} images.")
  _check_width(image_embeddings, text_embeddings, name)


def _normalisers_of(row_normalisers, image_embeddings, text_embeddings, name):
  """row_normalisers, checked against the embeddings, or a new RowNormalisers."""
  if row_normalisers is None:
    return RowNormalisers(image_embeddings, text_embeddings)
  if (row_normalisers.num_images, row_normalisers.num_concepts) != (
      image_embeddings.shape[0], text_embeddings.shape[0]):
    raise ValueError(
        f"{name}: row_normalisers are of {row_normalisers.num_images} images x "
        f"{row_normalisers.num_concepts} concepts, the embeddings "
        f"{image_embeddings.shape[0]} x {text_embeddings.shape[0]}.")
  return row_normalisers


def _top_k_log_likelihood(image_embeddings, text_embeddings, activations, top_k, a,
                          min_prob, name, membership=None, term_floor=None,
                          top_images=None, **kwargs):
  """L (num_neurons, num_concepts): for each neuron, the sum over its top_k images of
  log(S + min_prob) (wpmi; membership None) or log(1 + p_j (S - 1) + min_prob)
  (soft_wpmi), S = softmax(a P) at those images (likelihood.py's blocked plan, the P
  rows recomputed per block of concepts).

  top_images: (num_neurons, >= top_k) image rows, highest activation first (the probe
  pass's running top-k); when given, activations is not read (it may be None).
  kwargs: _layers_top_k_log_likelihood's.
  """
  similarity.check_top_k(top_k, image_embeddings.shape[0], name)
  if top_images is None:
    _check(image_embeddings, text_embeddings, activations, name)
    _, top_images = similarity.top_activations(sharding.to_device(activations),
                                               top_k)
  return _layers_top_k_log_likelihood(image_embeddings, text_embeddings, [top_images],
                                      top_k, a, min_prob, name, membership, term_floor,
                                      **kwargs)[0]


def _layers_top_k_log_likelihood(image_embeddings, text_embeddings, top_images_by_layer,
                                 top_k, a, min_prob, name, membership=None,
                                 term_floor=None, mesh: Mesh | None = None,
                                 kernel: str = "auto", compute_dtype: str = "float32",
                                 block_size: int | None = None, rescore_lam=None,
                                 row_normalisers: "RowNormalisers | None" = None) -> list:
  """_top_k_log_likelihood of several layers in one pass over blocks of concepts:
  [L_l (num_neurons_l, num_concepts)] for top_images_by_layer [(num_neurons_l, >= top_k)
  image rows, highest activation first].

  The blocked plan computes each block's logits (a matmul over the rows x block x dim)
  and S once for the union of the layers' top images, so a run of L layers pays one
  such pass, not L.
  mesh: shard each layer's neurons over its devices (embeddings replicated). Each
  neuron's row of L is computed by the same code on any device count, so L is
  bit-identical to the unsharded one.
  kernel: "jnp", "pallas" (kernels.py, fused; the Pallas interpreter on CPU) or "auto"
  (Pallas only where it was measured faster: kernels.PALLAS_MEASURED_FASTER_ON).
  compute_dtype: "float32" or "bfloat16" (the P rows' products; see _rows).
  block_size: concepts per block (jnp path); None: from likelihood.BLOCK_BYTES.
  rescore_lam: with bfloat16, the prior's weight of the scores that pick each neuron's
  RESCORED_CANDIDATES concepts whose L is then recomputed with float32 products (the
  row normalisers stay the bfloat16 pass's); None: no recomputation.
  row_normalisers: a RowNormalisers of these embeddings shared by the calls of a run,
  or None for one of this call's own.
  """
  if compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"{name}: compute_dtype must be one of {COMPUTE_DTYPES}, got "
                     f"{compute_dtype!r}.")
  num_images = image_embeddings.shape[0]
  _check_width(image_embeddings, text_embeddings, name)
  similarity.check_top_k(top_k, num_images, name)
  for top_images in top_images_by_layer:
    if top_images.shape[1] < top_k:
      raise ValueError(f"{name}: top_images has {top_images.shape[1]} images per neuron, "
                       f"fewer than top_k={top_k}.")
  sizes = [int(top_images.shape[0]) for top_images in top_images_by_layer]
  # Only the rows of the top images are read: a memmap of a million embeddings stays
  # on disk, and the device gets at most num_neurons x top_k rows.
  rows, local = likelihood.layers_unique_rows(
      [np.asarray(t)[:, :top_k] for t in top_images_by_layer], num_images, name,
      "top_images")
  images = np.asarray(image_embeddings[rows], np.float32)
  num_concepts = text_embeddings.shape[0]
  soft = membership is not None
  devices = 1 if mesh is None else mesh.devices.size
  pallas = kernels.use_pallas(kernel) and compute_dtype == "float32"
  group = likelihood.log_group_size(term_floor if soft else min_prob, top_k)
  # Matmul rows of each plan (see _rank_groups_log_likelihood): the blocked plan's two
  # passes over the distinct rows (one when the run reads their normalisers anyway), or
  # one row per (neuron, rank). The rule depends on the run's settings, not on which
  # rows earlier calls left in row_normalisers, so a layer's plan never depends on the
  # other layers of the run.
  passes = 1 if row_normalisers is not None and row_normalisers.reused else 2
  rank_groups = not pallas and sum(sizes) * top_k < passes * rows.size
  # The kernel and the rank-group plan run `chunk` neurons a step; the blocked plan
  # takes all neurons at once.
  chunk = 1
  if pallas:
    chunk = min(_neuron_chunk(top_k, num_concepts), MAX_NEURON_CHUNK)
  elif rank_groups:
    chunk = min(_neuron_chunk(group, num_concepts), MAX_NEURON_CHUNK)
  # Padding (copies of each layer's neuron 0, dropped below) gives every device whole
  # chunks.
  layers = []
  for layer_rows in local:
    padded = -(-len(layer_rows) // (devices * chunk)) * devices * chunk
    layers.append(jnp.asarray(np.concatenate(
        [layer_rows, np.repeat(layer_rows[:1], padded - len(layer_rows), axis=0)])))
  if row_normalisers is not None or not rank_groups:
    row_normalisers = _normalisers_of(row_normalisers, image_embeddings, text_embeddings,
                                      name)
  # The rank-group plan normalises each of its rows from the row's own logits.
  row_lse = (jnp.zeros((1,), jnp.float32) if rank_groups
             else jnp.asarray(row_normalisers.at(rows, a, compute_dtype)))
  args = (_normalise(images), _normalise(text_embeddings), tuple(layers),
          jnp.asarray(membership if soft else np.ones(top_k), jnp.float32),
          jnp.float32(a), jnp.float32(min_prob), row_lse)
  statics = {"soft": soft, "chunk": chunk,
             "block": int(min(block_size or likelihood.block_size(rows.size, num_concepts),
                              num_concepts)),
             "group": group, "compute_dtype": compute_dtype}
  body = _rank_groups_log_likelihood if rank_groups else _neurons_log_likelihood
  if pallas:
    body = _kernel_body(float(a), float(min_prob), jax.default_backend() == "cpu")
  with kernels.lowering_context() if pallas else contextlib.nullcontext():
    if devices == 1:
      outs, top_lses = _jitted(body)(*args, **statics)
    else:
      # Gathered to the host: the prior (a logsumexp over all neurons) is then computed
      # as in the unsharded case, so sharding cannot change a single bit of the scores.
      outs, top_lses = ([np.asarray(x) for x in part] for part in
                        _sharded_log_likelihood(mesh, body, num_layers=len(layers),
                                                **statics)(*args))
  results = []
  for size, out, top_lse, layer_rows in zip(sizes, outs, top_lses, layers):
    out, top_lse = out[:size], top_lse[:size]
    if compute_dtype == "bfloat16" and rescore_lam is not None:
      out = _rescored(out, top_lse, args[:2] + (layer_rows,) + args[3:], rescore_lam,
                      soft)
    results.append(out)
  return results


def _rescored(log_likelihood, top_lse, args, lam, soft):
  """log_likelihood with each neuron's best concepts by L - lam * prior recomputed with
  float32 products, RESCORED_CANDIDATES at a time, until every neuron's best concept
  is a recomputed one (a recomputed score can fall below a bfloat16 one it beat).

  top_lse: (num_neurons, top_k) the row normalisers at the neurons' top images; args:
  _top_k_log_likelihood's.
  """
  images, texts, top_images, membership, a, min_prob, _ = args
  num_neurons, num_concepts = log_likelihood.shape
  count = min(RESCORED_CANDIDATES, num_concepts)
  if count == 0:
    return log_likelihood
  mixed = jnp.asarray(log_likelihood)
  exact = jnp.zeros(mixed.shape, bool)
  neurons = jnp.arange(num_neurons)[:, None]
  for _ in range(-(-num_concepts // count)):
    scores = similarity.subtract_prior(mixed, lam)
    if bool(jnp.all(exact[neurons[:, 0], jnp.argmax(scores, axis=1)])):
      break
    _, candidates = jax.lax.top_k(jnp.where(exact, -jnp.inf, scores), count)
    values = _candidate_log_likelihood(
        images, texts, jnp.asarray(top_images[:num_neurons]), jnp.asarray(top_lse),
        candidates, membership, a, min_prob, soft=soft)
    mixed = mixed.at[neurons, candidates].set(values)
    exact = exact.at[neurons, candidates].set(True)
  return np.asarray(mixed) if isinstance(log_likelihood, np.ndarray) else mixed


@functools.partial(jax.jit, static_argnames=("soft",))
def _candidate_log_likelihood(images, texts, top_images, top_lse, candidates,
                              membership, a, min_prob, *, soft):
  """(num_neurons, candidates) L at given concepts, float32 products, a sum of logs.

  images: (rows, dim) normalised; top_images: (num_neurons, top_k) rows of images;
  top_lse: (num_neurons, top_k) their row normalisers; candidates: (num_neurons, c).
  """
  num_neurons = top_images.shape[0]
  chunk = min(RESCORE_CHUNK, num_neurons)
  padded = -(-num_neurons // chunk) * chunk

  def pad(x):
    return jnp.pad(x, ((0, padded - num_neurons),) + ((0, 0),) * (x.ndim - 1))

  def neurons(xs):
    ids, lse, concepts = xs
    logits = a * jnp.einsum("njd,ncd->njc", images[ids], texts[concepts],
                            precision=jax.lax.Precision.HIGHEST)
    probs = jnp.exp(logits - lse[:, :, None])
    weights = membership[None, :, None] if soft else None
    return jnp.sum(jnp.log(likelihood.likelihood_terms(probs, weights, min_prob)), axis=1)

  top_k = top_lse.shape[1]
  out = jax.lax.map(neurons, (pad(top_images[:, :top_k]).reshape(-1, chunk, top_k),
                              pad(top_lse).reshape(-1, chunk, top_k),
                              pad(candidates).reshape(-1, chunk, candidates.shape[1])))
  return out.reshape(padded, -1)[:num_neurons]


def _row_log_normalisers(images, texts, a, compute_dtype, rows_per_block):
  """(rows,) each image row's logsumexp of a P over all concepts, whole rows of logits
  recomputed from the embeddings rows_per_block at a time
  (likelihood.row_log_normalisers; RowNormalisers' fills)."""
  return likelihood.row_log_normalisers(
      lambda start, size: a * _rows(jax.lax.dynamic_slice_in_dim(images, start, size),
                                    texts, compute_dtype),
      images.shape[0], rows_per_block)


_jitted_row_log_normalisers = jax.jit(_row_log_normalisers,
                                      static_argnames=("compute_dtype", "rows_per_block"))
# Row blocks per call of RowNormalisers' fill (every call the same shape): at 20,000
# concepts 832 rows, so a fill computes at most 831 rows of padding.
MAX_FILL_BLOCKS = 8


class RowNormalisers:
  """Each probe image's softmax log-normaliser over all concepts, logsumexp_m a P[i, m],
  computed on demand and at most once per image and setting (a, compute_dtype).

  The (soft-)WPMI plan reads it at every unit's top images (likelihood.py, step 1), and
  it depends on the image, the concepts and `a` only: one object per run serves the
  similarity of every layer and the label stability of every layer (stability.py),
  which otherwise each recompute it, a matmul over images x concepts x dim (at 512-d,
  as long as the whole similarity's block pass). Memory: (num_images,) float32 per
  setting.

  The values are a function of the row alone: every call computes rows_per_fill rows
  (the missing ones, padded with copies of one) by one compiled program, and XLA
  computes each row of it alike wherever the row sits (tested on CPU), so what other
  rows a call held, and in what order the layers asked, changes no bit. (Programs of
  other shapes can round differently: an 8-row call and a 256-row call differed in 1
  ulp of 16 of 97 rows.)
  """

  def __init__(self, image_embeddings, text_embeddings, rows_per_block=None,
               reused: bool = False):
    """image_embeddings: (num_images, dim), may be a memmap (only the rows asked for
    are read); text_embeddings: (num_concepts, dim). rows_per_block: rows of logits
    per step (None: likelihood.MATMUL_ROW_BLOCK_BYTES of them, at most num_images).
    reused: the run reads the normalisers of every unit's top images anyway (its label
    stability resamples them), so the streamed similarity's blocked plan costs one
    matmul pass over its rows instead of two (_top_k_log_likelihood's choice)."""
    _check_width(image_embeddings, text_embeddings, "RowNormalisers")
    self._images = image_embeddings
    self._texts = _normalise(text_embeddings)
    self.num_images = image_embeddings.shape[0]
    self.num_concepts = self._texts.shape[0]
    self.reused = bool(reused)
    self.rows_per_block = int(rows_per_block or min(
        likelihood.rows_per_block(self.num_concepts, likelihood.MATMUL_ROW_BLOCK_BYTES),
        max(1, self.num_images)))
    self.rows_per_fill = self.rows_per_block * min(
        MAX_FILL_BLOCKS, -(-max(1, self.num_images) // self.rows_per_block))
    self._values = {}  # (a, compute_dtype) -> ((num_images,) float32, (num_images,) bool)
    self.rows_computed = 0  # rows whose normaliser was computed, padding excluded

  def at(self, rows: np.ndarray, a: float, compute_dtype: str = "float32") -> np.ndarray:
    """(len(rows),) float32 normalisers of probe rows `rows` (int, 0..num_images - 1)."""
    rows = np.asarray(rows, np.int64)
    values, known = self._values.setdefault(
        (float(a), compute_dtype), (np.zeros(self.num_images, np.float32),
                                    np.zeros(self.num_images, bool)))
    missing = np.unique(rows[~known[rows]])
    for start in range(0, missing.size, self.rows_per_fill):
      piece = missing[start:start + self.rows_per_fill]
      read = np.concatenate([piece, np.repeat(piece[-1:],
                                              self.rows_per_fill - piece.size)])
      lse = _jitted_row_log_normalisers(
          _normalise(np.asarray(self._images[read], np.float32)), self._texts,
          jnp.float32(a), compute_dtype=compute_dtype,
          rows_per_block=self.rows_per_block)
      values[piece] = np.asarray(lse)[:piece.size]
      known[piece] = True
      self.rows_computed += piece.size
    return values[rows]


def _block_logits(images, texts, a, start, block: int, compute_dtype):
  """(rows, block) a P for concepts start..start + block - 1."""
  return a * _rows(images, jax.lax.dynamic_slice_in_dim(texts, start, block),
                   compute_dtype)


def _neurons_log_likelihood(images, texts, top_images, membership, a, min_prob, row_lse,
                            *, soft, chunk, block, group, compute_dtype="float32"):
  """likelihood.py's plan with the logits recomputed from the embeddings: the rows'
  normalisers row_lse (rows,) given (RowNormalisers), then (rows, dim) x (block, dim)
  per block of concepts for the L of every layer.

  top_images: a tuple of (num_neurons_l, top_k) indices into images, one per layer.
  Every plan returns (a tuple of L (num_neurons_l, num_concepts), a tuple of the row
  normalisers at each neuron's top images (num_neurons_l, top_k)), the latter for
  _rescored."""
  del chunk  # the kernel's
  return (likelihood.layers_log_likelihood(
      lambda start: _block_logits(images, texts, a, start, block, compute_dtype),
      row_lse, top_images, membership if soft else None, min_prob,
      num_concepts=texts.shape[0], block=block, group=group),
          tuple(row_lse[layer] for layer in top_images))


def _rank_groups_log_likelihood(images, texts, top_images, membership, a, min_prob,
                                row_lse, *, soft, chunk, block, group,
                                compute_dtype="float32"):
  """The same L with whole rows of logits per (neuron, rank): `chunk` neurons and one
  group of ranks a step, one (chunk x group, dim) x (concepts, dim) matmul, each row's
  normaliser from its own row; the layers one after another (they share no work).

  Why a second plan: the blocked one computes every read row's logits twice (the
  normalisers, then the blocks). When units share few top images (a large probe set),
  that is 2 x rows matmul work against num_neurons x top_k here: at 1M images x 512
  units x 512-d embeddings, 16.4 s against about 8 on 2 CPU cores (BENCHMARKS.md).
  """
  del block, row_lse  # the blocked plan's
  top_k = top_images[0].shape[1]
  num_groups = -(-top_k // group)
  membership = likelihood.pad_membership(membership if soft else None, top_k, group)

  def neurons(ids):  # (chunk, padded top_k) -> (chunk, num_concepts), (chunk, top_k)
    def add_log_of_group(group_index, carry):
      acc, lse = carry
      group_ids = jax.lax.dynamic_slice_in_dim(ids, group_index * group, group, axis=1)
      logits = a * _rows(images[group_ids.reshape(-1)], texts, compute_dtype)
      group_lse = likelihood.logsumexp_rows(logits)
      probs = jnp.exp(logits - group_lse[:, None]).reshape(ids.shape[0], group, -1)
      lse = jax.lax.dynamic_update_slice_in_dim(
          lse, group_lse.reshape(ids.shape[0], group), group_index * group, axis=1)
      return acc + likelihood.log_of_group(
          lambda rank: probs[:, rank - group_index * group], group_index * group, group,
          top_k, membership, min_prob), lse

    return jax.lax.fori_loop(0, num_groups, add_log_of_group,
                             (jnp.zeros((ids.shape[0], texts.shape[0]), jnp.float32),
                              jnp.zeros(ids.shape, jnp.float32)))

  outs, lses = [], []
  for layer in top_images:
    num_neurons = layer.shape[0]
    padded = likelihood.pad_ranks(layer, None, group)[0]
    out, lse = jax.lax.map(neurons, padded.reshape(num_neurons // chunk, chunk, -1))
    outs.append(out.reshape(num_neurons, -1))
    lses.append(lse.reshape(num_neurons, -1)[:, :top_k])
  return tuple(outs), tuple(lses)


def _kernel_log_likelihood(images, texts, top_images, membership, a, min_prob, row_lse,
                           *, soft, chunk, block, group, a_value, min_prob_value,
                           interpret, compute_dtype="float32"):
  """_neurons_log_likelihood through the fused Pallas kernel, `chunk` neurons a call,
  each layer in turn (float32 only)."""
  del a, min_prob, block, compute_dtype  # constants of the kernel (a_value, ...)
  outs = []
  for layer in top_images:
    out = jax.lax.map(
        lambda ids: kernels._log_likelihood(
            images, texts, row_lse, ids, membership, a=a_value, min_prob=min_prob_value,
            soft=soft, group=group, interpret=interpret),
        layer.reshape(-1, chunk, layer.shape[1]))
    outs.append(out.reshape(-1, texts.shape[0]))
  return tuple(outs), tuple(row_lse[layer] for layer in top_images)


@functools.lru_cache(maxsize=32)
def _kernel_body(a_value: float, min_prob_value: float, interpret: bool):
  """One body object per setting: _jitted and _sharded_log_likelihood cache on it, and a
  fresh partial at every call would compile the kernel again for every layer."""
  return functools.partial(_kernel_log_likelihood, a_value=a_value,
                           min_prob_value=min_prob_value, interpret=interpret)


# Only hashable settings are static, so layers of equal shapes share one compilation.
@functools.lru_cache(maxsize=32)
def _jitted(body):
  return jax.jit(body, static_argnames=("soft", "chunk", "block", "group",
                                        "compute_dtype"))


@functools.lru_cache(maxsize=32)
def _sharded_log_likelihood(mesh, body, soft, chunk, block, group, compute_dtype,
                            num_layers=1):
  """jit(shard_map(...)): each layer's top_images split over the mesh axis, the rest
  replicated."""
  replicated, split = PartitionSpec(), PartitionSpec(sharding.DATA_AXIS)
  layers = (split,) * num_layers
  body = functools.partial(body, soft=soft, chunk=chunk, block=block, group=group,
                           compute_dtype=compute_dtype)
  return jax.jit(jax.shard_map(
      body, mesh=mesh, in_specs=(replicated, replicated, layers, replicated, replicated,
                                 replicated, replicated),
      # The loops' zero-initialised carries are per-device values; the neuron split
      # is all that varies.
      out_specs=(layers, layers), check_vma=False))


def wpmi(image_embeddings, text_embeddings, activations, top_k=_WPMI["top_k"],
         a=_WPMI["a"], lam=_WPMI["lam"], min_prob=_WPMI["min_prob"],
         return_log_likelihood=False, top_images=None, mesh=None,
         kernel="auto", compute_dtype="float32", block_size=None, row_normalisers=None):
  """similarity.wpmi(P, A) without P. image_embeddings: (num_images, dim), may be a
  memmap; top_images, mesh, kernel, compute_dtype, block_size, row_normalisers: see
  _top_k_log_likelihood."""
  log_likelihood = _top_k_log_likelihood(image_embeddings, text_embeddings, activations,
                                         top_k, a, min_prob, "wpmi",
                                         top_images=top_images, mesh=mesh, kernel=kernel,
                                         compute_dtype=compute_dtype,
                                         block_size=block_size, rescore_lam=lam,
                                         row_normalisers=row_normalisers)
  scores = similarity.subtract_prior(log_likelihood, lam)
  return (scores, log_likelihood) if return_log_likelihood else scores


def soft_wpmi(image_embeddings, text_embeddings, activations, top_k=_SOFT["top_k"],
              a=_SOFT["a"], lam=_SOFT["lam"], min_prob=_SOFT["min_prob"],
              p_start=_SOFT["p_start"], p_end=_SOFT["p_end"], return_log_likelihood=False,
              top_images=None, mesh=None, kernel="auto", compute_dtype="float32",
              block_size=None, row_normalisers=None):
  """similarity.soft_wpmi(P, A) without P. image_embeddings: (num_images, dim), may be
  a memmap; top_images, mesh, kernel, compute_dtype, block_size, row_normalisers: see
  _top_k_log_likelihood."""
  log_likelihood = _top_k_log_likelihood(
      image_embeddings, text_embeddings, activations, top_k, a, min_prob, "soft_wpmi",
      membership=similarity.soft_wpmi_membership(top_k, p_start, p_end),
      term_floor=likelihood.soft_wpmi_term_floor(p_start, p_end, min_prob),
      top_images=top_images, mesh=mesh, kernel=kernel, compute_dtype=compute_dtype,
      block_size=block_size, rescore_lam=lam, row_normalisers=row_normalisers)
  scores = similarity.subtract_prior(log_likelihood, lam)
  return (scores, log_likelihood) if return_log_likelihood else scores


def layers_log_likelihood(similarity_fn: str, image_embeddings, text_embeddings,
                          top_images_by_layer, mesh=None, kernel="auto",
                          compute_dtype="float32", block_size=None,
                          row_normalisers=None) -> list:
  """The L of several layers under (soft-)WPMI at its default settings, in one pass over
  blocks of concepts: each block's P rows are recomputed once for all the layers, not
  once per layer. [(num_neurons_l, num_concepts)] for top_images_by_layer
  [(num_neurons_l, >= top_k) image rows, highest activation first]; each layer's scores
  are similarity.subtract_prior(L, lam), as soft_wpmi and wpmi compute them.
  image_embeddings: (num_images, dim), may be a memmap; mesh, kernel, compute_dtype,
  block_size, row_normalisers: see _layers_top_k_log_likelihood."""
  if similarity_fn not in ("wpmi", "soft_wpmi"):
    raise ValueError(f"layers_log_likelihood is defined for wpmi and soft_wpmi, not "
                     f"{similarity_fn!r}.")
  params = _SOFT if similarity_fn == "soft_wpmi" else _WPMI
  membership = term_floor = None
  if similarity_fn == "soft_wpmi":
    membership = similarity.soft_wpmi_membership(params["top_k"], params["p_start"],
                                                 params["p_end"])
    term_floor = likelihood.soft_wpmi_term_floor(params["p_start"], params["p_end"],
                                                 params["min_prob"])
  return _layers_top_k_log_likelihood(
      image_embeddings, text_embeddings, [np.asarray(t) for t in top_images_by_layer],
      params["top_k"], params["a"], params["min_prob"], similarity_fn, membership,
      term_floor, mesh=mesh, kernel=kernel, compute_dtype=compute_dtype,
      block_size=block_size, rescore_lam=params["lam"], row_normalisers=row_normalisers)


def resampled_labels(similarity_fn: str, image_embeddings, text_embeddings,
                     resampled_rows: np.ndarray, mesh=None, compute_dtype="float32",
                     block_size=None, row_normalisers=None) -> np.ndarray:
  """Each resample's label of every unit, as similarity.prior_labels gives it from
  log_likelihood(similarity_fn, ..., resampled_rows[r]): (R, num_units) int32.

  resampled_rows: (R, num_units, >= top_k) image rows, highest activation first.
  One pass over blocks of concepts serves every resample: the rows' normalisers once,
  each block's softmax rows once, then per resample the units' L on the block, the
  prior over units (a per-concept quantity) and a running best concept with
  prior_labels' order (score, then prior margin, then the lower concept index).
  Stacking the resamples as extra units instead recomputes the normalisers and the
  blocks' logits for every batch of resamples that fits in memory: one resample per
  batch at 2,048 units x 20,000 concepts. mesh: the resamples split over its devices.
  row_normalisers: a RowNormalisers of these embeddings shared by the calls of a run (the
  layers' similarity and stability), or None for one of this call's own.
  """
  return layers_resampled_labels(similarity_fn, image_embeddings, text_embeddings,
                                 [resampled_rows], mesh, compute_dtype, block_size,
                                 row_normalisers)[0]


def layers_resampled_labels(similarity_fn: str, image_embeddings, text_embeddings,
                            resampled_rows_by_layer, mesh=None, compute_dtype="float32",
                            block_size=None, row_normalisers=None,
                            on_block: Callable[[int, int], None] | None = None) -> list:
  """resampled_labels of several layers (each a prior over its own units) in one pass
  over blocks of concepts: each block's P rows and softmax computed once for the union
  of the layers' rows. [(R, num_units_l) int32] for resampled_rows_by_layer
  [(R, num_units_l, >= top_k)], the same R for every layer.

  One compiled call per block of concepts, the running best carried from call to call
  on the device(s): at a paper's scale the pass takes minutes on a CPU, and
  on_block(concepts_done, num_concepts), called after each block has finished, lets
  the caller log its rate (stability.layers_stability). None: no waiting between
  blocks."""
  params = dict(_WPMI if similarity_fn == "wpmi" else _SOFT)
  if similarity_fn not in ("wpmi", "soft_wpmi"):
    raise ValueError(f"resampled_labels is defined for wpmi and soft_wpmi, not "
                     f"{similarity_fn!r}.")
  if compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"resampled_labels: compute_dtype must be one of {COMPUTE_DTYPES}, "
                     f"got {compute_dtype!r}.")
  soft = similarity_fn == "soft_wpmi"
  top_k = params["top_k"]
  layers = [np.asarray(rows)[..., :top_k] for rows in resampled_rows_by_layer]
  num_resamples = layers[0].shape[0]
  if any(rows.shape[0] != num_resamples for rows in layers):
    raise ValueError("resampled_labels: every layer needs the same number of resamples, "
                     f"got {[rows.shape[0] for rows in layers]}.")
  _check_width(image_embeddings, text_embeddings, "resampled_labels")
  rows, local = likelihood.layers_unique_rows(layers, image_embeddings.shape[0],
                                              "resampled_labels", "resampled_rows")
  num_concepts = text_embeddings.shape[0]
  membership = (similarity.soft_wpmi_membership(top_k, params["p_start"], params["p_end"])
                if soft else np.ones(top_k))
  floor = (likelihood.soft_wpmi_term_floor(params["p_start"], params["p_end"],
                                           params["min_prob"]) if soft
           else params["min_prob"])
  devices = 1 if mesh is None else mesh.devices.size
  # Copies of resample 0 give every device whole shares; dropped below.
  padded = -(-num_resamples // devices) * devices
  # The layers' units side by side: one gather program for all of them.
  stacked = np.concatenate(local, axis=1)
  stacked = np.concatenate([stacked, np.repeat(stacked[:1], padded - num_resamples, axis=0)])
  row_lse = _normalisers_of(row_normalisers, image_embeddings, text_embeddings,
                            "resampled_labels").at(rows, params["a"], compute_dtype)
  args = (_normalise(np.asarray(image_embeddings[rows], np.float32)),
          _normalise(text_embeddings), jnp.asarray(stacked),
          jnp.asarray(membership, jnp.float32), jnp.float32(params["a"]),
          jnp.float32(params["min_prob"]), jnp.asarray(row_lse))
  sizes = tuple(int(layer.shape[1]) for layer in layers)
  # Per block: the rows' softmax, and every unit's L about three times over (L, its
  # stacked prior's padded copy, the scores), all layers' units at once: each within
  # the block budget (a ViT's 12 x 3,072 MLP units would otherwise hold 1.8 GB).
  block = int(min(block_size or min(likelihood.block_size(rows.size, num_concepts),
                                    likelihood.block_size(3 * sum(sizes), num_concepts)),
                  num_concepts))
  # lam static, as in similarity.prior_labels: the same constants, the same bits.
  statics = {"soft": soft, "compute_dtype": compute_dtype, "lam": float(params["lam"]),
             "block": block, "group": likelihood.log_group_size(floor, top_k),
             "sizes": sizes, "stacks": similarity.prior_stacks(sizes, block)}
  step = (functools.partial(_jitted_resampled_labels_block, **statics) if devices == 1
          else _sharded_resampled_labels_block(mesh, **statics))
  low = np.full(stacked.shape[:2], -np.inf, np.float32)
  best = (low, low, np.zeros(stacked.shape[:2], np.int32))
  count = likelihood.num_blocks(num_concepts, block)
  for index in range(count):
    best = step(*args, best, jnp.int32(index))
    if on_block is not None:
      jax.block_until_ready(best)
      on_block(min((index + 1) * block, num_concepts), num_concepts)
  labels = np.asarray(best[2])[:num_resamples]
  return np.split(labels, np.cumsum(sizes)[:-1], axis=1)


def _resampled_labels_block(images, texts, top_rows, membership, a, min_prob, row_lse,
                            best, index, *, lam, soft, compute_dtype, block, group, sizes,
                            stacks):
  """The running best (score, prior margin, label), each (R, sum(sizes)), updated with
  block `index` of concepts. images: (rows, dim) and texts: (M, dim) normalised;
  top_rows: (R, sum(sizes), top_k) indices into images, the layers' units side by side;
  row_lse: (rows,) their normalisers. Each layer's prior is over its own units
  (similarity.stacked_best_prior_concept, stacks as prior_stacks gives them); a concept
  beats the best so far by prior_labels' order (score, then margin, then the lower
  index: blocks come in order), so a block seen twice changes nothing."""
  num_concepts = texts.shape[0]
  num_resamples, num_units, top_k = top_rows.shape
  membership = likelihood.pad_membership(membership if soft else None, top_k, group)
  padded_rows = likelihood.pad_ranks(top_rows.reshape(-1, top_k), None, group)[0].reshape(
      num_resamples, num_units, -1)
  start = likelihood.block_start(index, num_concepts, block)
  probs = likelihood.block_probs(
      _block_logits(images, texts, a, start, block, compute_dtype), row_lse)

  def resample_body(r, best):
    log_likelihood = likelihood.block_log_likelihood(
        probs, padded_rows[r], membership, min_prob, top_k=top_k, group=group)
    score, margin, label = similarity.stacked_best_prior_concept(
        log_likelihood, lam, sizes, stacks)
    best_score, best_margin, best_label = (x[r] for x in best)
    better = (score > best_score) | ((score == best_score) & (margin > best_margin))
    return tuple(x.at[r].set(jnp.where(better, new, old)) for x, new, old in
                 zip(best, (score, margin, label + start),
                     (best_score, best_margin, best_label)))

  return jax.lax.fori_loop(0, num_resamples, resample_body, tuple(best))


_jitted_resampled_labels_block = jax.jit(
    _resampled_labels_block,
    static_argnames=("lam", "soft", "compute_dtype", "block", "group", "sizes", "stacks"))


@functools.lru_cache(maxsize=32)
def _sharded_resampled_labels_block(mesh, lam, soft, compute_dtype, block, group, sizes,
                                    stacks):
  """jit(shard_map(...)): the resamples (top_rows and the running best) split over the
  mesh axis, the rest replicated."""
  replicated, split = PartitionSpec(), PartitionSpec(sharding.DATA_AXIS)
  body = functools.partial(_resampled_labels_block, lam=lam, soft=soft,
                           compute_dtype=compute_dtype, block=block, group=group,
                           sizes=sizes, stacks=stacks)
  return jax.jit(jax.shard_map(
      body, mesh=mesh,
      in_specs=(replicated, replicated, split) + (replicated,) * 4 + ((split,) * 3,
                                                                      replicated),
      out_specs=(split,) * 3, check_vma=False))


def _image_chunks(num_images: int, size: int):
  return [(start, min(start + size, num_images)) for start in range(0, num_images, size)]


def _neuron_columns(activations, mesh):
  """Pads the neuron columns to a multiple of the mesh's devices; returns (padded,
  original count)."""
  num_neurons = activations.shape[1]
  devices = 1 if mesh is None else mesh.devices.size
  padded = -(-num_neurons // devices) * devices
  if padded > num_neurons:
    activations = jnp.pad(activations, ((0, 0), (0, padded - num_neurons)))
  return activations, num_neurons


def _accumulate(step, mesh, carry, images, texts, columns, *extra):
  """One image chunk of a cosine: unsharded, or with the neuron columns (and the carried
  (neurons, concepts) cross products) split over the mesh."""
  if mesh is None or mesh.devices.size == 1:
    return jax.jit(step)(carry, images, texts, columns, *extra)
  return _sharded_step(step, mesh, len(extra))(carry, images, texts, columns, *extra)


@functools.lru_cache(maxsize=32)
def _sharded_step(step, mesh, num_extra):
  split, replicated = PartitionSpec(sharding.DATA_AXIS), PartitionSpec()
  return jax.jit(jax.shard_map(
      step, mesh=mesh,
      in_specs=((split, replicated), replicated, replicated,
                PartitionSpec(None, sharding.DATA_AXIS), *([replicated] * num_extra)),
      # The column sums of P are computed alike on every device: replicated.
      out_specs=(split, replicated), check_vma=False))


def cos_similarity(image_embeddings, text_embeddings, activations, mesh=None):
  """similarity.cos_similarity(P, A) without P: A^T P and the column norms of P summed
  over image chunks. mesh: split the neurons over its devices."""
  _check(image_embeddings, text_embeddings, activations, "cos_similarity")
  images, texts = _normalise(image_embeddings), _normalise(text_embeddings)
  activations = sharding.to_device(activations)
  # Scale-free: divide by the column max first, as the in-memory function does.
  activations = activations / similarity.max_abs(activations)
  neuron_norms = jnp.maximum(jnp.linalg.norm(activations, axis=0), similarity.TINY)
  columns, num_neurons = _neuron_columns(activations, mesh)
  num_images, num_concepts = activations.shape[0], texts.shape[0]
  size = _image_chunk(num_images, num_concepts, activations.shape[1])
  # P lies in [-1, 1], so its squares and products need no rescaling.
  carry = (jnp.zeros((columns.shape[1], num_concepts), jnp.float32),
           jnp.zeros((num_concepts,), jnp.float32))
  for start, stop in _image_chunks(num_images, size):
    carry = _accumulate(_cos_step_body, mesh, carry, images[start:stop], texts,
                        columns[start:stop])
  cross, squares = carry
  concept_norms = jnp.maximum(jnp.sqrt(squares), similarity.TINY)
  return np.asarray(cross)[:num_neurons] / neuron_norms[:, None] / concept_norms[None, :]


def _cos_step_body(carry, images, texts, activations):
  cross, squares = carry
  rows = _rows(images, texts)
  cross = cross + jnp.matmul(activations.T, rows, precision=jax.lax.Precision.HIGHEST)
  return cross, squares + jnp.sum(rows * rows, axis=0)


def cos_similarity_cubed(image_embeddings, text_embeddings, activations,
                         min_norm=registry.SIMILARITY["cos_similarity_cubed"].defaults[
                             "min_norm"], mesh=None):
  """similarity.cos_similarity_cubed(P, A) without P: the column means of P in a first
  pass over image chunks, then the cubed, centred cross products and norms. mesh: split
  the neurons over its devices."""
  _check(image_embeddings, text_embeddings, activations, "cos_similarity_cubed")
  images, texts = _normalise(image_embeddings), _normalise(text_embeddings)
  activations = sharding.to_device(activations)
  num_images, num_concepts = activations.shape[0], texts.shape[0]
  chunks = _image_chunks(num_images, _image_chunk(num_images, num_concepts,
                                                  activations.shape[1]))
  sums = jnp.zeros((num_concepts,), jnp.float32)
  for start, stop in chunks:
    sums = sums + jnp.sum(_rows(images[start:stop], texts), axis=0)
  means = sums / num_images
  # The neuron side fits in memory (images x neurons): normalised as in similarity.py.
  neurons = similarity.centre_cube_normalise(activations, min_norm)
  columns, num_neurons = _neuron_columns(neurons, mesh)
  carry = (jnp.zeros((columns.shape[1], num_concepts), jnp.float32),
           jnp.zeros((num_concepts,), jnp.float32))
  for start, stop in chunks:
    carry = _accumulate(_cos_cubed_step_body, mesh, carry, images[start:stop], texts,
                        columns[start:stop], means)
  cross, cubed_squares = carry
  # P's centred values lie in [-2, 2]: their cubes need no rescaling before the norm.
  norms = jnp.maximum(jnp.sqrt(cubed_squares), min_norm)
  return np.asarray(cross)[:num_neurons] / norms[None, :]


def _cos_cubed_step_body(carry, images, texts, neurons, means):
  cross, cubed_squares = carry
  cubes = (_rows(images, texts) - means[None, :]) ** 3
  cross = cross + jnp.matmul(neurons.T, cubes, precision=jax.lax.Precision.HIGHEST)
  return cross, cubed_squares + jnp.sum(cubes * cubes, axis=0)


FUNCTIONS = {"soft_wpmi": soft_wpmi, "wpmi": wpmi, "cos_similarity": cos_similarity,
             "cos_similarity_cubed": cos_similarity_cubed}

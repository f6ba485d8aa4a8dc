"""A fused Pallas kernel for the (soft-)WPMI log-likelihood over each neuron's top images.

L[n, m] = sum_j log t_j(S[top[n, j], m]), S = softmax over concepts of
a * images @ texts.T: likelihood.py's formula and arithmetic. The jnp version
(streaming._neurons_log_likelihood) holds S for one block of concepts and every read
row, then gathers each neuron's rows from it; this kernel holds nothing of S: one
program per (neuron, block of 128 concepts) recomputes its top_k rows of that block
(a small matmul, cheap on a GPU or TPU) and multiplies, logs and sums them in fast
memory, so only L leaves the kernel.

Two stages:
  1. lse[r] = logsumexp_m a * images[r] . texts[m], per gathered image row, a few
     whole rows at a time (XLA, likelihood.row_log_normalisers; the softmax
     denominator needs every concept, which no single tile holds);
  2. the kernel, grid (neurons, concept blocks): exp(a x.t - lse), the bounded term,
     and one log per group of ranks (likelihood.log_group_size, rounded down to a
     power of two), summed over the groups.
Shapes are padded to what both lowerings accept: top_k and the embedding width to
powers of two (Triton), concept blocks of 128 (TPU lanes, Triton).

Checked against the jnp version in interpret mode on CPU, and lowered for TPU (Mosaic)
and CUDA (Triton) by jax.export in a CPU test. Selected by config.similarity_kernel.
"""
import functools

import jax
import jax.numpy as jnp
from jax._src import config as jax_config  # the scoped Triton switch (see _on_triton)
from jax.experimental import pallas as pl
import numpy as np

from jaxdissect import likelihood
from jaxdissect import registry

CONCEPT_BLOCK = 128
KERNELS = registry.KERNELS
# Platforms where a benchmark (benchmarks/similarity_bench.py --kernels) measured the
# Pallas kernel faster than the jnp version; "auto" selects it only there. Empty until
# measured: no GPU or TPU has run the benchmark yet (BENCHMARKS.md).
PALLAS_MEASURED_FASTER_ON: tuple[str, ...] = ()


def use_pallas(kernel: str, platform: str | None = None) -> bool:
  """Whether config.similarity_kernel selects the Pallas kernel on `platform`."""
  if kernel not in KERNELS:
    raise ValueError(f"similarity_kernel must be one of {KERNELS}, got {kernel!r}.")
  platform = platform or jax.default_backend()
  if kernel == "auto":
    return platform in PALLAS_MEASURED_FASTER_ON
  return kernel == "pallas"


def _on_triton():
  """CUDA lowers this kernel through Triton, not Mosaic GPU (JAX's default), which
  stages both operand tiles in shared memory: a (128 x 512) float32 pair overflows it.
  No compiler_params are passed, so one pallas_call lowers for TPU (Mosaic) and CUDA
  alike and a single export covers both. The switch is scoped (a context manager of
  JAX's config state, part of the trace context), not a global update."""
  return jax_config.jax_pallas_use_mosaic_gpu(False)


def _next_power_of_two(n: int, minimum: int = 16) -> int:
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _tile(gathered_ref, texts_ref, lse_ref, weights_ref, out_ref, *, a, min_prob, soft,
          group):
  """One (neuron, concept block) tile. The padded ranks come as `group` slabs of n
  ranks each (refs (1, group, n, ...)); rank i of every slab shares one product and
  one log, as in likelihood.py. Slabs are separate ref loads because Triton lowers no
  value slice and Mosaic no product reduction."""
  texts = texts_ref[...]                       # (CONCEPT_BLOCK, dim_pad)
  product = None
  for slab in range(group):
    rows = gathered_ref[0, slab]               # (n, dim_pad)
    logits = a * jax.lax.dot_general(rows, texts, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32,
                                     precision=jax.lax.Precision.HIGHEST)
    probs = jnp.exp(logits - lse_ref[0, slab][:, None])   # (n, CONCEPT_BLOCK)
    weights = weights_ref[0, slab]             # (n,): membership, 0 on padding
    terms = jnp.where((weights > 0)[:, None], likelihood.likelihood_terms(
        probs, weights[:, None] if soft else None, min_prob), 1.0)
    product = terms if product is None else product * terms
  out_ref[0, 0] = jnp.sum(jnp.log(product), axis=0)


def _kernel_group(group: int) -> int:
  """The largest power of two <= group: it divides the padded top_k (a power of two)."""
  return 1 << (max(1, group).bit_length() - 1)


# Triton's dot needs at least 16 rows per operand: each slab keeps that many ranks.
MIN_SLAB_RANKS = 16


def log_likelihood(images, texts, top_images, membership, a, min_prob, *, soft,
                   group=1, interpret=False):
  """L (num_neurons, num_concepts), as streaming._neurons_log_likelihood computes it.

  images: (rows, dim) L2-normalised embeddings of the gathered top images;
  texts: (num_concepts, dim) L2-normalised; top_images: (num_neurons, top_k) rows of
  images; membership: (top_k,) soft-WPMI weights p_j (ignored, all 1, for WPMI);
  a, min_prob: Python floats; group: ranks per log (likelihood.log_group_size; the
  kernel rounds it down to a power of two); interpret: run the kernel in the Pallas interpreter (CPU,
  tests).
  """
  with lowering_context():  # lowering happens inside the call: the switch must cover it
    return _log_likelihood(images, texts, row_log_normalisers(images, texts, a),
                           top_images, membership, a=float(a), min_prob=float(min_prob),
                           soft=soft, group=group, interpret=interpret)


def lowering_context():
  """Wrap the first call (the lowering) of any jitted function that uses the kernel."""
  return _on_triton()


@jax.jit
def row_log_normalisers(images, texts, a):
  """(rows,) logsumexp over concepts of a * images @ texts.T: the softmax denominators,
  computed once per call, not once per tile, a few whole rows at a time
  (likelihood.row_log_normalisers; never rows x concepts)."""
  images, texts = images.astype(jnp.float32), texts.astype(jnp.float32)
  return likelihood.row_log_normalisers(
      lambda start, size: a * jnp.matmul(
          jax.lax.dynamic_slice_in_dim(images, start, size), texts.T,
          precision=jax.lax.Precision.HIGHEST),
      images.shape[0],
      likelihood.rows_per_block(texts.shape[0], likelihood.MATMUL_ROW_BLOCK_BYTES))


# a and min_prob are static: the kernel needs them as constants, and they are fixed
# hyperparameters of a run.
@functools.partial(jax.jit, static_argnames=("a", "min_prob", "soft", "group",
                                             "interpret"))
def _log_likelihood(images, texts, row_lse, top_images, membership, a, min_prob, *,
                    soft, group=1, interpret=False):
  """log_likelihood given the rows' softmax denominators row_lse (rows,)."""
  num_neurons, top_k = top_images.shape
  num_concepts, dim = texts.shape
  top_k_pad, dim_pad = _next_power_of_two(top_k), _next_power_of_two(dim)
  concepts_pad = -(-num_concepts // CONCEPT_BLOCK) * CONCEPT_BLOCK
  images = jnp.pad(images.astype(jnp.float32), ((0, 0), (0, dim_pad - dim)))
  texts = jnp.pad(texts.astype(jnp.float32), ((0, concepts_pad - num_concepts),
                                               (0, dim_pad - dim)))
  ids = jnp.pad(top_images, ((0, 0), (0, top_k_pad - top_k)))
  group = min(_kernel_group(group), max(1, top_k_pad // MIN_SLAB_RANKS))
  slab = top_k_pad // group
  # Rank r of the padded top_k sits in slab r // slab at position r % slab.
  gathered = images[ids].reshape(num_neurons, group, slab, dim_pad)
  lse = row_lse[ids].reshape(num_neurons, group, slab)
  weights = membership if soft else jnp.ones((top_k,), jnp.float32)
  weights = jnp.pad(weights.astype(jnp.float32), (0, top_k_pad - top_k)).reshape(
      1, group, slab)
  kernel = functools.partial(_tile, a=float(a), min_prob=float(min_prob), soft=soft,
                             group=group)

  def call(interpret_mode=False):
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_neurons, 1, concepts_pad), jnp.float32),
        grid=(num_neurons, concepts_pad // CONCEPT_BLOCK),
        in_specs=[
            pl.BlockSpec((1, group, slab, dim_pad), lambda n, c: (n, 0, 0, 0)),
            pl.BlockSpec((CONCEPT_BLOCK, dim_pad), lambda n, c: (c, 0)),
            pl.BlockSpec((1, group, slab), lambda n, c: (n, 0, 0)),
            pl.BlockSpec((1, group, slab), lambda n, c: (0, 0, 0)),
        ],
        out_specs=pl.BlockSpec((1, 1, CONCEPT_BLOCK), lambda n, c: (n, 0, c)),
        interpret=interpret_mode,
    )(gathered, texts, lse, weights)

  out = call(interpret_mode=interpret)
  return out[:, 0, :num_concepts]


def export_for(platforms: tuple[str, ...], num_neurons: int, top_k: int, rows: int,
               num_concepts: int, dim: int, soft: bool = True):
  """jax.export of the kernel for `platforms` (e.g. ("tpu", "cuda")) from any machine:
  proves it lowers there without the hardware."""
  from jax import export  # pylint: disable=g-import-not-at-top
  f32 = jnp.float32
  fn = functools.partial(_log_likelihood, a=10.0 if soft else 2.0, min_prob=1e-7,
                         soft=soft, group=8 if soft else 4)
  # Triton kernels carry no cross-version compatibility guarantee; the export here only
  # shows that the kernel lowers, it is not stored.
  with lowering_context():
    return export.export(jax.jit(fn), platforms=platforms, disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
            jax.ShapeDtypeStruct((rows, dim), f32),
            jax.ShapeDtypeStruct((num_concepts, dim), f32),
            jax.ShapeDtypeStruct((rows,), f32),
            jax.ShapeDtypeStruct((num_neurons, top_k), np.int32),
            jax.ShapeDtypeStruct((top_k,), f32))

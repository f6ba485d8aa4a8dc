"""Similarity without the (num_images, num_concepts) matrix P in memory.

The functions here take the CLIP embeddings instead of P and compute the parts of P they
need on demand, so their peak memory does not grow with images x concepts:
  - (soft-)WPMI only reads P at each neuron's top_k images: those rows are recomputed
    from the image and text embeddings, a chunk of neurons at a time;
  - the cosine similarities are sums over images: accumulated over image chunks (cos^3
    in two passes, the column means first).
Each equals its in-memory counterpart in similarity.py to float32 rounding (tested).
P is defined as in labeling.concept_activation: norm(I) @ norm(T).T.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect import similarity

# Bytes of temporaries a chunk (of neurons or of images) may take.
CHUNK_BUDGET_BYTES = 256 * 2**20
STREAMING_FUNCTIONS = ("soft_wpmi", "wpmi", "cos_similarity", "cos_similarity_cubed")


def _normalise(x):
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _rows(images, texts):
  """P rows for some images: (..., D) x (M, D) -> (..., M)."""
  return jnp.matmul(images, texts.T, precision=jax.lax.Precision.HIGHEST)


def _image_chunk(num_images: int, num_concepts: int, num_columns: int) -> int:
  per_image = 4 * (num_concepts + num_columns) * 3
  return max(1, min(num_images, CHUNK_BUDGET_BYTES // per_image))


def _neuron_chunk(top_k: int, num_concepts: int) -> int:
  return max(1, CHUNK_BUDGET_BYTES // (top_k * num_concepts * 4 * 3))


def _check(image_embeddings, text_embeddings, activations, name):
  if image_embeddings.shape[0] != activations.shape[0]:
    raise ValueError(f"{name}: {image_embeddings.shape[0]} image embeddings but "
                     f"activations for {activations.shape[0]} images.")
  if image_embeddings.shape[1] != text_embeddings.shape[1]:
    raise ValueError(f"{name}: image and text embeddings differ in width "
                     f"({image_embeddings.shape[1]} vs {text_embeddings.shape[1]}).")


def _top_k_log_likelihood(image_embeddings, text_embeddings, activations, top_k, a,
                          min_prob, name, membership=None, term_floor=None,
                          top_images=None):
  """L (num_neurons, num_concepts): for each neuron, the sum over its top_k images of
  log(S + min_prob) (wpmi; membership None) or log(1 + p_j (S - 1) + min_prob)
  (soft_wpmi), S = softmax(a P) at those images, recomputed per chunk of neurons.

  top_images: (num_neurons, >= top_k) image rows, highest activation first (the probe
  pass's running top-k); when given, activations is not read (it may be None).
  """
  num_images = image_embeddings.shape[0]
  if top_images is None:
    _check(image_embeddings, text_embeddings, activations, name)
    similarity._check_top_k(top_k, num_images, name)  # pylint: disable=protected-access
    _, top_images = similarity.top_activations(jnp.asarray(activations, jnp.float32),
                                               top_k)
  else:
    similarity._check_top_k(top_k, num_images, name)  # pylint: disable=protected-access
    if top_images.shape[1] < top_k:
      raise ValueError(f"{name}: top_images has {top_images.shape[1]} images per neuron, "
                       f"fewer than top_k={top_k}.")
  top_images = np.asarray(top_images)[:, :top_k]
  # Only the rows of the top images are read: a memmap of a million embeddings stays
  # on disk, and the device gets at most num_neurons x top_k rows.
  rows, local_ids = np.unique(top_images, return_inverse=True)
  if rows.size and (rows[0] < 0 or rows[-1] >= num_images):
    raise ValueError(f"{name}: top_images holds rows outside 0..{num_images - 1}.")
  images = np.asarray(image_embeddings[rows], np.float32)
  num_concepts = text_embeddings.shape[0]
  if images.shape[1] != text_embeddings.shape[1]:
    raise ValueError(f"{name}: image and text embeddings differ in width "
                     f"({images.shape[1]} vs {text_embeddings.shape[1]}).")
  soft = membership is not None
  return _top_k_log_likelihood_jit(
      _normalise(images), _normalise(text_embeddings),
      jnp.asarray(local_ids.reshape(top_images.shape), jnp.int32),
      jnp.asarray(membership if soft else np.ones(top_k), jnp.float32), a, min_prob,
      soft=soft, chunk=_neuron_chunk(top_k, num_concepts), term_floor=term_floor)


# Only hashable settings are static, so layers of equal shapes share one compilation.
@functools.partial(jax.jit, static_argnames=("soft", "chunk", "term_floor"))
def _top_k_log_likelihood_jit(images, texts, top_images, membership, a, min_prob, *,
                              soft, chunk, term_floor):
  def neuron(image_ids):  # (top_k,) -> (num_concepts,)
    probs = jax.nn.softmax(a * _rows(images[image_ids], texts), axis=-1)
    if soft:
      return similarity.sum_of_logs_of_bounded(
          1.0 + membership[:, None] * (probs - 1.0) + min_prob, term_floor)
    return jnp.sum(jnp.log(probs + min_prob), axis=0)

  return jax.lax.map(neuron, top_images, batch_size=chunk)


def wpmi(image_embeddings, text_embeddings, activations, top_k=28, a=2.0, lam=0.6,
         min_prob=1e-7, return_log_likelihood=False, top_images=None):
  """similarity.wpmi(P, A) without P. image_embeddings: (num_images, dim), may be a
  memmap; top_images: see _top_k_log_likelihood."""
  log_likelihood = _top_k_log_likelihood(image_embeddings, text_embeddings, activations,
                                         top_k, a, min_prob, "wpmi",
                                         top_images=top_images)
  scores = similarity._subtract_prior(log_likelihood, lam)  # pylint: disable=protected-access
  return (scores, log_likelihood) if return_log_likelihood else scores


def soft_wpmi(image_embeddings, text_embeddings, activations, top_k=100, a=10.0, lam=1.0,
              min_prob=1e-7, p_start=0.998, p_end=0.97, return_log_likelihood=False,
              top_images=None):
  """similarity.soft_wpmi(P, A) without P. image_embeddings: (num_images, dim), may be
  a memmap; top_images: see _top_k_log_likelihood."""
  log_likelihood = _top_k_log_likelihood(
      image_embeddings, text_embeddings, activations, top_k, a, min_prob, "soft_wpmi",
      membership=similarity.soft_wpmi_membership(top_k, p_start, p_end),
      term_floor=similarity.soft_wpmi_term_floor(p_start, p_end, min_prob),
      top_images=top_images)
  scores = similarity._subtract_prior(log_likelihood, lam)  # pylint: disable=protected-access
  return (scores, log_likelihood) if return_log_likelihood else scores


def _image_chunks(num_images: int, size: int):
  return [(start, min(start + size, num_images)) for start in range(0, num_images, size)]


def cos_similarity(image_embeddings, text_embeddings, activations):
  """similarity.cos_similarity(P, A) without P: A^T P and the column norms of P summed
  over image chunks."""
  _check(image_embeddings, text_embeddings, activations, "cos_similarity")
  images, texts = _normalise(image_embeddings), _normalise(text_embeddings)
  activations = jnp.asarray(activations, jnp.float32)
  # Scale-free: divide by the column max first, as the in-memory function does.
  activations = activations / similarity._max_abs(activations)  # pylint: disable=protected-access
  num_images, num_concepts = activations.shape[0], texts.shape[0]
  size = _image_chunk(num_images, num_concepts, activations.shape[1])
  # P lies in [-1, 1], so its squares and products need no rescaling.
  cross = jnp.zeros((activations.shape[1], num_concepts), jnp.float32)
  squares = jnp.zeros((num_concepts,), jnp.float32)
  for start, stop in _image_chunks(num_images, size):
    cross, squares = _cos_step(cross, squares, images[start:stop], texts,
                               activations[start:stop])
  neuron_norms = jnp.maximum(jnp.linalg.norm(activations, axis=0), similarity.TINY)
  concept_norms = jnp.maximum(jnp.sqrt(squares), similarity.TINY)
  return cross / neuron_norms[:, None] / concept_norms[None, :]


@jax.jit
def _cos_step(cross, squares, images, texts, activations):
  rows = _rows(images, texts)
  cross = cross + jnp.matmul(activations.T, rows, precision=jax.lax.Precision.HIGHEST)
  return cross, squares + jnp.sum(rows * rows, axis=0)


def cos_similarity_cubed(image_embeddings, text_embeddings, activations, min_norm=1e-3):
  """similarity.cos_similarity_cubed(P, A) without P: the column means of P in a first
  pass over image chunks, then the cubed, centred cross products and norms."""
  _check(image_embeddings, text_embeddings, activations, "cos_similarity_cubed")
  images, texts = _normalise(image_embeddings), _normalise(text_embeddings)
  activations = jnp.asarray(activations, jnp.float32)
  num_images, num_concepts = activations.shape[0], texts.shape[0]
  chunks = _image_chunks(num_images, _image_chunk(num_images, num_concepts,
                                                  activations.shape[1]))
  sums = jnp.zeros((num_concepts,), jnp.float32)
  for start, stop in chunks:
    sums = sums + jnp.sum(_rows(images[start:stop], texts), axis=0)
  means = sums / num_images
  # The neuron side fits in memory (images x neurons): normalised as in similarity.py.
  neurons = similarity._centre_cube_normalise(activations, min_norm)  # pylint: disable=protected-access
  cross = jnp.zeros((activations.shape[1], num_concepts), jnp.float32)
  cubed_squares = jnp.zeros((num_concepts,), jnp.float32)
  for start, stop in chunks:
    cross, cubed_squares = _cos_cubed_step(cross, cubed_squares, images[start:stop], texts,
                                           neurons[start:stop], means)
  # P's centred values lie in [-2, 2]: their cubes need no rescaling before the norm.
  norms = jnp.maximum(jnp.sqrt(cubed_squares), min_norm)
  return cross / norms[None, :]


@jax.jit
def _cos_cubed_step(cross, cubed_squares, images, texts, neurons, means):
  cubes = (_rows(images, texts) - means[None, :]) ** 3
  cross = cross + jnp.matmul(neurons.T, cubes, precision=jax.lax.Precision.HIGHEST)
  return cross, cubed_squares + jnp.sum(cubes * cubes, axis=0)


FUNCTIONS = {"soft_wpmi": soft_wpmi, "wpmi": wpmi, "cos_similarity": cos_similarity,
             "cos_similarity_cubed": cos_similarity_cubed}

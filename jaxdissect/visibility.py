"""Which concepts the probe images show, by CLIP's own judgement: a label should name
something that is there.

An image shows concept c when c is among the image's `rank` highest concepts by CLIP
similarity, P[i, c] = norm(I_i) . norm(t_c) (ties as lax.top_k breaks them: the lower
concept index first). A concept is visible in the probe set when at least
`min_images` images show it. Nothing here reads annotations: it is the filter of
Label-free Concept Bottleneck Models (Oikarinen et al., ICLR 2023, "remove concepts
that do not activate CLIP highly on the probe images"), with a rank instead of a
model-specific similarity threshold.

Why: a word that names nothing in the images can still have a P column that tracks a
hidden unit (it shares directions of the embedding space with what the images show).
On the synthetic world two thirds of layer1's correlation labels were such words,
right by every annotation-free score and wrong by construction; no image ranks any of
them in its top 8 of the 56 concepts, while every word of the world is in the top 5
of at least 264 of 2,000 images on each of 3 draws (BENCHMARKS.md). The correlation
labels, the linear explanations and the compositional candidates choose among visible
concepts; descriptions.csv keeps the run's (soft-)WPMI label over all concepts, as the
paper does.

rank = max(MIN_RANK, ceil(top_share x concepts)): 5 of the synthetic world's 56
concepts, 200 of the 20k-word set (an image of a red car may rank "red" far below the
car's names, not below 1% of the words). One streaming pass over the image embeddings
in blocks, the (block, concepts) similarities never more than BLOCK_BYTES; the counts
are exact integers, independent of the block size and of the devices the blocks'
images are split over.
"""
import csv
import dataclasses
import functools
import io
import math

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec

from jaxdissect import sharding
from jaxdissect import similarity

MIN_RANK = 5
DEFAULT_TOP_SHARE = 0.01
DEFAULT_MIN_IMAGES = 5
# Bytes of one (images, concepts) float32 block of similarities.
BLOCK_BYTES = 128 * 1024 * 1024


@dataclasses.dataclass
class ConceptVisibility:
  """images_showing: (num_concepts,) int64, the probe images that rank each concept
  among their top `rank`; visible: (num_concepts,) bool, images_showing >= min_images,
  or every concept where none reaches it (the filter is then off, `fallback` True)."""
  images_showing: np.ndarray
  rank: int
  min_images: int
  visible: np.ndarray
  fallback: bool = False

  def to_csv(self, concepts) -> str:
    """concept_visibility.csv: concept,images_showing,visible (true/false)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["concept", "images_showing", "visible"])
    for name, count, seen in zip(concepts, self.images_showing, self.visible):
      writer.writerow([name, int(count), str(bool(seen)).lower()])
    return out.getvalue()


def visible_rank(num_concepts: int, top_share: float = DEFAULT_TOP_SHARE) -> int:
  """The rank an image must give a concept to show it (at most num_concepts)."""
  return int(min(num_concepts, max(MIN_RANK, math.ceil(top_share * num_concepts))))


def _block_counts(images, texts, valid, rank: int):
  """images: (B, D) f32 normalised, texts: (M, D) f32 normalised, valid: (B,) bool ->
  (M,) int32 how many valid images of the block rank each concept in their top `rank`."""
  similarities = images @ texts.T
  _, ids = jax.lax.top_k(similarities, rank)
  weights = jnp.broadcast_to(valid[:, None], ids.shape).astype(jnp.int32)
  return jnp.zeros(texts.shape[0], jnp.int32).at[ids.ravel()].add(weights.ravel())


@functools.lru_cache(maxsize=None)
def _counter(mesh: Mesh | None, rank: int):
  """_block_counts jitted; over a mesh, the block's images split over its devices and
  the counts summed (integers: equal to the unsharded ones)."""
  body = functools.partial(_block_counts, rank=rank)
  if mesh is None or mesh.devices.size == 1:
    return jax.jit(body)
  split, replicated = PartitionSpec(sharding.DATA_AXIS), PartitionSpec()
  return jax.jit(jax.shard_map(
      lambda images, texts, valid: jax.lax.psum(body(images, texts, valid),
                                                sharding.DATA_AXIS),
      mesh=mesh, in_specs=(split, replicated, split), out_specs=replicated))


def _normalise(rows) -> np.ndarray:
  """Rows as float32 unit vectors, as the similarity's P normalises them."""
  return similarity.l2_normalise(np.asarray(rows, np.float32), axis=1, xp=np)


def images_showing(image_embeddings, text_embeddings, rank: int,
                   block_images: int | None = None, mesh: Mesh | None = None
                   ) -> np.ndarray:
  """(num_concepts,) int64: per concept, the images ranking it in their top `rank`.

  image_embeddings: (num_images, dim), may be a memmap (read a block at a time);
  text_embeddings: (num_concepts, dim); mesh: each block's images split over its
  devices, or None."""
  num_concepts = len(text_embeddings)
  if not 1 <= rank <= num_concepts:
    raise ValueError(f"rank must be between 1 and the {num_concepts} concepts, got {rank}.")
  texts = jnp.asarray(_normalise(text_embeddings))
  num_images = len(image_embeddings)
  devices = 1 if mesh is None else mesh.devices.size
  block = block_images or max(1, min(num_images, BLOCK_BYTES // (4 * num_concepts)))
  block = -(-block // devices) * devices
  count_block = _counter(mesh, rank)
  counts = np.zeros(num_concepts, np.int64)
  for start in range(0, num_images, block):
    rows = _normalise(image_embeddings[start:start + block])
    valid = np.zeros(block, bool)
    valid[:len(rows)] = True
    padded = np.zeros((block, rows.shape[1]), np.float32)
    padded[:len(rows)] = rows  # one compilation: every block has the same shape
    counts += np.asarray(count_block(jnp.asarray(padded), texts, jnp.asarray(valid)),
                         np.int64)
  return counts


def concept_visibility(image_embeddings, text_embeddings,
                       top_share: float = DEFAULT_TOP_SHARE,
                       min_images: int = DEFAULT_MIN_IMAGES,
                       mesh: Mesh | None = None) -> ConceptVisibility:
  """Which concepts the probe images show (module docstring). min_images = 0: every
  concept is visible (the filter is off); mesh: as images_showing."""
  if min_images < 0:
    raise ValueError(f"min_images must be 0 (off) or more, got {min_images}.")
  if not 0.0 <= top_share <= 1.0:
    raise ValueError(f"top_share must be between 0 and 1, got {top_share}.")
  num_concepts = len(text_embeddings)
  rank = visible_rank(num_concepts, top_share)
  if min_images == 0:
    return ConceptVisibility(np.zeros(num_concepts, np.int64), rank, 0,
                             np.ones(num_concepts, bool))
  counts = images_showing(image_embeddings, text_embeddings, rank, mesh=mesh)
  visible = counts >= min_images
  fallback = not visible.any()
  if fallback:
    logging.warning("No concept is among the top %d of %d or more probe images: the "
                    "explanations choose among all %d concepts. Lower "
                    "--config.visible_min_images or use more probe images.", rank,
                    min_images, num_concepts)
    visible = np.ones(num_concepts, bool)
  else:
    logging.info("Concepts the probe shows (top %d of %d or more images): %d of %d.",
                 rank, min_images, int(visible.sum()), num_concepts)
  return ConceptVisibility(counts, rank, min_images, visible, fallback)

"""Every name a user can choose, and the defaults behind each, in one place.

config.validate, the similarity functions' signatures, the labelling policy, the CLIs
and the benchmarks read these instead of spelling them again.
"""
import dataclasses
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class SimilarityFunction:
  """A similarity function's properties (its formula: docs/DESIGN.md).

  name: as config.similarity_fn says it. defaults: its keyword constants, as in the
  paper's code. top_k: the images per unit it reads (the prior functions), else None.
  min_images: the fewest probe images it accepts with its defaults. prior: whether its
  scores couple all units of a layer (the (soft-)WPMI prior). streams: whether it has
  a form that computes P from the embeddings instead of holding it.
  """
  name: str
  defaults: Mapping[str, Any]
  min_images: int
  prior: bool = False
  streams: bool = False

  @property
  def top_k(self) -> int | None:
    return self.defaults.get("top_k") if self.prior else None


SIMILARITY = {f.name: f for f in (
    SimilarityFunction("soft_wpmi", dict(top_k=100, a=10.0, lam=1.0, min_prob=1e-7,
                                         p_start=0.998, p_end=0.97),
                       min_images=100, prior=True, streams=True),
    SimilarityFunction("wpmi", dict(top_k=28, a=2.0, lam=0.6, min_prob=1e-7),
                       min_images=28, prior=True, streams=True),
    SimilarityFunction("rank_reorder", dict(top_fraction=0.05, p=3, scale_p=0.5, seed=0),
                       min_images=40),
    SimilarityFunction("cos_similarity_cubed", dict(min_norm=1e-3), min_images=2,
                       streams=True),
    SimilarityFunction("cos_similarity", {}, min_images=2, streams=True),
)}
SIMILARITY_FUNCTIONS = tuple(SIMILARITY)
PRIOR_FUNCTIONS = tuple(n for n, f in SIMILARITY.items() if f.prior)
STREAMING_FUNCTIONS = tuple(n for n, f in SIMILARITY.items() if f.streams)
DEFAULT_SIMILARITY = "soft_wpmi"
# Largest images x concepts matrix P (GB) held in memory; beyond it P is streamed.
DEFAULT_CONCEPT_MATRIX_MAX_GB = 2.0

# Streamed (soft-)WPMI: the implementation and the dtype of its products.
KERNELS = ("auto", "jnp", "pallas")
COMPUTE_DTYPES = ("float32", "bfloat16")

# How a layer output becomes (batch, units): over space, and for token sequences.
POOL_MODES = ("avg", "max")
TOKEN_POOL_MODES = ("cls", "avg_patches")
ON_BAD_IMAGE = ("skip", "error")

# Normalisation constants of the two image families (RGB, 0-1 pixels).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

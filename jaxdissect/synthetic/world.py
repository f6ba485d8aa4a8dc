"""A procedural world with known answers: 64x64 scenes of shapes on backgrounds.

Every object has a shape, a colour and a texture; every scene a background. Each
rendered image comes with its annotation (the objects and the background), a caption,
and a per-pixel mask per concept, so labels of neurons can be checked against truth.
Rendering is NumPy, seeded, and about a millisecond an image.
"""
import dataclasses
import os
from typing import Sequence

import numpy as np

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "heart", "diamond")
COLOURS = {
    "red": (215, 35, 35), "green": (40, 170, 50), "blue": (35, 70, 215),
    "yellow": (240, 215, 40), "orange": (245, 135, 25), "purple": (135, 45, 175),
    "white": (245, 245, 245), "black": (25, 25, 25),
}
TEXTURES = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS = ("grass", "sky", "sand", "water")
# Backgrounds never seen in training: the shifted probe distribution.
SHIFTED_BACKGROUNDS = ("snow", "brick", "night", "wood")
ATTRIBUTE_WORDS = SHAPES + tuple(COLOURS) + TEXTURES + BACKGROUNDS
# Words that name nothing in this world: a label that picks one is wrong by construction.
DISTRACTORS = (
    "car", "dog", "cat", "tree", "house", "music", "happy", "money", "window", "bread",
    "river", "mountain", "phone", "chair", "bottle", "cloud", "horse", "road", "book",
    "computer", "flower", "bird", "shoe", "clock", "guitar", "pizza", "bridge", "rain",
    "fire", "train", "table", "glass",
)
CONCEPTS = ATTRIBUTE_WORDS + DISTRACTORS
# Words the CLIP is trained to match no image (train.py, second stage), so that words
# outside the world do not embed at random. Disjoint from DISTRACTORS on purpose: the
# concept set's distractors stay unseen, and labels picking them stay wrong.
TRAINING_NEGATIVES = (
    "apple", "baby", "ball", "bank", "beach", "bed", "bicycle", "boat", "boy", "box",
    "bus", "butter", "cake", "camera", "candle", "castle", "city", "coat", "coffee",
    "cow", "cup", "dance", "desk", "doctor", "door", "dragon", "dress", "duck", "egg",
    "engine", "farm", "fish", "forest", "fork", "friend", "garden", "girl", "gold",
    "hammer", "hat", "hill", "hospital", "ice", "island", "jacket", "jungle", "key",
    "king", "kitchen", "knife", "lake", "lamp", "lemon", "letter", "lion", "machine",
    "map", "market", "milk", "monkey", "moon", "mouse", "nose", "ocean", "paper",
    "park", "pencil", "piano", "pig", "plane", "plate", "pocket", "queen", "rabbit",
    "radio", "rice", "robot", "rock", "roof", "rose", "salt", "school", "sheep",
    "ship", "shirt", "soup", "spoon", "street", "sugar", "summer", "sun", "teacher",
    "tiger", "tooth", "towel", "tower", "toy", "truck", "umbrella", "valley", "village",
    "violin", "wall", "watch", "whale", "wheel", "winter", "wolf", "zebra",
)
# The same list as a concept-set file (one concept a line), for configs.
CONCEPTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "concepts.txt")
TEMPLATE_WORDS = ("a", "an", "on", "with", "the", "and", "photo", "of")


@dataclasses.dataclass(frozen=True)
class SceneObject:
  shape: str
  colour: str
  texture: str
  centre: tuple[float, float]  # (y, x) in pixels
  radius: float  # pixels
  angle: float  # radians


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: tuple[SceneObject, ...]
  background: str

  def concepts(self) -> set[str]:
    """Every attribute word true of this scene."""
    words = {self.background}
    for obj in self.objects:
      words |= {obj.shape, obj.colour, obj.texture}
    return words


# ------------------------------------------------------------------ shapes
def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Inside-test in the object's frame (unit radius, v pointing up)."""
  r = np.hypot(u, v)
  theta = np.arctan2(v, u)
  if shape == "circle":
    return r < 0.9
  if shape == "square":
    return np.maximum(np.abs(u), np.abs(v)) < 0.72
  if shape == "triangle":
    return (v > -0.5) & (np.sqrt(3) * u + v < 1.0) & (-np.sqrt(3) * u + v < 1.0)
  if shape == "star":
    spikes = (0.5 + 0.5 * np.cos(5 * (theta - np.pi / 2))) ** 2
    return r < 0.42 + 0.58 * spikes
  if shape == "cross":
    return ((np.abs(u) < 0.28) & (np.abs(v) < 0.95)) | ((np.abs(v) < 0.28) & (np.abs(u) < 0.95))
  if shape == "ring":
    return (r > 0.52) & (r < 0.95)
  if shape == "heart":
    x, y = 1.15 * u, 1.15 * v + 0.15
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 < 0
  if shape == "diamond":
    return np.abs(u) / 0.65 + np.abs(v) < 1.0
  raise ValueError(f"unknown shape {shape!r}")


def _texture_mask(texture: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Where the texture's second colour goes (object frame)."""
  if texture == "plain":
    return np.zeros_like(u, bool)
  if texture == "striped":
    return np.floor(u / 0.3) % 2 == 0
  if texture == "dotted":
    cu, cv = u / 0.45 - np.round(u / 0.45), v / 0.45 - np.round(v / 0.45)
    return np.hypot(cu, cv) < 0.28
  if texture == "checkered":
    return (np.floor(u / 0.38) + np.floor(v / 0.38)) % 2 == 0
  raise ValueError(f"unknown texture {texture!r}")


def _second_colour(rgb: np.ndarray) -> np.ndarray:
  bright = rgb.mean() > 110
  return rgb * 0.3 if bright else np.minimum(rgb + 150, 255)


# ------------------------------------------------------------------ backgrounds
def _background(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
  yy, xx = np.mgrid[0:size, 0:size] / size
  noise = rng.normal(0, 1, (size, size))
  if name == "grass":
    blades = np.sin(xx * 90 + rng.normal(0, 0.4, (1, size)) * 3) * 0.5 + 0.5
    base = np.stack([60 + 25 * blades, 130 + 40 * blades, 45 + 10 * blades], -1)
    return base + 12 * noise[..., None]
  if name == "sky":
    base = np.stack([110 + 60 * yy, 160 + 50 * yy, 235 + 0 * yy], -1)
    clouds = np.zeros((size, size))
    for _ in range(rng.integers(1, 4)):
      cy, cx, rad = rng.random(), rng.random(), 0.08 + 0.12 * rng.random()
      clouds = np.maximum(clouds, np.exp(-((yy - cy) ** 2 + ((xx - cx) / 1.8) ** 2) / rad ** 2))
    cloud = np.asarray([225.0, 235.0, 250.0])  # bluish, so that it is not 'white'
    return base * (1 - clouds[..., None]) + cloud * clouds[..., None] + 4 * noise[..., None]
  if name == "sand":
    ripple = 0.5 + 0.5 * np.sin((yy + 0.2 * xx) * 40 + rng.random() * 6)
    base = np.stack([210 + 15 * ripple, 185 + 15 * ripple, 130 + 10 * ripple], -1)
    return base + 14 * noise[..., None]
  if name == "water":
    waves = 0.5 + 0.5 * np.sin(yy * 55 + np.sin(xx * 12 + rng.random() * 6) * 1.5)
    base = np.stack([30 + 30 * waves, 110 + 50 * waves, 160 + 50 * waves], -1)
    return base + 6 * noise[..., None]
  if name == "snow":
    return np.stack([232 + 0 * yy, 236 + 0 * yy, 242 + 0 * yy], -1) + 8 * noise[..., None]
  if name == "brick":
    row = np.floor(yy * 8)
    mortar = ((yy * 8) % 1 < 0.12) | (((xx * 4 + 0.5 * (row % 2)) % 1) < 0.06)
    base = np.where(mortar[..., None], [200, 195, 185], [150, 65, 45]).astype(float)
    return base + 10 * noise[..., None]
  if name == "night":
    base = np.stack([15 + 0 * yy, 20 + 0 * yy, 55 + 20 * yy], -1)
    stars = rng.random((size, size)) < 0.01
    return np.where(stars[..., None], 230.0, base) + 3 * noise[..., None]
  if name == "wood":
    grain = 0.5 + 0.5 * np.sin(xx * 60 + 4 * np.sin(yy * 7 + rng.random() * 6))
    base = np.stack([120 + 40 * grain, 80 + 25 * grain, 40 + 10 * grain], -1)
    return base + 6 * noise[..., None]
  raise ValueError(f"unknown background {name!r}")


# ------------------------------------------------------------------ scenes
def sample_scene(rng: np.random.Generator, backgrounds: Sequence[str] = BACKGROUNDS,
                 max_objects: int = 2, size: int = IMAGE_SIZE) -> Scene:
  num_objects = 1 if max_objects == 1 or rng.random() < 0.6 else int(
      rng.integers(2, max_objects + 1))
  objects = []
  for _ in range(num_objects):
    # Large enough to span several 8x8 patches: shape is what a small ViT learns last.
    radius = float(rng.uniform(0.2, 0.34) * size)
    margin = radius * 0.6
    objects.append(SceneObject(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=tuple(COLOURS)[rng.integers(len(COLOURS))],
        texture=TEXTURES[rng.integers(len(TEXTURES))],
        centre=(float(rng.uniform(margin, size - margin)),
                float(rng.uniform(margin, size - margin))),
        radius=radius, angle=float(rng.uniform(-np.pi, np.pi))))
  return Scene(tuple(objects), backgrounds[rng.integers(len(backgrounds))])


def render(scene: Scene, rng: np.random.Generator,
           size: int = IMAGE_SIZE) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Returns (image uint8 (size, size, 3), {concept: bool mask (size, size)})."""
  image = _background(scene.background, rng, size)
  masks: dict[str, np.ndarray] = {}
  covered = np.zeros((size, size), bool)
  yy, xx = np.mgrid[0:size, 0:size] + 0.5
  for obj in scene.objects:
    dy, dx = (yy - obj.centre[0]) / obj.radius, (xx - obj.centre[1]) / obj.radius
    cos, sin = np.cos(obj.angle), np.sin(obj.angle)
    u, v = cos * dx + sin * dy, sin * dx - cos * dy
    inside = _shape_mask(obj.shape, u, v)
    rgb = np.asarray(COLOURS[obj.colour], float)
    second = _texture_mask(obj.texture, u, v) & inside
    image[inside] = rgb
    image[second] = _second_colour(rgb)
    # Later objects cover earlier ones.
    for key in list(masks):
      masks[key] = masks[key] & ~inside
    covered |= inside
    for word, region in ((obj.shape, inside), (obj.colour, inside & ~second),
                         (obj.texture, inside)):
      masks[word] = masks.get(word, np.zeros_like(inside)) | region
  masks[scene.background] = ~covered
  image += rng.normal(0, 3, image.shape)
  return np.clip(np.round(image), 0, 255).astype(np.uint8), masks


def annotation_matrix(scenes: Sequence[Scene], words: Sequence[str]) -> np.ndarray:
  """(num_scenes, len(words)) float32: 1 where the word is true of the scene (its
  annotation names it); words a scene has but `words` lacks are left out."""
  index = {word: i for i, word in enumerate(words)}
  matrix = np.zeros((len(scenes), len(words)), np.float32)
  for row, scene in enumerate(scenes):
    matrix[row, [index[w] for w in scene.concepts() if w in index]] = 1.0
  return matrix


def caption(scene: Scene, rng: np.random.Generator) -> str:
  """A caption naming a random subset of one object's attributes and maybe the background,
  in a random order: single words are frequent so that they embed well."""
  obj = scene.objects[rng.integers(len(scene.objects))]
  # Shape words most often: colour and background are learnt first anyway.
  words = [w for w, keep in ((obj.colour, rng.random() < 0.5),
                             (obj.texture, rng.random() < 0.5),
                             (obj.shape, rng.random() < 0.75)) if keep]
  if rng.random() < 0.25 or not words:
    words.append(scene.background)
  if rng.random() < 0.3:
    rng.shuffle(words)
  elif len(words) > 1 and words[-1] == scene.background and rng.random() < 0.5:
    words.insert(len(words) - 1, "on")
  if rng.random() < 0.25:
    words.insert(0, "a")
  return " ".join(words)


def caption_matches(caption_text: str, scene: Scene) -> bool:
  """Whether every attribute word of a caption holds of one object (and the background)."""
  words = [w for w in caption_text.split() if w not in TEMPLATE_WORDS]
  if any(w in BACKGROUNDS + SHIFTED_BACKGROUNDS and w != scene.background for w in words):
    return False
  object_words = [w for w in words if w not in BACKGROUNDS + SHIFTED_BACKGROUNDS]
  if not object_words:
    return True
  return any(all(w in (o.shape, o.colour, o.texture) for w in object_words)
             for o in scene.objects)


def make_dataset(num_images: int, seed: int, backgrounds: Sequence[str] = BACKGROUNDS,
                 max_objects: int = 2, with_masks: bool = False):
  """(images (N, 64, 64, 3) uint8, scenes, masks or None)."""
  rng = np.random.default_rng(seed)
  images = np.zeros((num_images, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  scenes, masks = [], []
  for i in range(num_images):
    scene = sample_scene(rng, backgrounds, max_objects)
    images[i], scene_masks = render(scene, rng)
    scenes.append(scene)
    if with_masks:
      masks.append(scene_masks)
  return images, scenes, (masks if with_masks else None)


PROBE_SETS = {
    # name: (backgrounds, max_objects, seed offset)
    "in_dist": (BACKGROUNDS, 2, 0),
    "shifted": (SHIFTED_BACKGROUNDS, 2, 1_000_003),
}


def render_probe_set(name: str, num_images: int, seed: int = 0, with_masks: bool = False):
  """make_dataset for one of PROBE_SETS: (images, scenes, masks or None)."""
  backgrounds, max_objects, offset = PROBE_SETS[name]
  return make_dataset(num_images, seed + offset, backgrounds, max_objects, with_masks)

"""The embedded offline default: the synthetic world, where the truth is known.

    python main.py --config configs/synthetic.py

Renders 2,000 probe scenes, dissects the trained shape classifier (conv1..layer4, fc)
and the planted network (planted.colour, planted.texture) with the CLIP trained on the
world (checkpoints committed in jaxdissect/synthetic/checkpoints), over 56 concepts
(every attribute word plus distractors), and writes evaluation.json beside the results.

    python main.py --config configs/synthetic.py:smoke

is the same run shrunk for tests and a first look: 400 scenes, the deeper layers only,
50 permutations per unit for the p-values.
"""
import os

from jaxdissect import config as base_config
from jaxdissect.synthetic import train as synthetic_train
from jaxdissect.synthetic import world


def get_config(variant: str = ""):
  config = base_config.get_base_config()
  config.clip_model = os.path.join(synthetic_train.CHECKPOINT_DIR, "clip")
  config.target_model = "python:jaxdissect.synthetic.planted:make_target"
  config.target_layers = ("conv1,layer1,layer2,layer3,layer4,fc,"
                          "planted.colour,planted.texture")
  config.d_probe = "synthetic:in_dist:2000"
  config.concept_set = world.CONCEPTS_FILE
  config.batch_size = 100
  config.log_every_s = 5.0
  if variant == "smoke":
    config.d_probe = "synthetic:in_dist:400"
    config.target_layers = "layer3,layer4,fc,planted.colour,planted.texture"
    config.trust_permutations = 50
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of configs/synthetic.py: use smoke")
  return config

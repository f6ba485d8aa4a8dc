"""microsoft/resnet-50 (a timm-trained ResNet-50 on the HF hub, not the paper's
torchvision network) dissected as in configs/resnet50.py: the same CLIP, probe set and
concepts; its own id2label names the fc classes.

    python main.py --config configs/resnet50_hf.py
"""
from jaxdissect import config as base_config


def get_config():
  config = base_config.get_base_config()
  config.clip_model = "openai/clip-vit-base-patch16"
  config.target_model = "microsoft/resnet-50"
  config.target_layers = "conv1,layer1,layer2,layer3,layer4"
  config.d_probe = "tfds:imagenet2012:validation"
  config.concept_set = "clip_dissect:20k"
  config.sentence_model = "sentence-transformers/all-mpnet-base-v2"
  return config

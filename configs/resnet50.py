"""The paper's setup: ResNet-50 (ImageNet) dissected on ImageNet val with CLIP ViT-B/16.

python main.py --config configs/resnet50.py
Needs the HF hub (or local copies of both models) and imagenet2012 prepared for TFDS
(TFDS_DATA_DIR). Every field of jaxdissect.config.get_base_config() can be overridden.
"""
from jaxdissect import config as base_config


def get_config():
  config = base_config.get_base_config()
  config.clip_model = "openai/clip-vit-base-patch16"
  config.target_model = "microsoft/resnet-50"
  config.target_layers = "conv1,layer1,layer2,layer3,layer4"
  config.d_probe = "tfds:imagenet2012:validation"
  config.concept_set = "wordfreq:en:20000"
  config.similarity_fn = "soft_wpmi"
  config.pool_mode = "avg"
  config.batch_size = 256
  return config

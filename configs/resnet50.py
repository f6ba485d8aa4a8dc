"""The paper's experiment: torchvision's ResNet-50 (IMAGENET1K_V1) dissected on ImageNet
val with CLIP ViT-B/16, the authors' 20k word list and soft-WPMI.

    python main.py --config configs/resnet50.py

Resources (pinned by URL and sha256, fetched once into ~/.cache/jaxdissect, or
JAXDISSECT_CACHE; see jaxdissect/resources.py): the torchvision weights
(`torchvision:resnet50`, converted to Flax once without torch), the authors' 20k.txt and
imagenet_labels.txt (`clip_dissect:...`, their repository at a pinned commit). Also
needed: openai/clip-vit-base-patch16 (hub or a local directory) and imagenet2012
prepared for TFDS (TFDS_DATA_DIR). Offline: set CLIP_DISSECT_DATA and JAXDISSECT_RESNET50
to local copies, or override the fields. With fc in target_layers, evaluation.json
scores its labels against the ImageNet class names with all-mpnet-base-v2, as the
authors' notebooks do. configs/resnet50_hf.py dissects microsoft/resnet-50 instead.
"""
from jaxdissect import config as base_config


def get_config():
  config = base_config.get_base_config()
  config.clip_model = "openai/clip-vit-base-patch16"
  config.target_model = "torchvision:resnet50"
  config.target_layers = "conv1,layer1,layer2,layer3,layer4"
  config.d_probe = "tfds:imagenet2012:validation"
  config.concept_set = "clip_dissect:20k"
  config.class_names = "clip_dissect:imagenet_labels"
  config.sentence_model = "sentence-transformers/all-mpnet-base-v2"
  return config

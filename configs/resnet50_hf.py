"""microsoft/resnet-50 (a timm-trained ResNet-50 on the HF hub, not the paper's
torchvision network) dissected as in configs/resnet50.py: the same CLIP, probe set,
concepts and evaluation; its own id2label names the fc classes.

    python main.py --config configs/resnet50_hf.py
"""
from configs import resnet50


def get_config():
  config = resnet50.get_config()
  config.target_model = "microsoft/resnet-50"
  config.class_names = ""
  return config

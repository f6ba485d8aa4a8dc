"""Offline demo on tiny random-weight models (labels are meaningless: it shows the pipeline).

    python -m jaxdissect.tiny_models --out ./workdir/demo
    python main.py --config configs/demo.py --workdir ./workdir

Its results go to ./workdir/demo/results (beside the models it reads), not the
synthetic default's ./workdir/results.
"""
from jaxdissect import config as base_config


def get_config():
  config = base_config.get_base_config()
  config.clip_model = "<workdir>/demo/clip"
  config.target_model = "<workdir>/demo/resnet"
  config.target_layers = "conv1,layer1,layer2,layer3,layer4,fc"
  config.d_probe = "folder:<workdir>/demo/images"
  config.concept_set = "<workdir>/demo/concepts.txt"
  config.activation_dir = "<workdir>/demo/activations"
  config.result_dir = "<workdir>/demo/results"
  config.batch_size = 32
  config.log_every_s = 2.0
  return config

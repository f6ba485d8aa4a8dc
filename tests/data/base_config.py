"""The base defaults (jaxdissect/config.py) as a config file, for tests that set every
model and data field on the command line and expect <workdir>/results."""
from jaxdissect import config as base_config


def get_config():
  return base_config.get_base_config()

"""Dissects a vision network: python main.py --config configs/resnet50.py [--workdir DIR].

Intentionally short: flags, logging of the process layout, then jaxdissect.dissect.run.
User errors end with one line naming the config field at fault and exit status 2.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "./workdir", "Where activations and results go.")
_LIST_LAYERS = flags.DEFINE_bool("list_layers", False,
                                 "Print the target's layer names and exit.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (multi-host).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from jaxdissect import errors  # pylint: disable=g-import-not-at-top
  if _CONFIG.value is None:
    print("error: config: no config given. Fix: pass --config configs/resnet50.py.",
          file=sys.stderr)
    sys.exit(2)
  try:
    import jax  # pylint: disable=g-import-not-at-top
    if _DISTRIBUTED.value:
      jax.distributed.initialize()
    logging.info("JAX process %d of %d, %d local device(s).", jax.process_index(),
                 jax.process_count(), jax.local_device_count())
    from jaxdissect import pipeline  # pylint: disable=g-import-not-at-top
    if _LIST_LAYERS.value:
      print(pipeline.list_layers(_CONFIG.value))
      return
    pipeline.run(_CONFIG.value, _WORKDIR.value)
  except errors.UserError as err:
    print(f"error: {err.one_line()}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)

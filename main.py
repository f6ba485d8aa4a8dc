"""Dissects a vision network: python main.py --config configs/resnet50.py [--workdir DIR].

Intentionally short: flags, logging of the process layout, then jaxdissect.cli.run
(jaxdissect.dissect.run, with bad input reported in one line).
User errors end with one line naming the config field at fault and exit status 2.
"""
import logging as std_logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow only runs the tf.data pipeline here (PIL decodes and resizes): no TF math
# op that oneDNN replaces runs, so its start-up notice about oneDNN round-off says
# nothing about this run, and only this switch silences it.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from jaxdissect import entry  # noqa: E402

entry.prepare()  # before anything imports transformers

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
                                 "Call jax.distributed.initialize() (multi-host); the "
                                 "same as --config.distributed=True.")


def _parse_flags(argv):
  """absl parses --config and --config.X before main runs: errors become one line, exit 2."""
  try:
    return flags.FLAGS(argv)
  except Exception as err:  # pylint: disable=broad-except
    # Only the first line: some loaders list every path they tried.
    text = " ".join(str(err).strip().splitlines()[0].split()) if str(err).strip() else ""
    overrides = [a.split("=")[0][len("--config."):] for a in argv[1:]
                 if a.startswith("--config.")]
    field = next((o for o in overrides if f"'{o}'" in text or o in text), "config")
    if field != "config" and isinstance(err, flags.IllegalFlagValueError):
      fix = f"give --config.{field} a value of the field's type."
      problem = f"invalid value ({text[:200]})."
    elif field != "config":
      fix = ("use a field of jaxdissect/config.py:get_base_config() "
             "(python main.py --helpfull lists flags).")
      problem = f"--config.{field} is not a config field ({type(err).__name__}: {text[:200]})."
    else:
      fix = "pass --config with an existing, valid Python config file such as configs/resnet50.py."
      problem = f"cannot load the config ({type(err).__name__}: {text[:300]})."
    print(f"error: {field}: {problem} Fix: {fix}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  try:
    if config is not None:
      config.keys()
  except OSError as err:  # config_flags defers a failed load until first access
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    print(f"error: config: cannot load the config file ({lines[-1] if lines else err}). "
          "Fix: pass --config with an existing Python config file such as "
          "configs/resnet50.py.", file=sys.stderr)
    sys.exit(2)
  if config is None:
    print("error: config: no config given. Fix: pass --config configs/resnet50.py.",
          file=sys.stderr)
    sys.exit(2)
  import jax  # pylint: disable=g-import-not-at-top
  if _DISTRIBUTED.value or config.distributed:
    # CPU processes need a collectives backend for their cross-process steps; TPUs
    # and GPUs ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        config.coordinator_address or None,
        num_processes=config.num_processes or None,
        process_id=config.process_id if config.process_id >= 0 else None)
  cache_dir = entry.use_compilation_cache(config.compilation_cache_dir)
  # Known, harmless start-up notices: JAX looking for a TPU on machines without one, and
  # transformers announcing that v5 drops Flax (this project pins transformers<5).
  std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)
  std_logging.getLogger("transformers.modeling_flax_utils").setLevel(std_logging.ERROR)
  logging.info("JAX process %d of %d, %d local device(s); compilation cache: %s.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               cache_dir or "off")
  from jaxdissect import cli  # pylint: disable=g-import-not-at-top
  try:
    status = cli.run(config, _WORKDIR.value, _LIST_LAYERS.value)
  finally:
    entry.finish()
  if status:
    sys.exit(status)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)

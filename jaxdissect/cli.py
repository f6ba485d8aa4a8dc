"""main.py's work once its flags are parsed, callable in-process: the exit status and,
for bad input, one line on stderr naming the field at fault and the fix. A full disk
or an interrupt (Ctrl-C, SIGTERM) also ends in one line, saying what a rerun reuses."""
import contextlib
import errno
import os
import signal
import sys
import threading

from jaxdissect import config as config_lib
from jaxdissect import dissect
from jaxdissect import errors
from jaxdissect import resources
from jaxdissect import store
from jaxdissect.models import targets

# Filesystem failures that are the machine's state, not a bug.
_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def layer_table(config) -> str:
  """The table --list_layers prints: friendly names, then every module path."""
  target = targets.load_target(config.target_model, class_names=config.class_names)
  lines = [f"{'name':<50} {'units':>6}  output shape (batch of 1)"]
  lines += [f"{i.name:<50} {i.num_units:>6}  {i.shape}" for i in target.layer_table()]
  return "\n".join(lines)


def run(config, workdir: str, list_layers: bool = False) -> int:
  """0 after a run (or the layer table with list_layers); 2 after a UserError, printed
  as `error: FIELD: problem Fix: ...`. Anything else is a bug and keeps its traceback."""
  try:
    with _sigterm_interrupts():
      if list_layers:
        print(layer_table(config))
      else:
        dissect.run(config, workdir)
  except errors.UserError as err:
    print(f"error: {err.one_line()}", file=sys.stderr)
    return 2
  except OSError as err:
    if err.errno not in _DISK_ERRORS:
      raise
    field = _field_of_path(err.filename, config, workdir)
    print(f"error: {errors.from_os_error(field, err, 'writing').one_line()}",
          file=sys.stderr)
    return 2
  except KeyboardInterrupt as interrupt:
    print(f"interrupted{f' ({interrupt.args[0]})' if interrupt.args else ''}: "
          f"{_saved_work(config, workdir)} Rerun the same command to resume.",
          file=sys.stderr)
    return 130
  return 0


@contextlib.contextmanager
def _sigterm_interrupts():
  """SIGTERM (a scheduler's stop) ends the run as Ctrl-C does, with the same message."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def interrupt(signum, frame):
    del signum, frame
    raise KeyboardInterrupt("SIGTERM")

  before = signal.signal(signal.SIGTERM, interrupt)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, before)


def _resolved(config, workdir: str):
  try:
    return config_lib.resolve_paths(config, workdir)
  except Exception:  # pylint: disable=broad-except
    return config


def _field_of_path(path, config, workdir: str) -> str:
  resolved = _resolved(config, workdir)
  path = os.path.abspath(str(path or ""))
  activation_dir = os.path.abspath(resolved.activation_dir)
  return "activation_dir" if path.startswith(activation_dir + os.sep) else "result_dir"


def _saved_work(config, workdir: str) -> str:
  """What an interrupted run leaves for the next: stored passes and saved chunks."""
  activation_dir = _resolved(config, workdir).activation_dir
  entries = chunks = 0
  for name in store.listdir(activation_dir):
    entries += name.startswith("probe-")
    if name.startswith("partial-"):
      chunks += sum(n.startswith("chunk-")
                    for n in store.listdir(resources.join_path(activation_dir, name)))
  kept = [f"{n} {what}" for n, what in ((entries, "stored probe pass(es)"),
                                       (chunks, "saved chunk(s) of an unfinished pass"))
          if n]
  if not kept:
    return f"nothing was saved under {activation_dir} yet, and no results were written."
  return (f"{' and '.join(kept)} under {activation_dir} are kept and reused where they "
          "match; no results were written.")

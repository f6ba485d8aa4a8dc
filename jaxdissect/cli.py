"""main.py's work once its flags are parsed, callable in-process: the exit status and,
for bad input, one line on stderr naming the field at fault and the fix."""
import sys

from jaxdissect import dissect
from jaxdissect import errors
from jaxdissect.models import targets


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
    if list_layers:
      print(layer_table(config))
    else:
      dissect.run(config, workdir)
  except errors.UserError as err:
    print(f"error: {err.one_line()}", file=sys.stderr)
    return 2
  return 0

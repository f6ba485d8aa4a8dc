"""main.py's work once its flags are parsed, callable in-process: the exit status and,
for bad input, one line on stderr naming the field at fault and the fix."""
import sys

from jaxdissect import dissect
from jaxdissect import errors


def run(config, workdir: str, list_layers: bool = False) -> int:
  """0 after a run (or the layer table with list_layers); 2 after a UserError, printed
  as `error: FIELD: problem Fix: ...`. Anything else is a bug and keeps its traceback."""
  try:
    if list_layers:
      print(dissect.list_layers(config))
    else:
      dissect.run(config, workdir)
  except errors.UserError as err:
    print(f"error: {err.one_line()}", file=sys.stderr)
    return 2
  return 0

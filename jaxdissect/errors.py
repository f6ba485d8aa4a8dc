"""User-facing errors: each names the config field at fault and the fix.

main.py prints these as one line and exits with status 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
  """Bad input from the user.

  Attributes:
    field: the config field (or argument) at fault, e.g. "target_layers".
    problem: what is wrong.
    fix: what to do about it.
  """

  def __init__(self, field: str, problem: str, fix: str = ""):
    self.field = field
    self.problem = problem
    self.fix = fix
    super().__init__(self.one_line())

  def one_line(self) -> str:
    text = f"{self.field}: {self.problem}"
    if self.fix:
      text += f" Fix: {self.fix}"
    # One line, whatever the message held.
    return " ".join(text.split())

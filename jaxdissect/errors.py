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


def from_os_error(field: str, err: OSError, doing: str) -> UserError:
  """A filesystem failure while `doing` something with the path of `field`, as a
  UserError naming the path and the cause (disk full, not writable, ...)."""
  import errno  # pylint: disable=g-import-not-at-top
  path = err.filename or "its path"
  causes = {errno.ENOSPC: ("the disk is full", f"free space or point --config.{field} "
                           "at a disk with room"),
            errno.EDQUOT: ("the disk quota is exceeded", "free space in your quota"),
            errno.EROFS: ("the filesystem is read-only",
                          f"point --config.{field} at a writable place"),
            errno.EACCES: ("permission denied", f"make it writable or point "
                           f"--config.{field} elsewhere"),
            errno.ENOTDIR: ("a path component is a file, not a directory",
                            f"point --config.{field} at a directory path"),
            errno.ENOENT: ("it was removed while in use (by another run sharing it?)",
                           "rerun; finished work is reused")}
  cause, fix = causes.get(err.errno, (err.strerror or str(err), f"check --config.{field}"))
  return UserError(field, f"{doing} at {path} failed: {cause}.",
                   f"{fix}; a rerun resumes from what was saved.")

"""What every benchmark script shares: the device record and the atomic JSON write."""
import json
import os
import sys


def device_info() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  return {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
          "cpu_count": os.cpu_count(), "python": sys.version.split()[0]}


def write_json(path: str, payload: dict) -> None:
  """Writes to a temporary name and renames it: never a half-written result file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=1)
  os.replace(tmp, path)

"""One small synthetic-world run through main.py, shared by the tests of evaluation,
the label applications and the report (built once per test process)."""
import functools
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES = 400  # as configs/synthetic.py:smoke says
LAYERS = "layer3,layer4,fc,planted.colour,planted.texture"


def run_module(module, *args, check=True):
  """python -m MODULE ARGS in the repo; returns the CompletedProcess."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  if check and proc.returncode != 0:
    raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return proc


@functools.lru_cache(maxsize=None)
def synthetic_run(concept_set: str = "") -> str:
  """Result directory of configs/synthetic.py on NUM_IMAGES scenes (and another concept
  set if given); the activation store sits beside it in the same workdir."""
  workdir = tempfile.mkdtemp(prefix="synthetic-run-")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
  args = [sys.executable, os.path.join(REPO, "main.py"),
          "--config", os.path.join(REPO, "configs", "synthetic.py") + ":smoke",
          f"--workdir={workdir}"]
  if concept_set:
    args.append(f"--config.concept_set={concept_set}")
  proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=900)
  if proc.returncode != 0:
    raise AssertionError(f"main.py failed:\n{proc.stderr[-4000:]}")
  return os.path.join(workdir, "results")

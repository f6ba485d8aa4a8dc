"""What every command-line entry point (main.py, python -m jaxdissect.X) does around its
work, and only there: a library import changes nothing in the caller's process.

prepare(), before anything imports transformers: transformers imports PyTorch and
TensorFlow at start-up when they are installed, for its PyTorch and TF classes. This
package uses only its Flax models, tokenizers and image processors, which need neither
(PyTorch-format safetensors are read with safetensors' NumPy/Flax loaders), and tf.data
imports TensorFlow on its own where a probe pass needs it. Measured on the synthetic
smoke run with torch installed: 14-16 s to the loaded target, 4.5-5 s with these
defaults. A user's own USE_TORCH / USE_TF still win.

finish(), after the work: Python's last collections at exit scan every object that
TensorFlow, JAX and transformers made (4 s of the synthetic smoke run's 45). gc.freeze()
leaves them out; frozen objects are still freed by reference counting and the atexit
handlers (JAX's, jax.distributed's shutdown) still run, so only cyclic garbage is left
to the operating system.
"""
import gc
import os


def prepare() -> None:
  os.environ.setdefault("USE_TORCH", "0")
  os.environ.setdefault("USE_TF", "0")


def finish() -> None:
  gc.freeze()

"""jaxdissect: CLIP-Dissect in JAX/Flax.

    import jaxdissect
    result = jaxdissect.dissect(target, concepts, images, clip="openai/clip-vit-base-patch16",
                                layers="layer4")
    result.to_dataframe()
"""
import importlib

__version__ = "0.1.0"

# Resolved on first use, so that `python -m jaxdissect.evaluate` (and the other entry
# points) run their module once, not after the package has imported it already.
_EXPORTS = {
    "run": "jaxdissect.dissect",
    "ClipModel": "jaxdissect.models.clip",
    "load_clip": "jaxdissect.models.clip", "TargetModel": "jaxdissect.models.targets",
    "load_target": "jaxdissect.models.targets",
    "ImageTransform": "jaxdissect.data.preprocessing",
}
__all__ = sorted([*_EXPORTS, "dissect"])


def __getattr__(name):
  if name == "dissect":  # the module: calling it dissects (jaxdissect/dissect.py)
    return importlib.import_module("jaxdissect.dissect")
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'jaxdissect' has no attribute {name!r}")

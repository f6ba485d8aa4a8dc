"""jaxdissect: CLIP-Dissect in JAX/Flax.

    import jaxdissect
    result = jaxdissect.dissect(target, concepts, images, clip="openai/clip-vit-base-patch16",
                                layers="layer4")
    result.to_dataframe()
"""
from jaxdissect.pipeline import dissect, list_layers, run  # noqa: F401
from jaxdissect.models.clip import ClipModel, load_clip  # noqa: F401
from jaxdissect.models.targets import TargetModel, load_target  # noqa: F401
from jaxdissect.data.preprocessing import ImageTransform  # noqa: F401

__version__ = "0.1.0"

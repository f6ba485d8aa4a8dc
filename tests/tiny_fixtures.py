"""Tiny models saved once per test process and shared, read-only, by the test classes
that only load them (each save compiles a model init: seconds apiece)."""
import functools
import os
import tempfile

from jaxdissect import tiny_models


@functools.lru_cache(maxsize=None)
def _root() -> str:
  return tempfile.mkdtemp(prefix="tiny-fixtures-")


@functools.lru_cache(maxsize=None)
def clip() -> str:
  """make_tiny_clip's directory (defaults: 32-pixel images, seed 0)."""
  return tiny_models.make_tiny_clip(os.path.join(_root(), "clip"))


@functools.lru_cache(maxsize=None)
def resnet(kind: str = "basic", safetensors: bool = False) -> str:
  return tiny_models.make_tiny_resnet(
      os.path.join(_root(), f"resnet-{kind}-{'st' if safetensors else 'msgpack'}"), kind,
      safetensors=safetensors)


@functools.lru_cache(maxsize=None)
def vit() -> str:
  return tiny_models.make_tiny_vit(os.path.join(_root(), "vit"))

"""The device mesh and shardings, in one place.

One 1-D mesh with axis "data" over every device. The probe pass is data-parallel on it
(batch split over "data", parameters replicated). A jax.sharding.Mesh (Auto axes) is
used on purpose: FlaxCLIPModel under jit raises a ShardingTypeError on the Explicit
axes that jax.make_mesh gives by default.
"""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdissect import errors

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
  devices = jax.devices()
  if num_devices:
    devices = devices[:num_devices]
  return Mesh(np.array(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over "data"."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  devices = mesh.devices.size
  if batch_size % devices:
    raise errors.UserError(
        "batch_size", f"{batch_size} does not split evenly over {devices} devices.",
        f"use a multiple of {devices}, e.g. --config.batch_size="
        f"{max(devices, batch_size // devices * devices)}.")

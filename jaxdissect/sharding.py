"""The device mesh and shardings, in one place.

One 1-D mesh with axis "data" over every device of every process. The probe pass is
data-parallel on it (batch split over "data", parameters replicated); the similarity
splits neurons over the same axis. A jax.sharding.Mesh (Auto axes) is used on purpose:
FlaxCLIPModel under jit raises a ShardingTypeError on the Explicit axes that
jax.make_mesh gives by default.

In a multi-process run each process feeds its own rows of every batch
(put_local_batch) and reads back only its own rows (local_rows).
"""
import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdissect import errors

DATA_AXIS = "data"
# JAX's CPU client uses a NumPy array's memory in place when it is aligned to this many
# bytes, and copies it otherwise.
HOST_ALIGN_BYTES = 64


def make_mesh(num_devices: int | None = None, local: bool = False) -> Mesh:
  """All devices of all processes (jax.devices() is ordered by process), or with
  local=True this process's devices only."""
  devices = jax.local_devices() if local else jax.devices()
  if num_devices:
    devices = devices[:num_devices]
  return Mesh(np.array(devices), (DATA_AXIS,))


def mesh_from_config(config) -> Mesh:
  """The run's mesh: config.num_devices devices (0: every device of every process)."""
  wanted, available = int(config.num_devices), jax.device_count()
  if wanted < 0 or wanted > available:
    raise errors.UserError("num_devices", f"{wanted} devices asked for, {available} "
                           "available.", f"set --config.num_devices between 1 and "
                           f"{available}, or 0 for all.")
  if wanted and wanted != available and jax.process_count() > 1:
    raise errors.UserError("num_devices", "a multi-process run uses every device.",
                           "set --config.num_devices=0.")
  return make_mesh(wanted or None)


def is_multi_process(mesh: Mesh) -> bool:
  return len({d.process_index for d in mesh.devices.flat}) > 1


def shard_offsets(count: int, local_batch: int, shard_index: int,
                  num_shards: int) -> np.ndarray:
  """(rows,) ascending offsets in 0..count-1 of the images process `shard_index` of
  `num_shards` holds: each global batch of num_shards x local_batch consecutive images
  is cut into num_shards consecutive slices, slice p for process p. So every image
  sits at the same position of its local batch as in one process whose batch is
  local_batch, and XLA, whose rounding can depend on that position, gives it the same
  bits (every second image per process, the layout before, did not)."""
  offsets = np.arange(count, dtype=np.int64)
  if num_shards == 1:
    return offsets
  return offsets[(offsets % (local_batch * num_shards)) // local_batch == shard_index]


def to_device(array, dtype=np.float32) -> jax.Array:
  """`array` (NumPy, a memmap, or a jax.Array) as a jax.Array of `dtype` on the default
  device.

  On CPU an unaligned NumPy array is first copied into a HOST_ALIGN_BYTES-aligned buffer
  by NumPy, which JAX then uses in place: JAX's own copy of an unaligned array is about
  3x slower than NumPy's (400 MB, 50,000 x 2,048 activations, on 2 cores: 0.72 s
  against 0.22 s). Elsewhere the host-to-device transfer is the copy.
  """
  if isinstance(array, jax.Array):
    return array if array.dtype == dtype else array.astype(dtype)
  host = np.asarray(array, dtype)
  if (jax.default_backend() == "cpu" and host.nbytes and
      (not host.flags.c_contiguous or host.ctypes.data % HOST_ALIGN_BYTES)):
    raw = np.empty(host.nbytes + HOST_ALIGN_BYTES, np.uint8)
    offset = -raw.ctypes.data % HOST_ALIGN_BYTES
    aligned = raw[offset:offset + host.nbytes].view(host.dtype).reshape(host.shape)
    np.copyto(aligned, host)
    host = aligned
  return jax.device_put(host)


def put_local_batch(arrays, mesh: Mesh | None):
  """Host arrays (this process's rows of a global batch) -> arrays split over "data"."""
  if mesh is None:
    return jax.device_put(arrays)
  data = batch_sharding(mesh)
  if not is_multi_process(mesh):
    return jax.device_put(arrays, data)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(data, x), arrays)


def local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of an array split over "data", in order."""
  if array.is_fully_addressable:
    return np.asarray(array)
  shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def to_host(array: jax.Array) -> np.ndarray:
  """A replicated array as NumPy, in any process."""
  if array.is_fully_addressable:
    return np.asarray(array)
  return np.asarray(array.addressable_data(0))


def allgather(array: np.ndarray) -> np.ndarray:
  """(process_count, *array.shape): every process's `array` (a collective: every process
  must call it at the same point, with the same shape)."""
  return np.asarray(multihost_utils.process_allgather(array))


def all_processes_agree(flag: bool) -> bool:
  """True only if `flag` is true in every process (a collective)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.all(allgather(np.array([flag]))))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over "data"."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def compiled_batch_rows(num_rows: int, batch_size: int) -> int:
  """Rows of each compiled batch when num_rows rows go through a step in batches of at
  most batch_size, the last padded: batch_size, or the next power of two at or above
  num_rows when that is smaller. Callers embed sets of many sizes (a run's concepts,
  each layer's explanation prompts, the evaluation's labels), and every new batch shape
  is a compile; powers of two bound them to a few, at most twice the rows' work."""
  batch_size = max(1, int(batch_size))
  return min(batch_size, 1 << max(0, int(num_rows) - 1).bit_length())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """batch_size is global: split evenly over every device of every process."""
  devices = mesh.devices.size
  if batch_size % devices:
    raise errors.UserError(
        "batch_size", f"{batch_size} does not split evenly over {devices} devices.",
        f"use a multiple of {devices}, e.g. --config.batch_size="
        f"{max(devices, batch_size // devices * devices)}.")

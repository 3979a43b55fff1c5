"""Device mesh and explicit placement for the training script (JAX SPMD).

Every run uses a 2-D `jax.sharding.Mesh` with axes ("data", "model") over all
visible devices (all hosts' devices on a pod):

- the batch is split along "data" (and replicated along "model");
- parameters, optimizer state (masks included) and BatchNorm statistics are
  replicated, except that with `model_parallel` every large kernel (ndim >= 2,
  at least `MODEL_PARALLEL_MIN_SIZE` entries, last axis divisible by the size of
  "model") has its last axis split along "model".

The placement of a leaf is a function of its shape only (`leaf_spec`), so an
optimizer-state leaf or a mask with a parameter's shape gets exactly that
parameter's sharding, and scalar masks (unpruned leaves) are replicated. Without
`model_parallel` the "model" axis has size 1 and training is pure data parallel.

Everything here also runs on one CPU device (a 1 x 1 mesh); on CPU, more devices
can be simulated with `XLA_FLAGS=--xla_force_host_platform_device_count=N`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
MODEL = "model"
# Kernels smaller than this stay replicated under `model_parallel`: splitting
# them saves little memory and costs a collective per use.
MODEL_PARALLEL_MIN_SIZE = 2**14


def model_axis_size(num_devices: int, model_parallel: bool) -> int:
  """Size of the "model" axis: 1, or with `model_parallel` the largest divisor
  `m` of `num_devices` with `m * m <= num_devices` (4 -> 2, 8 -> 2, 16 -> 4)."""
  if not model_parallel:
    return 1
  return max(m for m in range(1, math.isqrt(num_devices) + 1) if num_devices % m == 0)


def make_mesh(model_parallel: bool = False, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "model") mesh over `devices` (default: every visible device)."""
  devices = list(jax.devices() if devices is None else devices)
  m = model_axis_size(len(devices), model_parallel)
  if model_parallel and m == 1:
    print(
      f"warning: model_parallel=True but {len(devices)} device(s) give a model axis of 1; "
      "parameters are replicated",
      flush=True,
    )
  shape = (len(devices) // m, m)
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    # Topologies mesh_utils does not know: plain device order.
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, (DATA, MODEL))


def leaf_spec(shape: Sequence[int], mesh: Mesh, min_size: int = MODEL_PARALLEL_MIN_SIZE) -> P:
  """The PartitionSpec of an array of `shape` held in the train state."""
  m = mesh.shape[MODEL]
  shape = tuple(shape)
  if m > 1 and len(shape) >= 2 and shape[-1] % m == 0 and math.prod(shape) >= min_size:
    return P(*([None] * (len(shape) - 1)), MODEL)
  return P()


def _shape(x: Any) -> tuple:
  return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def state_shardings(tree: Any, mesh: Mesh) -> Any:
  """A NamedSharding per leaf of `tree` (arrays or `jax.ShapeDtypeStruct`s)."""
  return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(_shape(x), mesh)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split along "data", replicated along "model"."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, key: str = "batch_size") -> None:
  """Raises ValueError unless `batch_size` splits evenly over the data axis
  and over the hosts."""
  data = mesh.shape[DATA]
  n = mesh.devices.size
  hosts = jax.process_count()
  if batch_size % data:
    layout = (
      f"{n} devices" if data == n else f"{n} devices as {data} (data) x {mesh.shape[MODEL]} (model)"
    )
    raise ValueError(
      f"{key}={batch_size} is not divisible by the number of devices on the "
      f"data axis ({data}; {layout}). Choose a multiple of {data}, e.g. "
      f"--config.{key}={max(data, batch_size // data * data)}."
    )
  if batch_size % hosts:
    raise ValueError(f"{key}={batch_size} is not divisible by the number of hosts ({hosts}).")


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """This host's rows of a global batch -> global arrays split along "data".

  With one host this is a `device_put`; on a pod every host passes its own
  slice (as produced by `experiments.data.Batches`) and gets the global array.
  """
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(dict(batch), sharding)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
  }


def describe(mesh: Mesh) -> str:
  """E.g. "4 cpu devices, mesh data=4 x model=1, 1 host"."""
  n = mesh.devices.size
  platform = mesh.devices.flat[0].platform
  hosts = jax.process_count()
  return (
    f"{n} {platform} device{'s' * (n != 1)}, mesh {DATA}={mesh.shape[DATA]} x "
    f"{MODEL}={mesh.shape[MODEL]}, {hosts} host{'s' * (hosts != 1)}"
  )

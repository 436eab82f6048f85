"""Several devices and several hosts, with JAX's own machinery: a 2-D device
mesh, `NamedSharding`s, `jax.distributed`. Nothing here is CPU- or GPU-specific.

The mesh has two axes:

    data  devices that hold a full copy of the parameters (data parallel)
    fsdp  devices that split parameters and optimizer state between them;
          XLA gathers each weight where a layer uses it

Every device takes its own slice of each batch: a batch (B, L) is split along B
over data x fsdp devices, so B must be a multiple of the device count (and of
it times train.grad_accum_steps when accumulating).

    mesh = make_mesh(cfg.mesh)                       # e.g. Mesh('data': 2, 'fsdp': 4)
    state = shard_tree(state, state_shardings(state, mesh))
    batch = host_batch_to_global(batch, batch_sharding(mesh))  # numpy (B, L) -> this process's rows

One device is a 1 x 1 mesh: the same code runs on it.

Multi-host: `init_distributed(cfg.mesh)` before anything else touches JAX.
Each process then runs the same program on its own devices; process p
loads rows [p*B/n, (p+1)*B/n) of every global batch.
"""
from __future__ import annotations

import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from .config import UserError

AXES = ("data", "fsdp")


def _env_int(name: str) -> Optional[int]:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment {name}={raw!r}: expected an integer") from None


def init_distributed(mesh_cfg) -> bool:
    """Starts `jax.distributed` when a multi-host run is configured; returns True if it runs.

    Settings come from the `mesh` section, else from the environment:
    JAX_COORDINATOR_ADDRESS ("host:port"), JAX_NUM_PROCESSES, JAX_PROCESS_ID.
    With a coordinator but no count or id, JAX detects them itself (Slurm,
    Open MPI, TPU pods). Must run before any other JAX call of the process.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator = mesh_cfg.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num = mesh_cfg.num_processes if mesh_cfg.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = mesh_cfg.process_id if mesh_cfg.process_id is not None else _env_int("JAX_PROCESS_ID")
    if coordinator is None:
        if num not in (None, 1):
            raise UserError(f"mesh.num_processes={num} needs mesh.coordinator (or JAX_COORDINATOR_ADDRESS)")
        return False
    if num is not None and num < 1:
        raise UserError(f"mesh.num_processes: must be positive, got {num}")
    if pid is not None and num is not None and not 0 <= pid < num:
        raise UserError(f"mesh.process_id: must be in [0, {num}), got {pid}")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)
    return True


def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, int]:
    """(data, fsdp) sizes for n_devices; data=0 means all devices not on fsdp."""
    fsdp, data = mesh_cfg.fsdp, mesh_cfg.data
    if fsdp < 1:
        raise UserError(f"mesh.fsdp: must be positive, got {fsdp}")
    if data < 0:
        raise UserError(f"mesh.data: must not be negative, got {data}")
    if data == 0:
        if n_devices % fsdp:
            raise UserError(f"mesh.fsdp: {fsdp} does not divide the {n_devices} devices")
        data = n_devices // fsdp
    if data * fsdp != n_devices:
        raise UserError(f"mesh: data={data} x fsdp={fsdp} = {data * fsdp} devices, but there are {n_devices}")
    return data, fsdp


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    """A ("data", "fsdp") mesh over all devices (of every process).

    A single process may use fewer devices by setting both sizes (data=1,
    fsdp=1: one device). Axes are Auto: XLA places the collectives.
    """
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    if jax.process_count() == 1 and mesh_cfg.data and mesh_cfg.data * mesh_cfg.fsdp < n:
        n = mesh_cfg.data * mesh_cfg.fsdp
    shape = mesh_shape(mesh_cfg, n)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 2, devices=devices[:n])


def one_device_mesh() -> jax.sharding.Mesh:
    """A 1 x 1 mesh on this process's first device."""
    return jax.make_mesh((1, 1), AXES, axis_types=(AxisType.Auto,) * 2, devices=jax.local_devices()[:1])


def setup(mesh_cfg) -> jax.sharding.Mesh:
    """Starts multi-host JAX if configured and builds the mesh: always one, 1 x 1 on
    a single device, so one code path serves one device or many."""
    init_distributed(mesh_cfg)
    return make_mesh(mesh_cfg)


def sync(name: str) -> None:
    """A barrier across processes (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def agree(flag: bool) -> bool:
    """Process 0's flag on every process (a decision all must take together)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
    """Rows (axis 0) split over every device, data and fsdp alike."""
    return NamedSharding(mesh, P(AXES))


def leaf_spec(shape: tuple, fsdp: int) -> P:
    """FSDP rule for one array: split its largest axis that fsdp divides, if it has
    2 or more axes; scalars, vectors and indivisible shapes stay replicated.

    (V, D) embedding with fsdp=4, V=50, D=32 -> P(None, "fsdp").
    """
    if fsdp == 1 or len(shape) < 2:
        return P()
    axes = [i for i, n in enumerate(shape) if n % fsdp == 0]
    if not axes:
        return P()
    best = max(axes, key=lambda i: (shape[i], -i))
    return P(*[("fsdp" if i == best else None) for i in range(len(shape))])


def param_shardings(tree, mesh):
    """NamedShardings for a pytree of arrays (parameters, optimizer state or a
    whole TrainState): by shape, so Adam's moments shard exactly like their
    parameters. With fsdp=1 everything is replicated (data parallel)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(np.shape(x), fsdp)), tree)


state_shardings = param_shardings


def shard_tree(tree, shardings):
    """Places a pytree that every process holds identically (freshly initialized
    or loaded) onto the mesh; each process fills only its own devices. One process
    gets arrays XLA computed (a copy of each): on a CPU an array built from host memory
    cannot be donated in place, and the first train step copied the whole state it donates
    (1.5 GB more peak RSS at SmolLM2-135M's shape: bench/README.md)."""
    def put(x, s):
        host = np.asarray(x)
        a = jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])
        return jnp.copy(a) if jax.process_count() == 1 else a
    return jax.tree.map(put, tree, shardings)


def place(tree, shardings):
    """A tree that is never donated (the frozen part of a split model, parts.Parts) on the mesh:
    one process moves its arrays where they are not already (no copy of one that is: LoRA's base
    is the largest thing such a run holds); several processes each fill their own devices."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return shard_tree(tree, shardings)


def process_rows(global_rows: int, sharding) -> tuple[int, int]:
    """[start, stop) of the global batch rows this process's devices hold
    (one contiguous block: rows [p*B/n, (p+1)*B/n) of process p on a usual mesh)."""
    idx = sharding.addressable_devices_indices_map((global_rows,))
    spans = sorted({i[0].indices(global_rows)[:2] for i in idx.values()})
    lo, hi = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in spans) != hi - lo:
        raise ValueError(f"this process's devices hold non-contiguous rows {spans}")
    return lo, hi


def check_batch(batch_size: int, grad_accum_steps: int, mesh) -> None:
    """Every micro-batch must split evenly over the devices."""
    n = mesh.size
    micro = batch_size // grad_accum_steps
    if micro % n:
        what = "train.batch_size" if grad_accum_steps == 1 else "train.batch_size / train.grad_accum_steps"
        raise UserError(f"{what} = {micro} rows is not a multiple of the {n} devices of the mesh")


def global_batch(local_batch, sharding):
    """This process's rows of a batch (numpy, each (B/n_processes, L)) -> global
    jax arrays (B, L) split along rows as `sharding` says."""
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, v), local_batch)


def host_batch_to_global(batch, sharding):
    """The full global batch (a `batching.Batch`, numpy, identical on every process)
    -> global arrays, each process transferring only its own rows."""
    if jax.process_count() == 1:  # every row is this process's (and answer_at needs no split)
        return global_batch(batch, sharding)
    lo, hi = process_rows(batch.inputs.shape[0], sharding)
    return global_batch(batch.rows(lo, hi), sharding)

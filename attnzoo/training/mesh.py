"""The device mesh from ``config.mesh``: axes ``("data", "fsdp", "tensor")``, -1 = the rest."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor")


def mesh_shape(sizes: Mapping[str, int], n_devices: int) -> tuple[int, ...]:
    """Resolves at most one ``-1`` axis so that the product equals ``n_devices``.

    A smaller product uses the first devices only (single-process runs: debugging, tests).

    Raises a ValueError saying what to change when the shape cannot cover the devices.
    """
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; config.mesh has {', '.join(AXES)}")
    shape = [int(sizes.get(a, 1)) for a in AXES]
    free = [i for i, s in enumerate(shape) if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(
            f"config.mesh {dict(zip(AXES, shape, strict=True))}: sizes must be "
            "positive, with at most one -1 (= all remaining devices)"
        )
    fixed = math.prod(s for s in shape if s != -1)
    if free:
        if n_devices % fixed:
            raise ValueError(
                f"config.mesh {dict(zip(AXES, shape, strict=True))}: {n_devices} "
                f"devices do not divide by the fixed axes' product {fixed}"
            )
        shape[free[0]] = n_devices // fixed
    if math.prod(shape) > n_devices:
        raise ValueError(
            f"config.mesh {dict(zip(AXES, shape, strict=True))} needs {math.prod(shape)} "
            f"devices but {n_devices} exist; make the product of mesh.data, mesh.fsdp and "
            "mesh.tensor at most the device count, or set one of them to -1"
        )
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all, across processes) with Auto axis types.

    Auto (not Explicit) axes let XLA propagate shardings from params and batches, which is what
    rules-based sharding of unannotated models relies on.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    if math.prod(shape) < len(devices):
        if jax.process_count() > 1:
            raise ValueError(
                f"config.mesh {dict(zip(AXES, shape, strict=True))} leaves some of "
                f"the {len(devices)} devices of a multi-process run unused; set one "
                "axis to -1"
            )
        devices = devices[: math.prod(shape)]
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)

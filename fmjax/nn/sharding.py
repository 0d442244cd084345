"""The device mesh and the mapping from logical axis names to mesh axes.

Tensors name their axes logically ('batch', 'embed', 'heads', ...). Rules from
the config (`sharding.params`, `sharding.activations`) turn those names into
PartitionSpecs; a rule that would put one mesh axis on two dimensions of the
same tensor is an error, raised with the tensor's name.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from fmjax import config as config_lib
from fmjax.config import ConfigError, MESH_AXES

Rules = Mapping[str, str]  # logical axis -> "mesh_axis[,mesh_axis...]"


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh over `devices` (default: all) with axes data, fsdp, expert, tensor."""
  devices = list(jax.devices() if devices is None else devices)
  shape = config_lib.mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(
      tuple(shape[a] for a in MESH_AXES), MESH_AXES,
      axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
      devices=devices)


def spec(logical_axes: Sequence[str | None], rules: Rules, name: str = "tensor") -> P:
  """PartitionSpec for a tensor whose dimensions carry `logical_axes`."""
  used: dict[str, str] = {}
  entries = []
  for logical in logical_axes:
    if logical is None:
      entries.append(None)
      continue
    if logical not in rules:
      raise ConfigError(
          f"{name}: logical axis {logical!r} has no sharding rule; add it to the "
          "config's sharding rules")
    mesh_axes = config_lib.parse_axes(rules[logical])
    for a in mesh_axes:
      if a in used:
        raise ConfigError(
            f"{name}: logical axes {used[a]!r} and {logical!r} both map to mesh "
            f"axis {a!r}; change one of their sharding rules")
      used[a] = logical
    entries.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
  return P(*entries)


def named(mesh, logical_axes, rules: Rules, shape=None, name: str = "tensor") -> NamedSharding:
  """NamedSharding for a tensor; checks that sharded dimensions divide evenly."""
  pspec = spec(logical_axes, rules, name)
  if shape is not None:
    for dim, entry, logical in zip(shape, pspec, logical_axes):
      axes = (entry,) if isinstance(entry, str) else (entry or ())
      ways = math.prod(mesh.shape[a] for a in axes)
      if dim % ways:
        raise ConfigError(
            f"{name}: dimension {logical!r} of size {dim} does not split over "
            f"mesh axes {'x'.join(axes)} ({ways} ways); change the model size "
            "or the sharding rule")
  return NamedSharding(mesh, pspec)


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: Rules) -> jax.Array:
  """Pins an activation's layout inside jit; a no-op when no mesh is set."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, spec(logical_axes, rules, "activation"))


def batch_sharding(mesh, rules: Rules) -> NamedSharding:
  """How a (batch, seq) array of inputs is laid out on the mesh."""
  return NamedSharding(mesh, spec(("batch", None), rules, "batch"))

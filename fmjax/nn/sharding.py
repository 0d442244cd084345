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
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from fmjax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
Rules = Mapping[str, str]  # logical axis -> "mesh_axis[,mesh_axis...]"


def parse_axes(value: str) -> tuple[str, ...]:
  """'data,fsdp' -> ('data', 'fsdp'); '' -> ()."""
  return tuple(a.strip() for a in value.split(",") if a.strip())


def mesh_shape(mesh_cfg, n_devices: int) -> dict[str, int]:
  """Resolves the -1 entry of the mesh config against the device count."""
  sizes = {a: int(mesh_cfg[a]) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if bad:
    raise ConfigError(f"mesh.{bad[0]}={sizes[bad[0]]}: axis sizes must be >= 1, "
                      "or -1 for 'the rest of the devices'")
  if len(free) > 1:
    raise ConfigError(f"mesh: only one axis may be -1, got {', '.join(free)}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if n_devices % fixed:
      raise ConfigError(
          f"mesh: fixed axes multiply to {fixed}, which does not divide the "
          f"{n_devices} devices; change mesh.* so their product divides {n_devices}")
    sizes[free[0]] = n_devices // fixed
  elif fixed != n_devices:
    shape = " x ".join(f"{a}={s}" for a, s in sizes.items())
    raise ConfigError(
        f"mesh {shape} needs {fixed} devices but {n_devices} are present; "
        "set one axis to -1 or make the product equal the device count")
  return sizes


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh over `devices` (default: all) with axes data, fsdp, expert, tensor."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
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
    mesh_axes = parse_axes(rules[logical])
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


def split_microbatches(batch, n: int, rules: Rules):
  """Each (B, ...) leaf -> (n, B/n, ...), taking every n-th row so that each shard keeps
  its own rows: microbatch i is rows i, i + n, ... of every shard's block."""

  def split(x):
    y = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return constrain(y, (None, "batch") + (None,) * (x.ndim - 1), rules)

  return jax.tree.map(split, batch)


def sum_over_microbatches(fn, batch, n: int, rules: Rules):
  """fn(batch), computed n microbatches at a time (split_microbatches) and summed: equal
  to fn of the whole batch wherever fn is a sum over rows (losses and gradients that
  are divided by the whole batch's counts)."""
  if n == 1:
    return fn(batch)
  parts = split_microbatches(batch, n, rules)
  shapes = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], parts))
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
  add = lambda total, part: (jax.tree.map(jnp.add, total, fn(part)), None)
  return jax.lax.scan(add, zeros, parts)[0]


def batch_sharding(mesh, rules: Rules) -> NamedSharding:
  """How a (batch, seq) array of inputs is laid out on the mesh."""
  return NamedSharding(mesh, spec(("batch", None), rules, "batch"))

"""One declaration per parameter: shape, logical axes, initializer.

A model describes its parameters as a pytree of `Param`. Everything else is
derived from that one tree: abstract shapes, shardings, the parameter count and
the initialized values, which are created already sharded inside `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fmjax.nn import sharding as sharding_lib

Init = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class Param:
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]  # one logical name per dimension
  init: Init
  dtype: Any = jnp.float32

  def __post_init__(self):
    if len(self.shape) != len(self.axes):
      raise ValueError(f"shape {self.shape} and axes {self.axes} differ in rank")


def normal(std: float) -> Init:
  return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def ones(key, shape, dtype):
  del key
  return jnp.ones(shape, dtype)


def zeros(key, shape, dtype):
  del key
  return jnp.zeros(shape, dtype)


def _is_param(x) -> bool:
  return isinstance(x, Param)


def leaves_with_names(decls):
  """[(dotted name, Param)] in a fixed order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(decls, is_leaf=_is_param)
  return [(jax.tree_util.keystr(path, simple=True, separator="."), p) for path, p in flat]


def abstract(decls):
  return jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), decls, is_leaf=_is_param)


def shardings(decls, mesh, rules):
  """NamedSharding per parameter, from the parameter rules of the config."""
  names = iter(name for name, _ in leaves_with_names(decls))
  return jax.tree.map(
      lambda p: sharding_lib.named(mesh, p.axes, rules, p.shape, name=f"param {next(names)}"),
      decls, is_leaf=_is_param)


def count(decls) -> int:
  return sum(math.prod(p.shape) for _, p in leaves_with_names(decls))


def init(decls, key: jax.Array):
  """Initial values; call inside jax.jit with out_shardings to create them sharded.

  Each parameter draws from its own key, folded in by its position in the tree,
  so values do not depend on the mesh.
  """
  flat, treedef = jax.tree.flatten(decls, is_leaf=_is_param)
  values = [p.init(jax.random.fold_in(key, i), p.shape, p.dtype) for i, p in enumerate(flat)]
  return jax.tree.unflatten(treedef, values)

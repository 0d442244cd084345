"""Sending tokens to their experts and back: capacity or dropless, with expert parallelism.

The router has picked, for each of N tokens, K experts and a gate weight for
each. Those N x K assignments are taken in k-major order (every token's first
choice, then every token's second, ...), so first choices win when capacity
is short. Two dispatches:

- capacity: each expert has C = ceil(capacity_factor x N K / E) slots per
  device's tokens; an assignment past its expert's C-th is dropped (its gate
  contributes nothing) and counted. Experts then run as one batched matmul
  over (E, C) slots.
- dropless: assignments are sorted by expert and run as a grouped matmul over
  the groups, none dropped. `model.moe.grouped_matmul` picks it:
  - `ragged_dot` (`ragged_swiglu`): `jax.lax.ragged_dot`. XLA:CPU lowers it
    to a dense matmul per group (E times the work), and on an H200 it made
    dropless 2.3x slower than capacity dispatch.
  - `blocked` (`blocked_swiglu`): each group padded to whole blocks, each
    block multiplied by its expert's weights in one batched matmul; plain XLA,
    so it runs everywhere, and beat capacity dispatch on the H200.
  - `gmm` (`gmm_swiglu`): the megablox Pallas kernel, which visits only the
    row tiles the groups touch and has its own backward (`tgmm` for the
    weights). Native on TPUs; interpreted elsewhere (slow: for tests).
  - `auto`: `AUTO_GROUPED_MATMUL` by backend: `gmm` on TPUs, `blocked` on
    GPUs and CPUs. `GROUPED_MATMUL_BACKENDS` lists where each one runs.

Expert parallelism: the experts' leading axis is sharded over the mesh axes
of the parameter rule `expert`, and so are the tokens (validated: they are in
the activations' `batch` rule). Inside `jax.shard_map`, each device builds a
fixed-size buffer per destination device and one `all_to_all` delivers them;
the experts run on what arrived, and a second `all_to_all` brings the results
home. XLA:CPU has no ragged all-to-all, so dropless buffers are sized for the
worst case (every assignment to one device); the experts then compute only the
smallest of a few static row counts that holds what arrived
(`grouped_swiglu_gathered`), so a balanced load does not pay for the
worst case. Expert weights keep their `mlp` axis sharded (tensor parallelism:
partial sums, one psum); any other sharding of them (FSDP over `embed`) is
gathered on entry, as for every other weight.

Suffixes: N tokens, K experts per token, A = N K assignments, E experts
(L local ones), D model width, F expert width, R rows, S slots.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from fmjax.nn.sharding import parse_axes

# Backends each grouped matmul runs on (gmm on cpu: the Pallas interpreter), and
# the one `auto` picks on each.
GROUPED_MATMUL_BACKENDS = {"ragged_dot": ("cpu", "gpu", "tpu"), "blocked": ("cpu", "gpu", "tpu"),
                           "gmm": ("tpu", "cpu")}
AUTO_GROUPED_MATMUL = {"tpu": "gmm", "gpu": "blocked", "cpu": "blocked"}


def capacity(n_assignments: int, n_experts: int, factor: float) -> int:
  return max(1, math.ceil(factor * n_assignments / n_experts))


def assignments(idx_NK, w_NK):
  """Expert, token and gate of each assignment, in k-major order: (A,) each."""
  N, K = idx_NK.shape
  return (idx_NK.T.reshape(-1), jnp.tile(jnp.arange(N, dtype=jnp.int32), K),
          w_NK.T.reshape(-1))


def capacity_slots(e_A, n_experts: int, cap: int):
  """Slot e*cap + (rank among e's assignments) of each assignment, n_experts*cap if dropped."""
  onehot_AE = jax.nn.one_hot(e_A, n_experts, dtype=jnp.int32)
  rank_A = jnp.take_along_axis(jnp.cumsum(onehot_AE, axis=0), e_A[:, None], axis=1)[:, 0] - 1
  kept_A = rank_A < cap
  return jnp.where(kept_A, e_A * cap + rank_A, n_experts * cap), kept_A


def _gather_rows(x_ND, row_S):
  """x_ND[row_S], where row N (and past) reads zeros."""
  return jnp.take(x_ND, row_S, axis=0, mode="fill", fill_value=0)


def _scatter_rows(size: int, row_S, y_SD):
  """A (size, D) array of zeros holding y_SD[s] at row row_S[s] (rows distinct)."""
  out = jnp.zeros((size, y_SD.shape[1]), y_SD.dtype)
  return out.at[row_S].add(y_SD, unique_indices=True, mode="drop")


def _fill(size: int, index_A, value_A, empty: int):
  """An int array of `size` holding value_A[a] at index_A[a] (indices >= size are discarded)."""
  out = jnp.full((size + 1,), empty, jnp.int32)
  return out.at[jnp.minimum(index_A, size)].set(value_A.astype(jnp.int32))[:size]


def _inverse(perm):
  return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


def swiglu_batched(x_LRD, wg_LDF, wu_LDF, wd_LFD):
  h_LRF = jax.nn.silu(jnp.einsum("lrd,ldf->lrf", x_LRD, wg_LDF)) * jnp.einsum(
      "lrd,ldf->lrf", x_LRD, wu_LDF)
  return jnp.einsum("lrf,lfd->lrd", h_LRF, wd_LFD)


def ragged_swiglu(x_RD, sizes_L, wg_LDF, wu_LDF, wd_LFD):
  """SwiGLU of rows grouped by expert (group l: the next sizes_L[l] rows); later rows give 0."""
  sizes_L = sizes_L.astype(jnp.int32)
  h_RF = jax.nn.silu(jax.lax.ragged_dot(x_RD, wg_LDF, sizes_L)) * jax.lax.ragged_dot(
      x_RD, wu_LDF, sizes_L)
  return jax.lax.ragged_dot(h_RF, wd_LFD, sizes_L)


def block_size(rows: int, groups: int) -> int:
  """A power of two near rows / (2 groups): padding to whole blocks then adds about
  a quarter of the rows, and there are about 3x groups blocks."""
  b = 8
  while b * 2 <= min(512, rows / (2 * groups)):
    b *= 2
  return b


def blocked_swiglu(x_RD, sizes_L, wg_LDF, wu_LDF, wd_LFD, block: int | None = None):
  """`ragged_swiglu` as blocks: each group padded to whole blocks of `block` rows,
  each block multiplied by its group's weights (one batched matmul).

  Static shapes: every block is computed, so rows past the groups (worst-case
  buffers) cost as much as rows in them.
  """
  R, D = x_RD.shape
  G = sizes_L.shape[0]
  block = block or block_size(R, G)
  n_blocks = -(-R // block) + G
  sizes_L = sizes_L.astype(jnp.int32)
  ends_L = jnp.cumsum(sizes_L)
  padded_L = -(-sizes_L // block) * block
  padded_ends_L = jnp.cumsum(padded_L)
  rows_R = jnp.arange(R, dtype=jnp.int32)
  group_R = jnp.searchsorted(ends_L, rows_R, side="right")  # G: past the last group
  g = jnp.minimum(group_R, G - 1)
  dest_R = jnp.where(group_R < G, padded_ends_L[g] - padded_L[g] + rows_R - (ends_L[g] - sizes_L[g]),
                     n_blocks * block)
  source_S = _fill(n_blocks * block, dest_R, rows_R, R)
  x_BbD = _gather_rows(x_RD, source_S).reshape(n_blocks, block, D)
  starts_B = jnp.arange(n_blocks, dtype=jnp.int32) * block
  group_B = jnp.minimum(jnp.searchsorted(padded_ends_L, starts_B, side="right"), G - 1)
  y_BbD = swiglu_batched(x_BbD, wg_LDF[group_B], wu_LDF[group_B], wd_LFD[group_B])
  return _gather_rows(y_BbD.reshape(n_blocks * block, D), dest_R)


GMM_TILES = (512, 256, 128)  # candidate K and N tiles, largest first


def gmm_tiling(rows: int, groups: int, d: int, f: int) -> tuple[int, int, int]:
  """(row tile, K tile, N tile) for `gmm_swiglu`: rows are padded to whole row
  tiles, widths d and f to multiples of 128.

  One tiling serves all six kernels of a SwiGLU and its backward, where K and N
  are each d or f, so the K and N tile divide both. A group that starts inside
  a row tile costs that tile once more, so the row tile is near
  rows / (2 groups), as for `blocked_swiglu`, and at least 128.
  """
  tm = max(128, block_size(rows, groups))
  tkn = next(t for t in GMM_TILES if d % t == 0 and f % t == 0)
  return tm, tkn, tkn


def _pad_to(x, multiples):
  """x zero-padded at the end of each axis to a multiple of multiples[axis]."""
  return jnp.pad(x, [(0, -n % m) for n, m in zip(x.shape, multiples)])


def gmm_swiglu(x_RD, sizes_L, wg_LDF, wu_LDF, wd_LFD):
  """`ragged_swiglu` with megablox's Pallas grouped matmul (`interpret` off TPUs).

  The kernel wants whole tiles: rows are padded to the row tile, and D and F
  to multiples of 128 with zero weights, which add nothing (lower-case
  suffixes: padded sizes). It leaves rows past the groups unwritten, in its
  output and in its gradient with respect to its input; masking x and y keeps
  them at exactly 0 both ways.
  """
  # Imported here: the TPU kernel library is needed only where gmm is chosen.
  from jax.experimental.pallas.ops.tpu.megablox import ops
  R, D = x_RD.shape
  G, _, F = wg_LDF.shape
  d, f = -(-D // 128) * 128, -(-F // 128) * 128
  tiling = gmm_tiling(R, G, d, f)
  sizes_L = sizes_L.astype(jnp.int32)
  x_rd = _pad_to(x_RD, (tiling[0], 128))
  valid_r1 = (jnp.arange(x_rd.shape[0], dtype=jnp.int32) < jnp.sum(sizes_L))[:, None]
  x_rd = jnp.where(valid_r1, x_rd, 0)
  wg_Ldf, wu_Ldf, wd_Lfd = (_pad_to(w, (1, 128, 128)) for w in (wg_LDF, wu_LDF, wd_LFD))
  interpret = jax.default_backend() != "tpu"
  mm = lambda a, w: ops.gmm(a, w, sizes_L, x_RD.dtype, tiling, None, None, False, interpret)
  h_rf = jax.nn.silu(mm(x_rd, wg_Ldf)) * mm(x_rd, wu_Ldf)
  y_rd = jnp.where(valid_r1, mm(h_rf, wd_Lfd), 0)
  return y_rd[:R, :D]


GROUPED_SWIGLU = {"ragged_dot": ragged_swiglu, "blocked": blocked_swiglu, "gmm": gmm_swiglu}


def resolve_grouped_matmul(how: str, backend: str | None = None) -> str:
  """`how`, with `auto` replaced by the backend's entry in `AUTO_GROUPED_MATMUL`."""
  if how != "auto":
    return how
  return AUTO_GROUPED_MATMUL.get(backend or jax.default_backend(), "blocked")


def grouped_swiglu(x_RD, sizes_L, wg, wu, wd, how: str):
  return GROUPED_SWIGLU[resolve_grouped_matmul(how)](x_RD, sizes_L, wg, wu, wd)


BUCKET_FACTORS = (1.25, 1.5, 2, 4)  # row counts computed, as multiples of a balanced load


def row_buckets(total: int, typical: int) -> tuple[int, ...]:
  """The static row counts a worst-case buffer of `total` rows is computed over:
  a few multiples of the `typical` count (a balanced load), then all of it."""
  multiples = {min(total, -(-int(f * typical) // 8) * 8) for f in BUCKET_FACTORS}
  return tuple(sorted(multiples | {total}))


def grouped_swiglu_gathered(x_RD, order_R, sizes_L, weights, how: str, typical: int):
  """`grouped_swiglu` of the rows x_RD[order_R], grouped by expert, whose groups fill
  only the first sum(sizes_L) of them; returns the result in x_RD's row order
  (rows outside the groups give 0).

  The buffer is sized for the worst case, but only the smallest of
  `row_buckets` that holds the grouped rows is gathered, computed and
  scattered back (`lax.switch` picks it at run time), so a balanced load costs
  about its own rows, not the whole buffer. The gradient is a switch of its
  own that recomputes the chosen bucket's forward pass: differentiating the
  switch directly keeps every branch's intermediates and measured twice as
  slow on CPUs.
  """
  R = x_RD.shape[0]
  buckets = row_buckets(R, typical)

  def rows_of(rows, x_RD, weights, order_R, sizes_L):
    y_rD = grouped_swiglu(x_RD[order_R[:rows]], sizes_L, *weights, how)
    return _scatter_rows(R, order_R[:rows], y_rD)

  def bucket(sizes_L):
    return jnp.searchsorted(jnp.asarray(buckets, jnp.int32), jnp.sum(sizes_L), side="left")

  @jax.custom_vjp
  def run(x_RD, weights, order_R, sizes_L):
    branches = [functools.partial(rows_of, rows) for rows in buckets]
    return jax.lax.switch(bucket(sizes_L), branches, x_RD, weights, order_R, sizes_L)

  def run_fwd(x_RD, weights, order_R, sizes_L):
    return run(x_RD, weights, order_R, sizes_L), (x_RD, weights, order_R, sizes_L)

  def run_bwd(saved, g_RD):
    def grads(rows, x_RD, weights, order_R, sizes_L, g_RD):
      _, vjp = jax.vjp(lambda x, w: rows_of(rows, x, w, order_R, sizes_L), x_RD, weights)
      return vjp(g_RD)
    branches = [functools.partial(grads, rows) for rows in buckets]
    gx_RD, gw = jax.lax.switch(bucket(saved[3]), branches, *saved, g_RD)
    return gx_RD, gw, None, None

  run.defvjp(run_fwd, run_bwd)
  return run(x_RD, tuple(weights), order_R, sizes_L)


def _all_to_all(x, axes):
  return jax.lax.all_to_all(x, axes, 0, 0, tiled=True) if axes else x


def _capacity_local(x_ND, e_A, tok_A, weights, e_cfg, ep: int, ep_axes):
  """Capacity dispatch of this device's assignments; returns (y per assignment, dropped)."""
  wg, wu, wd = weights
  N, D = x_ND.shape
  L = wg.shape[0]
  E = L * ep
  cap = capacity(e_A.shape[0], E, e_cfg.capacity_factor)
  slot_A, kept_A = capacity_slots(e_A, E, cap)
  send_SD = _gather_rows(x_ND, _fill(E * cap, slot_A, tok_A, N))
  recv_SD = _all_to_all(send_SD, ep_axes)  # (source device, local expert, slot)
  x_LRD = recv_SD.reshape(ep, L, cap, D).swapaxes(0, 1).reshape(L, ep * cap, D)
  y_LRD = swiglu_batched(x_LRD, wg, wu, wd)
  y_SD = y_LRD.reshape(L, ep, cap, D).swapaxes(0, 1).reshape(E * cap, D)
  back_SD = _all_to_all(y_SD, ep_axes)
  return _gather_rows(back_SD, slot_A), jnp.sum(~kept_A)


def _dropless_local(x_ND, e_A, tok_A, weights, e_cfg, ep: int, ep_axes):
  """Dropless dispatch: sorted by expert, worst-case buffers per destination device."""
  wg = weights[0]
  N, D = x_ND.shape
  A, L = e_A.shape[0], wg.shape[0]
  E = L * ep
  order_A = jnp.argsort(e_A, stable=True)
  counts_E = jnp.bincount(e_A, length=E).astype(jnp.int32)
  if ep == 1:
    y_AD = grouped_swiglu(_gather_rows(x_ND, tok_A[order_A]), counts_E, *weights,
                          e_cfg.grouped_matmul)
    return y_AD[_inverse(order_A)], jnp.zeros((), jnp.int32)
  # Rows for device d go to block d of an (ep, A) buffer, in expert order.
  dev_sorted = e_A[order_A] // L
  dev_counts = counts_E.reshape(ep, L).sum(axis=1)
  dev_starts = jnp.cumsum(dev_counts) - dev_counts
  slot_sorted = dev_sorted * A + jnp.arange(A, dtype=jnp.int32) - dev_starts[dev_sorted]
  send_RD = _scatter_rows(ep * A, slot_sorted, x_ND[tok_A[order_A]])
  recv_RD = _all_to_all(send_RD, ep_axes)
  recv_counts_PL = _all_to_all(counts_E, ep_axes).reshape(ep, L)  # P: source device
  # Local expert of each received row (L for padding), then group rows by it.
  ends_PL = jnp.cumsum(recv_counts_PL, axis=1)
  row_A = jnp.arange(A, dtype=jnp.int32)
  expert_PA = jnp.sum(row_A[None, :, None] >= ends_PL[:, None, :], axis=-1)
  order_R = jnp.argsort(expert_PA.reshape(-1), stable=True)
  y_RD = grouped_swiglu_gathered(recv_RD, order_R, recv_counts_PL.sum(axis=0), weights,
                                 e_cfg.grouped_matmul, typical=A)
  back_RD = _all_to_all(y_RD, ep_axes)
  return back_RD[slot_sorted[_inverse(order_A)]], jnp.zeros((), jnp.int32)


def _experts_local(x_ND, idx_NK, w_NK, weights, e_cfg, dropless, ep, ep_axes, mlp_axes,
                   batch_axes):
  N, K = idx_NK.shape
  e_A, tok_A, w_A = assignments(idx_NK, w_NK)
  run = _dropless_local if dropless else _capacity_local
  y_AD, dropped = run(x_ND, e_A, tok_A, weights, e_cfg, ep, ep_axes)
  y_ND = (y_AD * w_A[:, None].astype(y_AD.dtype)).reshape(K, N, -1).sum(axis=0)
  if mlp_axes:
    y_ND = jax.lax.psum(y_ND, mlp_axes)
  if batch_axes:
    dropped = jax.lax.psum(dropped, batch_axes)
  return y_ND, dropped


def routed_experts(x_BTD, idx_BTK, w_BTK, weights, spec, dropless: bool | None = None):
  """Output (B, T, D) of the routed experts, and the number of dropped assignments.

  `weights` = (w_gate (E, D, F), w_up (E, D, F), w_down (E, F, D)). Under a
  mesh this runs in `jax.shard_map` with expert parallelism; without one, on
  the local arrays.
  """
  e_cfg = spec.model.moe
  dropless = e_cfg.dispatch == "dropless" if dropless is None else dropless
  B, T, D = x_BTD.shape
  K = idx_BTK.shape[-1]
  weights = tuple(w.astype(x_BTD.dtype) for w in weights)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    y_ND, dropped = _experts_local(x_BTD.reshape(B * T, D), idx_BTK.reshape(B * T, K),
                                   w_BTK.reshape(B * T, K), weights, e_cfg, dropless, 1, (),
                                   (), ())
    return y_ND.reshape(B, T, -1), dropped

  sized = lambda axes: tuple(a for a in axes if mesh.shape[a] > 1)
  batch_axes = sized(parse_axes(spec.activations.batch))
  seq_axes = sized(parse_axes(spec.activations.seq))
  ep_axes, mlp_axes = sized(spec.expert_axes), sized(spec.mlp_axes)
  ep = math.prod(mesh.shape[a] for a in ep_axes)
  token_spec = P(batch_axes or None, seq_axes or None, None)
  e_spec, f_spec = ep_axes or None, mlp_axes or None
  weight_specs = (P(e_spec, None, f_spec), P(e_spec, None, f_spec), P(e_spec, f_spec, None))

  def local(x_BTD, idx_BTK, w_BTK, *weights):
    b, t = x_BTD.shape[:2]
    y_ND, dropped = _experts_local(
        x_BTD.reshape(b * t, D), idx_BTK.reshape(b * t, K), w_BTK.reshape(b * t, K), weights,
        e_cfg, dropless, ep, ep_axes, mlp_axes, batch_axes + seq_axes)
    return y_ND.reshape(b, t, -1), dropped

  # A Pallas kernel's output does not say which mesh axes it varies over, so the
  # gmm path runs without shard_map's varying-axes check.
  gmm = dropless and resolve_grouped_matmul(e_cfg.grouped_matmul) == "gmm"
  return jax.shard_map(local, in_specs=(token_spec, token_spec, token_spec, *weight_specs),
                       out_specs=(token_spec, P()), check_vma=not gmm)(
                           x_BTD, idx_BTK, w_BTK, *weights)

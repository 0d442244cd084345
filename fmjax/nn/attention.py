"""Attention kernels: one call, four implementations, each exact on packed rows.

Every implementation computes the same function. Within a row of packed
documents, a query attends to the keys of its own document (equal segment
ids) at or before its own position; padding (segment 0, at a row's end)
attends to padding, so no row is empty. `model.attention_impl` picks how:

  xla     the reference: scores and probabilities materialised (T x T per
          head). Any backend; what CPUs run.
  cudnn   cuDNN flash attention through `jax.nn.dot_product_attention`: the
          causal half is skipped (`is_causal`), the segment mask is passed
          alongside. GPUs, bf16/fp16, head dims up to 256.
  pallas  the Pallas flash-attention kernel of jax (Triton lowering), which
          takes segment ids itself. GPUs; interpreted on CPUs.
  splash  splash attention (Pallas, Mosaic TPU lowering) with a causal mask
          and segment ids. TPUs; interpreted on CPUs.
  auto    the fastest exact one the backend has (`AUTO`).

With `model.sliding_window` = W > 0, a query at position t also sees only
keys at positions > t - W (Mistral's window; W keys, its own included): xla
in its mask, cudnn through `local_window_size`, splash with a `LocalMask`.
The Pallas GPU kernel has no window, so fmjax.validate refuses it with one.
With `model.full_attention_every`, layers with and without the window share
one scan: each layer's flag picks between the two (`lax.cond` around a
kernel, so each runs with a fixed mask).

`model.attn_softcap` > 0 (Gemma 2) squashes each score s (after the scale) to
cap * tanh(s / cap) before the mask and softmax: xla and splash have it; the
cuDNN and Pallas GPU kernels do not, so fmjax.validate refuses them and `auto`
takes xla on a GPU.

Values may have another head dim than queries and keys (MLA): splash takes
that as it is, cudnn and pallas get values zero-padded to the query head dim
(the padded output columns are zero and are cut off). Grouped-query heads:
xla and cudnn take them as they are; pallas and splash get each key/value
head repeated for its queries. Under a mesh the kernels run in `jax.shard_map`
over the batch and head axes of the activation rules: attention is
independent per row and head, so nothing is communicated (a sequence-sharded
input is gathered first).

Decoding attends to a cache (`attend_cached`): slot s is visible to a query
at position t iff s <= t. One new token per row is a padding mask over the
first t + 1 slots, which cuDNN runs fused; everything else decodes with XLA.

Shapes: B batch, T queries, S keys, N query heads, K key/value heads, H
query/key head dim, G value head dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from fmjax.nn.sharding import parse_axes

IMPLS = ("xla", "cudnn", "pallas", "splash")
# Backends each implementation runs on; on "cpu" the Pallas kernels are interpreted.
BACKENDS = {"xla": ("cpu", "gpu", "tpu"), "cudnn": ("gpu",), "pallas": ("gpu", "cpu"),
            "splash": ("tpu", "cpu")}
# What `auto` picks on each backend (before the fallbacks of `resolve`).
AUTO = {"cpu": "xla", "gpu": "cudnn", "tpu": "splash"}
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 256


def _cudnn_unsupported(dtype: str, head_dim: int) -> str | None:
  if dtype not in CUDNN_DTYPES:
    return f"needs model.dtype in {CUDNN_DTYPES} (cuDNN flash attention), not {dtype!r}"
  if head_dim > CUDNN_MAX_HEAD_DIM or head_dim % 8:
    return (f"needs a query/key head dim that is a multiple of 8 and at most "
            f"{CUDNN_MAX_HEAD_DIM} (cuDNN flash attention), not {head_dim}")
  return None


def unavailable(impl: str, backend: str, dtype: str, head_dim: int,
                window: int = 0, softcap: float = 0.0) -> str | None:
  """Why `impl` cannot run here (None if it can): the end of a one-line config error."""
  if impl == "auto":
    return None
  if impl in ("cudnn", "pallas") and softcap:
    return (f"has no attention soft-capping (model.attn_softcap={softcap}): the {impl} "
            "kernel cannot squash scores inside its softmax; use xla or splash (or auto)")
  if impl == "pallas" and window:
    return (f"has no sliding window (model.sliding_window={window}): jax's Pallas GPU "
            "flash-attention kernel masks by segment and causality only; use cudnn or xla")
  if backend not in BACKENDS[impl]:
    have = ", ".join(b for b in BACKENDS[impl])
    return (f"is not available on the {backend} backend (it runs on: {have}); "
            f"use auto or xla")
  return _cudnn_unsupported(dtype, head_dim) if impl == "cudnn" else None


def resolve(impl: str, backend: str, dtype: str, head_dim: int, window: int = 0,
            softcap: float = 0.0) -> str:
  """The implementation `impl` names here: `auto` becomes AUTO[backend], or pallas
  on a GPU where cuDNN cannot take the dtype or head dim (xla with a sliding window),
  or xla on a GPU with soft-capped scores."""
  if impl != "auto":
    return impl
  impl = AUTO.get(backend, "xla")
  if impl == "cudnn" and softcap:
    return "xla"
  if impl == "cudnn" and _cudnn_unsupported(dtype, head_dim):
    impl = "xla" if window else "pallas"
  return impl


def _impl(spec, q_BTNH) -> str:
  m = spec.model
  return resolve(m.attention_impl, jax.default_backend(), jnp.dtype(q_BTNH.dtype).name,
                 q_BTNH.shape[-1], m.sliding_window, m.attn_softcap)


def _per_layer(local, window: int, attend_with):
  """attend_with(w): w = the window if this layer keeps it, 0 if not. `local` is a
  bool, or a traced one (a scan over mixed layers): then both are compiled and
  `lax.cond` runs the layer's."""
  if not window or (isinstance(local, bool) and local):
    return attend_with(window)
  if isinstance(local, bool):
    return attend_with(0)
  return jax.lax.cond(local, lambda: attend_with(window), lambda: attend_with(0))


# --- the reference ------------------------------------------------------------------------


def segment_mask(segment_ids_BT, window: int = 0) -> jax.Array:
  """(B, 1, T, T): causal, only within the same packed document, and with
  `window` > 0 only the last `window` positions."""
  T = segment_ids_BT.shape[1]
  causal_TT = jnp.tril(jnp.ones((T, T), dtype=bool))
  if window:
    causal_TT = causal_TT & ~jnp.tril(jnp.ones((T, T), dtype=bool), -window)
  same_BTT = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return (causal_TT[None] & same_BTT)[:, None]


def cache_mask(positions_BT, num_slots: int, window: int = 0) -> jax.Array:
  """(B, 1, T, S): slot s is visible to a query at position t iff s <= t (and,
  with `window` > 0, s > t - window)."""
  slots_S = jnp.arange(num_slots, dtype=positions_BT.dtype)[None, None, :]
  t_BT1 = positions_BT[:, :, None]
  visible = slots_S <= t_BT1
  if window:
    visible = visible & (slots_S > t_BT1 - window)
  return visible[:, None]


def xla(q_BTNH, k_BSKH, v_BSKG, mask_B1TS, scale: float, softcap: float = 0.0) -> jax.Array:
  """Attention under a dense boolean mask, by XLA: (B, T, N, G)."""
  if v_BSKG.shape[-1] == q_BTNH.shape[-1] and not softcap:
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKG, mask=mask_B1TS, scale=scale,
                                        implementation="xla")
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BTKnH = q_BTNH.reshape(B, T, K, N // K, H)
  logits_BKnTS = jnp.einsum("btknh,bskh->bknts", q_BTKnH, k_BSKH,
                            preferred_element_type=jnp.float32) * scale
  if softcap:
    logits_BKnTS = softcap * jnp.tanh(logits_BKnTS / softcap)
  logits_BKnTS = jnp.where(mask_B1TS[:, :, None], logits_BKnTS, -1e30)
  probs_BKnTS = jax.nn.softmax(logits_BKnTS, axis=-1).astype(v_BSKG.dtype)
  out_BTKnG = jnp.einsum("bknts,bskg->btkng", probs_BKnTS, v_BSKG)
  return out_BTKnG.reshape(B, T, N, v_BSKG.shape[-1])


# --- the fused kernels (local arrays: one shard's rows and heads) ------------------------


def _pad_value_dim(v_BSKG, H: int):
  G = v_BSKG.shape[-1]
  return v_BSKG if G == H else jnp.pad(v_BSKG, ((0, 0), (0, 0), (0, 0), (0, H - G)))


def _repeat_heads(x_BSKH, N: int):
  K = x_BSKH.shape[2]
  return x_BSKH if K == N else jnp.repeat(x_BSKH, N // K, axis=2)


def _tile(T: int) -> int:
  """Rows per kernel block: 128, or a power of two >= 16 for a short row."""
  return 128 if T > 64 else max(16, 1 << (T - 1).bit_length())


def _pad_rows(q_BTNH, k_BTNH, v_BTNG, segment_ids_BT, tile: int):
  """Pads T to whole tiles; padded rows get segment id -1, so no real query sees them."""
  T = q_BTNH.shape[1]
  Tp = -(-T // tile) * tile
  if Tp == T:
    return q_BTNH, k_BTNH, v_BTNG, segment_ids_BT
  rows = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
  return (jnp.pad(q_BTNH, rows), jnp.pad(k_BTNH, rows), jnp.pad(v_BTNG, rows),
          jnp.pad(segment_ids_BT, ((0, 0), (0, Tp - T)), constant_values=-1))


def _cudnn(q_BTNH, k_BTKH, v_BTKG, segment_ids_BT, scale: float, window: int = 0,
           softcap: float = 0.0):
  assert not softcap, "fmjax.validate refuses soft-capped scores with the cudnn kernel"
  H, G = q_BTNH.shape[-1], v_BTKG.shape[-1]
  same_B1TT = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
  out_BTNH = jax.nn.dot_product_attention(
      q_BTNH, k_BTKH, _pad_value_dim(v_BTKG, H), mask=same_B1TT, scale=scale, is_causal=True,
      local_window_size=(window - 1, 0) if window else None, implementation="cudnn")
  return out_BTNH[..., :G]


def _pallas(q_BTNH, k_BTKH, v_BTKG, segment_ids_BT, scale: float, window: int = 0,
            softcap: float = 0.0):
  assert not (window or softcap), "fmjax.validate refuses a window or a softcap with pallas"
  # Imported here: Pallas loads its GPU lowering, which a CPU-only run of fmjax never needs.
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention
  B, T, N, H = q_BTNH.shape
  G = v_BTKG.shape[-1]
  k_BTNH = _repeat_heads(k_BTKH, N)
  v_BTNH = _repeat_heads(_pad_value_dim(v_BTKG, H), N)
  tile = _tile(T)
  q, k, v, seg = _pad_rows(q_BTNH, k_BTNH, v_BTNH, segment_ids_BT, tile)
  blocks = gpu_attention.BlockSizes(block_q=tile, block_k=tile, block_q_dkv=min(32, tile),
                                    block_kv_dkv=min(32, tile), block_q_dq=min(32, tile),
                                    block_kv_dq=min(32, tile))
  out = gpu_attention.mha(q, k, v, seg, sm_scale=scale, causal=True, block_sizes=blocks,
                          interpret=jax.default_backend() == "cpu")
  return out[:, :T, :, :G]


SPLASH_TILE = 128  # splash blocks are whole multiples of the TPU's 128 lanes


def _splash_kernel(N: int, T: int, interpret: bool, window: int = 0, softcap: float = 0.0):
  # Imported here: the TPU kernel library is needed only where splash is chosen.
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  tile = SPLASH_TILE
  one = sm.LocalMask((T, T), (window - 1, 0), offset=0) if window else sm.CausalMask((T, T))
  mask = sm.MultiHeadMask([one for _ in range(N)])
  blocks = sk.BlockSizes(block_q=tile, block_kv=tile, block_kv_compute=tile, block_q_dkv=tile,
                         block_kv_dkv=tile, block_kv_dkv_compute=tile, block_q_dq=tile,
                         block_kv_dq=tile)
  return sk, sk.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                attn_logits_soft_cap=softcap or None, interpret=interpret)


def _splash(q_BTNH, k_BTKH, v_BTKG, segment_ids_BT, scale: float, window: int = 0,
            softcap: float = 0.0):
  B, T, N, H = q_BTNH.shape
  k_BTNH, v_BTNG = _repeat_heads(k_BTKH, N), _repeat_heads(v_BTKG, N)
  q, k, v, seg = _pad_rows(q_BTNH * jnp.asarray(scale, q_BTNH.dtype), k_BTNH, v_BTNG,
                           segment_ids_BT, SPLASH_TILE)
  sk, kernel = _splash_kernel(N, q.shape[1], jax.default_backend() == "cpu", window, softcap)
  heads_first = lambda x: x.transpose(0, 2, 1, 3)
  out_BNTG = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(s, s)))(
      heads_first(q), heads_first(k), heads_first(v), seg)
  return heads_first(out_BNTG)[:, :T]


KERNELS = {"cudnn": _cudnn, "pallas": _pallas, "splash": _splash}


def _sharded(kernel, q_BTNH, k_BTKH, v_BTKG, segment_ids_BT, scale, spec, window: int):
  """Runs a kernel on each device's rows and heads under the current mesh (if any)."""
  mesh = jax.sharding.get_abstract_mesh()
  fn = functools.partial(kernel, scale=scale, window=window, softcap=spec.model.attn_softcap)
  if mesh.empty:
    return fn(q_BTNH, k_BTKH, v_BTKG, segment_ids_BT)
  rules = spec.activations
  sized = lambda axes: tuple(a for a in parse_axes(axes) if mesh.shape[a] > 1) or None
  batch, heads, kv_heads = sized(rules.batch), sized(rules.heads), sized(rules.kv_heads)
  N, K = q_BTNH.shape[2], k_BTKH.shape[2]
  heads_size = math.prod(mesh.shape[a] for a in heads or ())
  if K != N and (heads_size > 1 and kv_heads != heads):
    # Key/value heads not split like the query heads: give each query head its own.
    k_BTKH, v_BTKG = _repeat_heads(k_BTKH, N), _repeat_heads(v_BTKG, N)
    kv_heads = heads
  q_spec, kv_spec = P(batch, None, heads, None), P(batch, None, kv_heads, None)
  return jax.shard_map(fn, in_specs=(q_spec, kv_spec, kv_spec, P(batch, None)),
                       out_specs=q_spec, check_vma=False)(q_BTNH, k_BTKH, v_BTKG, segment_ids_BT)


def attend(q_BTNH, k_BTKH, v_BTKG, segment_ids_BT, scale: float, spec,
           local=True) -> jax.Array:
  """Causal self-attention within each packed document of a row: (B, T, N, G).

  `local`: whether this layer keeps model.sliding_window (a bool or a traced one).
  """
  impl, m = _impl(spec, q_BTNH), spec.model
  if impl == "xla":
    return _per_layer(local, m.sliding_window, lambda w: xla(
        q_BTNH, k_BTKH, v_BTKG, segment_mask(segment_ids_BT, w), scale, m.attn_softcap))
  return _per_layer(local, m.sliding_window, lambda w: _sharded(
      KERNELS[impl], q_BTNH, k_BTKH, v_BTKG, segment_ids_BT, scale, spec, w))


def attend_cached(q_BTNH, k_BSKH, v_BSKG, positions_BT, scale: float, spec,
                  local=True) -> jax.Array:
  """Queries at `positions_BT` against a cache whose slot s holds position s: (B, T, N, G)."""
  H, G = q_BTNH.shape[-1], v_BSKG.shape[-1]
  m = spec.model
  # cuDNN's padding mask has no window or softcap: XLA decodes those
  window = 0 if isinstance(local, bool) and not local else m.sliding_window
  if (q_BTNH.shape[1] == 1 and not window and not m.attn_softcap
      and _impl(spec, q_BTNH) == "cudnn"
      and not _cudnn_unsupported(jnp.dtype(q_BTNH.dtype).name, H)):
    out_BTNH = jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, _pad_value_dim(v_BSKG, H), scale=scale,
        key_value_seq_lengths=positions_BT[:, 0].astype(jnp.int32) + 1, implementation="cudnn")
    return out_BTNH[..., :G]
  return _per_layer(local, m.sliding_window, lambda w: xla(
      q_BTNH, k_BSKH, v_BSKG, cache_mask(positions_BT, k_BSKH.shape[1], w), scale,
      m.attn_softcap))

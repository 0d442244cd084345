"""What a config costs: parameters, FLOPs per token, and the device's peak.

The formulas are closed-form in the model config; tests hold them against the
real parameter tree and against XLA's cost analysis of the compiled step.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from fmjax.nn import model
from fmjax.nn.spec import head_dim


def _attention_sizes(m) -> tuple[int, int, int]:
  """(weights in matrices, extra vectors (norm scales, biases), per-key multiply-adds) of one
  layer's attention.

  The last is what one query spends per key over all heads: q.k and p.v.
  """
  D, N = m.d_model, m.n_heads
  if m.attention == "mla":
    Q, C, R = m.q_lora_rank, m.kv_lora_rank, m.qk_rope_head_dim
    qk, dv = m.qk_nope_head_dim + R, m.v_head_dim
    query = D * Q + Q * N * qk if Q else D * N * qk
    matrices = query + D * (C + R) + C * N * (m.qk_nope_head_dim + dv) + N * dv * D
    return matrices, Q + C, N * (qk + dv)
  K, H = m.n_kv_heads, head_dim(m)
  vectors = (N + 2 * K) * H * m.attention_bias + 2 * H * m.qk_norm
  return D * N * H + 2 * D * K * H + N * H * D, vectors, 2 * N * H


def _feed_forward_sizes(m, kind: str) -> tuple[int, int, int]:
  """(parameters, parameters a token uses, multiply-adds per token) of one layer's
  feed-forward block: the dense MLP, or the MoE block (router, its bias, routed
  and shared experts; a token uses K routed experts)."""
  D = m.d_model
  if kind == "dense":
    return 3 * D * m.d_ff, 3 * D * m.d_ff, 3 * D * m.d_ff
  e = m.moe
  E, K, S, F = e.n_routed_experts, e.experts_per_token, e.n_shared_experts, e.moe_intermediate_size
  expert = 3 * D * F
  router = D * E
  return router + E + (E + S) * expert, router + E + (K + S) * expert, router + (K + S) * expert


def _layer_sizes(m, kind: str) -> tuple[int, int, int]:
  """(parameters, active parameters, matmul multiply-adds per token excluding
  attention over keys) of one Transformer layer."""
  attention, norms, _ = _attention_sizes(m)
  total, active, macs = _feed_forward_sizes(m, kind)
  fixed = (4 if m.post_norms else 2) * m.d_model + norms + attention
  return fixed + total, fixed + active, attention + macs


def param_counts(m) -> dict[str, int]:
  """total, non_embedding and active parameter counts of model config `m`.

  active: the parameters one token uses (all of a dense model; an MoE layer's
  K routed experts of E). Multi-token prediction modules count in all three.
  """
  D, V = m.d_model, m.vocab_size
  embedding = V * D * (1 if m.tie_embeddings else 2)
  total = active = embedding + D
  for kind in model.layer_kinds(m):
    layer_total, layer_active, _ = _layer_sizes(m, kind)
    total, active = total + layer_total, active + layer_active
  mtp = m.mtp_depth * (3 * D + 2 * D * D + _layer_sizes(m, "dense")[0])
  total, active = total + mtp, active + mtp
  return {"total": total, "non_embedding": total - embedding, "active": active}


ATTENTION_COUNTS = ("square", "causal")


def flops_per_token(m, seq_len: int, training: bool = True, attention: str = "square") -> float:
  """Matmul FLOPs per token: 2 per multiply-add, x3 for a training step.

  `attention` says how many keys a query's scores and values are counted over:
  "square" counts all T of a row's keys, as the compiled XLA dot products
  compute them (the causal half is masked, not skipped); "causal" counts the
  query's own key and those before it, (T + 1) / 2 on average, which is what
  a kernel that skips the masked half computes, and the figure MFU is quoted
  against (with model.sliding_window, the keys inside the window, in the layers
  that keep it: `model.local_layers`). Both count
  over the whole row: in a packed row, keys of earlier documents count too,
  though segment masking hides them. MLA is counted in its expanded form, as
  training runs it. An MoE layer counts its router and
  the K routed experts a token uses (plus shared ones), not all E. Each
  multi-token prediction depth adds its projection, one dense layer and the
  unembedding.
  """
  if attention not in ATTENTION_COUNTS:
    raise ValueError(f"attention={attention!r}: expected one of {ATTENTION_COUNTS}")
  D, V = m.d_model, m.vocab_size
  _, _, per_key = _attention_sizes(m)
  def layer_macs(kind, local=True):
    window = m.sliding_window if local else 0
    keys = seq_len if attention == "square" else _causal_keys(seq_len, window)
    return _layer_sizes(m, kind)[2] + keys * per_key

  macs = sum(layer_macs(kind, local) for kind, local in
             zip(model.layer_kinds(m), model.local_layers(m))) + D * V
  macs += m.mtp_depth * (2 * D * D + layer_macs("dense") + D * V)
  forward = 2 * macs
  return 3 * forward if training else forward


def _causal_keys(T: int, window: int) -> float:
  """Keys a query sees on average in a causal row of T, with a sliding window if > 0."""
  if not window or window >= T:
    return (T + 1) / 2
  return (window * (window + 1) / 2 + (T - window) * window) / T


def cache_bytes_per_token(m) -> int:
  """Bytes the decoding cache holds per token, over all layers."""
  if m.attention == "mla":
    per_layer = m.kv_lora_rank + m.qk_rope_head_dim
  else:
    per_layer = 2 * m.n_kv_heads * head_dim(m)
  return m.n_layers * per_layer * jnp.dtype(m.dtype).itemsize


# Dense bf16 peak FLOP/s by device kind, from datasheets. Kinds are matched by
# prefix, in this order: a more specific name comes before its prefix.
_DATASHEET = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12, "TPU v5e": 197e12,  # v5e reports itself as "TPU v5 lite"
    "TPU v5p": 459e12, "TPU v5": 459e12,  # v5p reports itself as "TPU v5"
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,  # Trillium
    "NVIDIA H100 PCIe": 756e12, "NVIDIA H100": 989e12,  # SXM
    "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


def datasheet_peak(device_kind: str) -> tuple[float, str] | None:
  """(dense bf16 peak FLOP/s of one device, its datasheet name), or None if unknown."""
  for name, peak in _DATASHEET.items():
    if device_kind.startswith(name):
      return peak, name
  return None


@functools.cache
def peak_flops(dtype: str = "float32", n_devices: int | None = None) -> tuple[float, str]:
  """(peak FLOP/s of `n_devices` devices (default: all of this process's), where the figure
  came from).

  Accelerators use their datasheet. A CPU has none, so its peak is measured
  with a large jitted matmul in the compute dtype; fake CPU devices share the
  same cores, so that one figure is the whole host's peak, whatever `n_devices`.
  """
  devices = jax.local_devices()
  n = len(devices) if n_devices is None else n_devices
  kind = devices[0].device_kind
  sheet = datasheet_peak(kind)
  if sheet is not None:
    return sheet[0] * n, f"datasheet {sheet[1]} x{n}"
  return measure_matmul_flops(dtype), f"measured {dtype} matmul on {kind}"


def measure_matmul_flops(dtype: str = "float32", sizes=(1024, 2048), repeats: int = 5) -> float:
  """Best FLOP/s of jitted n x n matmuls on one device, over `sizes` and `repeats`.

  The best, not the mean: on a shared machine, other work only slows a run down.
  """
  device = jax.devices()[0]
  matmul = jax.jit(lambda x, y: x @ y)
  best = 0.0
  for n in sizes:
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    matmul(a, a).block_until_ready()
    for _ in range(repeats):
      start = time.perf_counter()
      matmul(a, a).block_until_ready()
      best = max(best, 2 * n**3 / (time.perf_counter() - start))
  return best

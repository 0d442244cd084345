"""Mixture of experts: the MoE feed-forward block, its router and its load balancing.

A block's MLP, like fmjax/nn/mlp.py (`decls(m)`, `apply(p, x_BTD, spec)`), except
that `apply` also returns the layer's routing statistics. For each token, with
E routed experts (settings in `model.moe`, named as in DeepSeek-V3):

  scores   s = softmax(x W_r) or sigmoid(x W_r)                      (B, T, E)
  select   the top K experts by s + b, where b is the aux-free bias (zero
           unless balance='aux_free'); with n_group > 1 only from the
           topk_group groups scoring best (a group's score: the sum of its two
           best for sigmoid, as V3; its best for softmax, as V2)
  gates    g = s at the selected experts (never s + b), divided by their sum
           if norm_topk_prob, times routed_scaling_factor
  output   sum_k g_k expert_k(x) + sum over shared experts of shared(x)

Experts are SwiGLU MLPs of width moe_intermediate_size; the shared experts
are one SwiGLU of n_shared_experts times that width. fmjax/nn/dispatch.py moves
tokens to experts (capacity or dropless; expert parallel under a mesh).

Load balancing:
- the f.P loss (Switch; DeepSeek's sequence-wise form with aux_loss_scope =
  'sequence'): E/K sum_e f_e P_e, f_e the fraction of assignments to e, P_e
  the mean normalized score; 1 when balanced. Plus the router z-loss
  mean(logsumexp(x W_r)^2).
- aux-loss-free (DeepSeek-V3): after each step, b_e += gamma * sign(mean load
  - load_e). The bias is a parameter that no gradient reaches (it only moves
  a top-k), so the optimizer leaves it alone; `update_bias` moves it.

Suffixes: B batch, T positions, D width, E experts, K experts per token,
F expert width, G groups, L layers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.nn import dispatch, layers
from fmjax.nn.params import Param, normal, zeros

# The routing statistics each MoE layer returns (stacked over layers by the scan).
STATS = ("load", "dropped", "aux", "router_z")


def decls(m) -> dict:
  e = m.moe
  D, L, E, F = m.d_model, m.n_layers, e.n_routed_experts, e.moe_intermediate_size
  std, out_std = m.init_std, m.init_std / math.sqrt(2 * L)
  out = {
      "router": Param((L, D, E), ("layers", "embed", None), normal(std)),
      "router_bias": Param((L, E), ("layers", "expert"), zeros),
      "w_gate": Param((L, E, D, F), ("layers", "expert", "embed", "mlp"), normal(std)),
      "w_up": Param((L, E, D, F), ("layers", "expert", "embed", "mlp"), normal(std)),
      "w_down": Param((L, E, F, D), ("layers", "expert", "mlp", "embed"), normal(out_std)),
  }
  if e.n_shared_experts:
    Fs = e.n_shared_experts * F
    out.update({
        "shared_gate": Param((L, D, Fs), ("layers", "embed", "mlp"), normal(std)),
        "shared_up": Param((L, D, Fs), ("layers", "embed", "mlp"), normal(std)),
        "shared_down": Param((L, Fs, D), ("layers", "mlp", "embed"), normal(out_std)),
    })
  return out


def route(p, x_BTD, e):
  """(logits (B, T, E), scores (B, T, E), selected experts (B, T, K), gates (B, T, K))."""
  logits_BTE = jnp.einsum("btd,de->bte", x_BTD.astype(jnp.float32), p["router"])
  if e.score == "softmax":
    scores_BTE = jax.nn.softmax(logits_BTE, axis=-1)
  else:
    scores_BTE = jax.nn.sigmoid(logits_BTE)
  choice_BTE = jax.lax.stop_gradient(scores_BTE)
  if e.balance == "aux_free":
    choice_BTE = choice_BTE + jax.lax.stop_gradient(p["router_bias"])
  if e.n_group > 1:
    B, T, E = choice_BTE.shape
    grouped = choice_BTE.reshape(B, T, e.n_group, E // e.n_group)
    if e.score == "sigmoid":
      group_BTG = jax.lax.top_k(grouped, min(2, E // e.n_group))[0].sum(-1)
    else:
      group_BTG = grouped.max(-1)
    top_groups = jax.lax.top_k(group_BTG, e.topk_group)[1]
    keep_BTG = jnp.any(jax.nn.one_hot(top_groups, e.n_group, dtype=jnp.bool_), axis=-2)
    keep_BTE = jnp.repeat(keep_BTG, E // e.n_group, axis=-1)
    choice_BTE = jnp.where(keep_BTE, choice_BTE, -jnp.inf)
  _, idx_BTK = jax.lax.top_k(choice_BTE, e.experts_per_token)
  gates_BTK = jnp.take_along_axis(scores_BTE, idx_BTK, axis=-1)
  if e.norm_topk_prob:
    gates_BTK = gates_BTK / (jnp.sum(gates_BTK, axis=-1, keepdims=True) + 1e-20)
  return logits_BTE, scores_BTE, idx_BTK, gates_BTK * e.routed_scaling_factor


def balance_loss(scores_BTE, idx_BTK, scope: str):
  """E/K sum_e f_e P_e over the batch, or per sequence and averaged: 1 when balanced."""
  E, K = scores_BTE.shape[-1], idx_BTK.shape[-1]
  probs_BTE = scores_BTE / jnp.sum(scores_BTE, axis=-1, keepdims=True)
  chosen_BTE = jnp.sum(jax.nn.one_hot(idx_BTK, E, dtype=jnp.float32), axis=-2)
  axes = (1,) if scope == "sequence" else (0, 1)
  f = jnp.mean(chosen_BTE, axis=axes) * E / K
  return jnp.mean(jnp.sum(f * jnp.mean(probs_BTE, axis=axes), axis=-1))


def apply(p, x_BTD, spec, dropless: bool | None = None):
  """The MoE block's output (B, T, D) and this layer's statistics (see STATS).

  `dropless` overrides model.moe.dispatch (decoding never drops tokens).
  """
  e = spec.model.moe
  logits_BTE, scores_BTE, idx_BTK, gates_BTK = route(p, x_BTD, e)
  y_BTD, dropped = dispatch.routed_experts(
      x_BTD, idx_BTK, gates_BTK, (p["w_gate"], p["w_up"], p["w_down"]), spec, dropless)
  if e.n_shared_experts:
    dt = x_BTD.dtype
    y_BTD = y_BTD + layers.gated_mlp(x_BTD, p["shared_gate"].astype(dt),
                                     p["shared_up"].astype(dt), p["shared_down"].astype(dt))
  stats = {
      "load": jnp.sum(jax.nn.one_hot(idx_BTK, e.n_routed_experts, dtype=jnp.float32),
                      axis=(0, 1, 2)),
      "dropped": dropped.astype(jnp.float32),
      "aux": balance_loss(scores_BTE, idx_BTK, e.aux_loss_scope),
      "router_z": jnp.mean(jax.nn.logsumexp(logits_BTE, axis=-1)**2),
  }
  return y_BTD, stats


def add_losses(loss, stats, moe_stats, spec):
  """Adds the balancing losses of all MoE layers to an objective's sums.

  Objectives return sums over tokens, so each per-step mean is weighted by
  the step's `tokens`. `moe_stats` holds each STATS entry stacked over the MoE
  layers; the statistics gain moe_* entries (sums, so microbatches add up).
  """
  e = spec.model.moe
  tokens = stats["tokens"]
  aux = jnp.sum(moe_stats["aux"]) * tokens
  router_z = jnp.sum(moe_stats["router_z"]) * tokens
  aux_coef = e.aux_loss_coef if e.balance != "none" else 0.0
  loss = loss + aux_coef * aux + e.router_z_loss_coef * router_z
  stats = dict(stats, moe_aux=aux, moe_router_z=router_z, moe_load=moe_stats["load"],
               moe_dropped=jnp.sum(moe_stats["dropped"]))
  return loss, stats


def update_bias(bias_LE, load_LE, rate: float):
  """DeepSeek-V3's aux-loss-free step: +rate for experts below the mean load, -rate above."""
  mean_L1 = jnp.mean(load_LE, axis=-1, keepdims=True)
  return bias_LE + rate * jnp.sign(mean_L1 - load_LE)


def summarize(stats) -> dict:
  """Record fields from a step's fetched statistics (none for a dense model)."""
  if "moe_load" not in stats:
    return {}
  n = max(float(stats["tokens"]), 1.0)
  load = np.asarray(stats["moe_load"], np.float64)  # (MoE layers, E) assignments
  frac = load / np.maximum(load.sum(-1, keepdims=True), 1.0)
  # The losses are summed over MoE layers (as the objective adds them).
  out = {"moe_aux_loss": float(stats["moe_aux"]) / n,
         "moe_router_z_loss": float(stats["moe_router_z"]) / n,
         "moe_drop_rate": float(stats["moe_dropped"]) / max(float(load.sum()), 1.0),
         "moe_load_max": float(frac.max() * frac.shape[-1]),  # 1 when balanced
         "moe_load": np.round(frac, 5).tolist()}
  if "moe_bias_min" in stats:
    out.update(moe_bias_min=float(stats["moe_bias_min"]),
               moe_bias_max=float(stats["moe_bias_max"]))
  return out

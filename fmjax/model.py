"""The dense decoder: parameter declarations and the forward pass.

Pre-norm Transformer blocks (RMSNorm, RoPE, grouped-query attention, SwiGLU),
stacked along a leading 'layers' axis and run with `jax.lax.scan`.
`cfg` is the experiment config: the model reads `cfg.model` and pins its
activations with the rules in `cfg.sharding.activations`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fmjax import config as config_lib
from fmjax import layers
from fmjax.params import Param, normal, ones
from fmjax.sharding import constrain

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def param_decls(m) -> dict:
  """Declarations of every parameter of the model config `m`."""
  D, V, L, F = m.d_model, m.vocab_size, m.n_layers, m.d_ff
  N, K, H = m.n_heads, m.n_kv_heads, config_lib.head_dim(m)
  std, out_std = m.init_std, m.init_std / math.sqrt(2 * L)
  decls = {
      "embed": Param((V, D), ("vocab", "embed"), normal(std)),
      "layers": {
          "attn_norm": Param((L, D), ("layers", "embed"), ones),
          "wq": Param((L, D, N, H), ("layers", "embed", "heads", "head_dim"), normal(std)),
          "wk": Param((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), normal(std)),
          "wv": Param((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), normal(std)),
          "wo": Param((L, N, H, D), ("layers", "heads", "head_dim", "embed"), normal(out_std)),
          "mlp_norm": Param((L, D), ("layers", "embed"), ones),
          "w_gate": Param((L, D, F), ("layers", "embed", "mlp"), normal(std)),
          "w_up": Param((L, D, F), ("layers", "embed", "mlp"), normal(std)),
          "w_down": Param((L, F, D), ("layers", "mlp", "embed"), normal(out_std)),
      },
      "final_norm": Param((D,), ("embed",), ones),
  }
  if not m.tie_embeddings:
    decls["unembed"] = Param((D, V), ("embed", "vocab"), normal(std))
  return decls


def _block(x_BTD, p, cos, sin, mask_B1TT, cfg):
  """One Transformer layer; `p` holds this layer's slice of the stacked params."""
  m, rules = cfg.model, cfg.sharding.activations
  dt = x_BTD.dtype
  with jax.named_scope("attention"):
    h_BTD = layers.rms_norm(x_BTD, p["attn_norm"], m.norm_eps)
    q_BTNH = jnp.einsum("btd,dnh->btnh", h_BTD, p["wq"].astype(dt))
    k_BTKH = jnp.einsum("btd,dkh->btkh", h_BTD, p["wk"].astype(dt))
    v_BTKH = jnp.einsum("btd,dkh->btkh", h_BTD, p["wv"].astype(dt))
    q_BTNH = constrain(q_BTNH, ("batch", "seq", "heads", "head_dim"), rules)
    k_BTKH = constrain(k_BTKH, ("batch", "seq", "kv_heads", "head_dim"), rules)
    q_BTNH = layers.apply_rope(q_BTNH, cos, sin)
    k_BTKH = layers.apply_rope(k_BTKH, cos, sin)
    o_BTNH = layers.attention(q_BTNH, k_BTKH, v_BTKH, mask_B1TT)
    x_BTD = x_BTD + jnp.einsum("btnh,nhd->btd", o_BTNH, p["wo"].astype(dt))
    x_BTD = constrain(x_BTD, ("batch", "seq", "embed"), rules)
  with jax.named_scope("mlp"):
    h_BTD = layers.rms_norm(x_BTD, p["mlp_norm"], m.norm_eps)
    x_BTD = x_BTD + layers.swiglu(
        h_BTD, p["w_gate"].astype(dt), p["w_up"].astype(dt), p["w_down"].astype(dt))
    x_BTD = constrain(x_BTD, ("batch", "seq", "embed"), rules)
  return x_BTD


def embed(params, tokens_BT, cfg) -> jax.Array:
  m, rules = cfg.model, cfg.sharding.activations
  with jax.named_scope("embed"):
    # Gather the table whole first (as FSDP does for every weight): a lookup
    # into a vocab-sharded table is not something the partitioner does well.
    table_VD = constrain(params["embed"], (None, "embed"), rules)
    x_BTD = jnp.take(table_VD, tokens_BT, axis=0).astype(jnp.dtype(m.dtype))
    return constrain(x_BTD, ("batch", "seq", "embed"), rules)


def decode(params, x_BTD, segment_ids_BT, positions_BT, cfg) -> jax.Array:
  """Runs the layers and the final norm over embeddings: hidden states (B, T, D)."""
  m = cfg.model
  cos, sin = layers.rope_angles(positions_BT, config_lib.head_dim(m), m.rope_theta)
  mask_B1TT = layers.attention_mask(segment_ids_BT)

  def block(x_BTD, p):
    return _block(x_BTD, p, cos, sin, mask_B1TT, cfg)

  if m.remat != "none":
    block = jax.checkpoint(block, policy=REMAT_POLICIES[m.remat], prevent_cse=not m.scan_layers)
  with jax.named_scope("layers"):
    if m.scan_layers:
      x_BTD, _ = jax.lax.scan(lambda x, p: (block(x, p), None), x_BTD, params["layers"])
    else:
      for i in range(m.n_layers):
        x_BTD = block(x_BTD, jax.tree.map(lambda a: a[i], params["layers"]))
  return layers.rms_norm(x_BTD, params["final_norm"], m.norm_eps)


def unembed(params, h_BTD, cfg) -> jax.Array:
  """Logits (B, T, V) in float32."""
  m, rules = cfg.model, cfg.sharding.activations
  with jax.named_scope("unembed"):
    w_DV = params["embed"].T if m.tie_embeddings else params["unembed"]
    logits_BTV = jnp.einsum("btd,dv->btv", h_BTD, w_DV.astype(h_BTD.dtype),
                            preferred_element_type=jnp.float32)
    return constrain(logits_BTV, ("batch", "seq", "vocab"), rules)


def forward(params, tokens_BT, segment_ids_BT, positions_BT, cfg) -> jax.Array:
  """Next-token logits (B, T, V) in float32."""
  x_BTD = embed(params, tokens_BT, cfg)
  return unembed(params, decode(params, x_BTD, segment_ids_BT, positions_BT, cfg), cfg)

"""The decoder: parameter declarations and the forward pass.

Pre-norm Transformer blocks (RMSNorm, then attention; RMSNorm, then MLP),
stacked along a leading 'layers' axis and run with `jax.lax.scan`. The
attention kind is `model.attention`: grouped-query (fmjax/gqa.py) or
multi-head latent attention (fmjax/mla.py); the MLP is fmjax/mlp.py. Each of
those modules declares its own parameters and applies them.

`cfg` is the experiment config: the model reads `cfg.model` and pins its
activations with the rules in `cfg.sharding.activations`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fmjax import gqa, layers, mla, mlp, rope
from fmjax.params import Param, normal, ones
from fmjax.sharding import constrain

ATTENTION = {"gqa": gqa, "mla": mla}

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def param_decls(m) -> dict:
  """Declarations of every parameter of the model config `m`."""
  D, V, L = m.d_model, m.vocab_size, m.n_layers
  decls = {
      "embed": Param((V, D), ("vocab", "embed"), normal(m.init_std)),
      "layers": {
          "attn_norm": Param((L, D), ("layers", "embed"), ones),
          **ATTENTION[m.attention].decls(m),
          "mlp_norm": Param((L, D), ("layers", "embed"), ones),
          **mlp.decls(m),
      },
      "final_norm": Param((D,), ("embed",), ones),
  }
  if not m.tie_embeddings:
    decls["unembed"] = Param((D, V), ("embed", "vocab"), normal(m.init_std))
  return decls


def cache_decls(m, batch: int, length: int) -> dict:
  """The decoding cache of `length` slots for `batch` rows, declared like parameters."""
  return ATTENTION[m.attention].cache_decls(m, batch, length)


def _block(x_BTD, p, cos, sin, mask_B1TS, cfg, cache=None, start_B=None, absorbed=False):
  """One Transformer layer; `p` (and `cache`) hold this layer's slice of the stack."""
  m, rules = cfg.model, cfg.sharding.activations
  with jax.named_scope("attention"):
    h_BTD = layers.rms_norm(x_BTD, p["attn_norm"], m.norm_eps)
    a_BTD, cache = ATTENTION[m.attention].apply(p, h_BTD, cos, sin, mask_B1TS, cfg, cache,
                                                start_B, absorbed)
    x_BTD = constrain(x_BTD + a_BTD, ("batch", "seq", "embed"), rules)
  with jax.named_scope("mlp"):
    h_BTD = layers.rms_norm(x_BTD, p["mlp_norm"], m.norm_eps)
    x_BTD = constrain(x_BTD + mlp.apply(p, h_BTD, cfg), ("batch", "seq", "embed"), rules)
  return x_BTD, cache


def _rope(positions_BT, m):
  dim = ATTENTION[m.attention].rope_dim(m)
  return rope.angles(positions_BT, rope.inv_frequencies(dim, m.rope_theta, m.rope_scaling))


def _run_layers(block, x_BTD, xs, m):
  """Folds `block(x, layer slices) -> (x, y)` over the layers; ys come back stacked."""
  with jax.named_scope("layers"):
    if m.scan_layers:
      return jax.lax.scan(block, x_BTD, xs)
    ys = []
    for i in range(m.n_layers):
      x_BTD, y = block(x_BTD, jax.tree.map(lambda a: a[i], xs))
      ys.append(y)
    return x_BTD, jax.tree.map(lambda *a: jnp.stack(a), *ys)


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
  cos, sin = _rope(positions_BT, m)
  mask_B1TT = layers.attention_mask(segment_ids_BT)

  def block(x_BTD, p):
    return _block(x_BTD, p, cos, sin, mask_B1TT, cfg)[0], None

  if m.remat != "none":
    block = jax.checkpoint(block, policy=REMAT_POLICIES[m.remat], prevent_cse=not m.scan_layers)
  x_BTD, _ = _run_layers(block, x_BTD, params["layers"], m)
  return layers.rms_norm(x_BTD, params["final_norm"], m.norm_eps)


def decode_cached(params, x_BTD, start_B, cache, cfg, absorbed=False):
  """Hidden states (B, T, D) of T new tokens per row, and the updated cache.

  Row b's new tokens sit at positions start_B[b] + [0, T); they are written
  into cache slots of the same index and attend to every slot up to their own
  position, so a row's earlier slots must hold its earlier tokens. Slots past
  a position are masked, whatever they hold (padding, stale entries).
  """
  m = cfg.model
  positions_BT = start_B[:, None] + jnp.arange(x_BTD.shape[1], dtype=start_B.dtype)
  cos, sin = _rope(positions_BT, m)
  num_slots = jax.tree.leaves(cache)[0].shape[2]
  mask_B1TS = layers.causal_mask(positions_BT, num_slots)

  def block(x_BTD, layer):
    p, c = layer
    return _block(x_BTD, p, cos, sin, mask_B1TS, cfg, c, start_B, absorbed)

  x_BTD, cache = _run_layers(block, x_BTD, (params["layers"], cache), m)
  return layers.rms_norm(x_BTD, params["final_norm"], m.norm_eps), cache


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

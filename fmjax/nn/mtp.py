"""Multi-token prediction, as in DeepSeek-V3 (`model.mtp_depth` = D, weight `model.mtp_weight`).

Depth k = 1..D predicts the token k+1 places ahead, from the previous depth's
hidden states (the main model's, before its final norm, for k = 1) and the
embedding of the token k places ahead:

  h'_i = W_k [rms_norm(h_i^(k-1)); rms_norm(emb(t_(i+k)))]      W_k: 2D -> D
  h^k  = Transformer layer_k(h')                                 (causal, per document)
  p    = softmax(unembed(rms_norm(h^k)))    predicting t_(i+k+1)

The embedding and output head are the main model's. Each depth's layer is
dense (attention and the model.d_ff MLP), even in an MoE model. The loss adds
mtp_weight / D x sum over depths of the cross-entropy sums; a position counts
at depth k only if tokens i .. i+k+1 are in one document (and its loss mask).
Training only: decoding ignores these modules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fmjax.nn import block, layers
from fmjax.nn.params import Param, normal


def decls(m) -> dict:
  n, D = m.mtp_depth, m.d_model
  return {
      "hnorm": layers.norm_scale((n, D), ("layers", "embed"), m),
      "enorm": layers.norm_scale((n, D), ("layers", "embed"), m),
      "proj": Param((n, 2 * D, D), ("layers", None, "embed"), normal(m.init_std)),
      "norm": layers.norm_scale((n, D), ("layers", "embed"), m),
      "block": block.decls(m, "dense", n),
  }


def _shift(x_BT, k: int):
  """x[:, i + k], zeros past the end."""
  if k == 0:
    return x_BT
  pad = jnp.zeros((x_BT.shape[0], k) + x_BT.shape[2:], x_BT.dtype)
  return jnp.concatenate([x_BT[:, k:], pad], axis=1)


def add_loss(loss, stats, params, x_BTD, embeddings_BTD, batch, weights_BT, spec, unembed,
             cross_entropy_sums):
  """Adds the MTP loss to an objective's sums; stats gain `mtp_nll` (summed over depths).

  `x_BTD` is the main model's last hidden state before the final norm,
  `embeddings_BTD` its input embeddings, `weights_BT` the next-token weights.
  """
  m = spec.model
  p_all = params["mtp"]
  tokens_BT = batch["tokens"]
  rope_tables = block.layer_rope(batch["positions"], m)
  h_BTD = x_BTD
  weights_k_BT = weights_BT
  nll = jnp.zeros((), jnp.float32)
  for k in range(1, m.mtp_depth + 1):
    p = jax.tree.map(lambda a: a[k - 1], p_all)
    e_BTD = _shift(embeddings_BTD, k)
    both_BT2D = jnp.concatenate([layers.norm(h_BTD, p["hnorm"], m),
                                 layers.norm(e_BTD, p["enorm"], m)], axis=-1)
    h_BTD = jnp.einsum("btc,cd->btd", both_BT2D, p["proj"].astype(both_BT2D.dtype))
    with jax.named_scope(f"mtp{k}"):
      h_BTD, _, _ = block.apply(h_BTD, p["block"], rope_tables, batch["segment_ids"], spec,
                                "dense")
    weights_k_BT = weights_k_BT * _shift(weights_BT, k)
    logits_BTV = unembed(layers.norm(h_BTD, p["norm"], m))
    _, s = cross_entropy_sums(logits_BTV, _shift(tokens_BT, k + 1), weights_k_BT, 0.0)
    nll = nll + s["nll"]
  return loss + m.mtp_weight / m.mtp_depth * nll, dict(stats, mtp_nll=nll)

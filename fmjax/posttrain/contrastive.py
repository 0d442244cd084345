"""Contrastive embeddings: InfoNCE with in-batch negatives (`objective.name = 'contrastive'`).

A batch holds B pairs (anchor_*, positive_* rows; fmjax.data.task_batches).
Each side is embedded by the decoder's final hidden states, pooled over its
tokens (mean, or the last token), optionally projected by a head, and
L2-normalised. With s = exp(logit_scale), the B x B logits are
s * anchors @ positives.T and pair i's positive is column i; every other
column is a negative. The embeddings are global (B, E) arrays, so under the
sharded step the negatives are all B rows of the global batch, across every
data-parallel shard, not only the rows a device holds: XLA gathers the
positives for the product.

The loss is cross-entropy over the rows (anchor -> positive) and, if
symmetric, over the columns too (positive -> anchor, CLIP's), averaged.
logit_scale is learned, starts at ln(1/temperature) and is clamped to
ln(max_logit_scale) (CLIP: 100) in the forward pass.

Statistics are sums over pairs: loss, accuracy (the anchor's top-1 column is
its positive), recall_at_5, and temperature (1/s, times B). Evaluated on one
batch of all held-out pairs, accuracy and recall_at_5 are recall@1 and
recall@5 of retrieving each held-out anchor's positive among all of them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fmjax.nn import model
from fmjax.nn.params import Param, normal
from fmjax.nn.sharding import constrain


def head_decls(cfg) -> dict:
  """The temperature and, if objective.contrastive.projection_dim > 0, a projection."""
  c = cfg.objective.contrastive
  init_scale = math.log(1.0 / c.temperature)
  out = {"logit_scale": Param((), (), lambda key, shape, dtype: jnp.full(shape, init_scale,
                                                                         dtype))}
  if c.projection_dim:
    D = cfg.model.d_model
    out["projection"] = Param((D, c.projection_dim), ("embed", None), normal(D**-0.5))
  return out


def embed(params, tokens_BT, segment_ids_BT, positions_BT, spec, c) -> jax.Array:
  """L2-normalised embeddings (B, E) of one sequence per row, pooled over its tokens."""
  h_BTD = model.decode(params, model.embed(params, tokens_BT, spec), segment_ids_BT,
                       positions_BT, spec).astype(jnp.float32)
  mask_BT = (segment_ids_BT != 0).astype(jnp.float32)
  if c.pooling == "mean":
    e_BD = jnp.sum(h_BTD * mask_BT[..., None], axis=1) / jnp.maximum(
        jnp.sum(mask_BT, axis=1, keepdims=True), 1.0)
  else:  # last: the last token of the row (eos, unless the text was cut)
    last_B = jnp.maximum(jnp.sum(mask_BT, axis=1).astype(jnp.int32) - 1, 0)
    e_BD = jnp.take_along_axis(h_BTD, last_B[:, None, None], axis=1)[:, 0]
  if "projection" in params["head"]:
    e_BD = e_BD @ params["head"]["projection"]
  e_BD = constrain(e_BD, ("batch", None), spec.activations)
  return e_BD * jax.lax.rsqrt(jnp.maximum(jnp.sum(e_BD**2, axis=-1, keepdims=True), 1e-12))


def logit_scale(params, c) -> jax.Array:
  return jnp.minimum(params["head"]["logit_scale"],
                     math.log(c.max_logit_scale))


def info_nce(a_BE, p_BE, scale, symmetric: bool):
  """(loss per pair (B,), B x B logits) of anchors against positives, positives on the diagonal."""
  logits_BB = jnp.exp(scale) * (a_BE @ p_BE.T)
  diag_B = jnp.diagonal(logits_BB)
  loss_B = jax.nn.logsumexp(logits_BB, axis=1) - diag_B
  if symmetric:
    loss_B = 0.5 * (loss_B + jax.nn.logsumexp(logits_BB, axis=0) - diag_B)
  return loss_B, logits_BB


def contrastive(params, batch, spec, o):
  """InfoNCE over the global batch: summed loss and statistics (sums over pairs)."""
  a_BE, p_BE = (embed(params, batch[f"{side}_tokens"], batch[f"{side}_segment_ids"],
                      batch[f"{side}_positions"], spec, o.contrastive)
              for side in ("anchor", "positive"))
  scale = logit_scale(params, o.contrastive)
  loss_B, logits_BB = info_nce(a_BE, p_BE, scale, o.contrastive.symmetric)
  B = logits_BB.shape[0]
  # Rank of each anchor's positive among all B candidates (0 = retrieved first).
  rank_B = jnp.sum(logits_BB > jnp.diagonal(logits_BB)[:, None], axis=1)
  stats = {
      "pairs": jnp.asarray(B, jnp.float32),
      "loss": jnp.sum(loss_B),
      "accuracy": jnp.sum((rank_B < 1).astype(jnp.float32)),
      "recall_at_5": jnp.sum((rank_B < 5).astype(jnp.float32)),
      "temperature": B * jnp.exp(-scale),
  }
  return stats["loss"], stats

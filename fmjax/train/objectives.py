"""Training objectives: pure functions of (params, batch) to summed losses.

An objective returns sums, not means, so that microbatches add up exactly:
the train step divides the accumulated sums by what they are sums over (the
accumulated `tokens`, or `pairs` for the pair objectives) once, at the end.

  next_token   pretraining; also every packed batch with a loss_mask
  sft          next-token loss on response tokens only (the batch's loss_mask)
  dpo          preference pairs against a frozen reference (fmjax/posttrain/dpo.py)
  contrastive  InfoNCE over pooled embeddings (fmjax/posttrain/contrastive.py)
  reward_model Bradley-Terry over preference pairs (fmjax/posttrain/reward_model.py)
  grpo         policy gradient over rollouts (fmjax/posttrain/rl.py: its own train step;
               statistics are sums over `sequences`)

An objective is called as `objective(params, batch, spec, o, **frozen)`, with
the model's `ModelSpec` and the config's `objective` section `o`, where
`frozen` holds the non-trained inputs it declares (fmjax.posttrain.plan): DPO's
`reference` parameters, unless its log-probabilities were precomputed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fmjax.posttrain import contrastive, dpo, reward_model
from fmjax.nn import model, moe, mtp


def next_token_targets(batch):
  """Targets (B, T) and a 0/1 weight per position.

  Position t predicts token t+1 only inside one packed document; the last
  position of each document, padding, and positions a `loss_mask` zeroes (if
  the batch has one) carry no loss.
  """
  tokens_BT, seg_BT = batch["tokens"], batch["segment_ids"]
  targets_BT = jnp.concatenate([tokens_BT[:, 1:], jnp.zeros_like(tokens_BT[:, :1])], axis=1)
  next_seg_BT = jnp.concatenate([seg_BT[:, 1:], jnp.zeros_like(seg_BT[:, :1])], axis=1)
  weights_BT = ((seg_BT != 0) & (next_seg_BT == seg_BT)).astype(jnp.float32)
  if "loss_mask" in batch:
    weights_BT = weights_BT * batch["loss_mask"].astype(jnp.float32)
  return targets_BT, weights_BT


def cross_entropy_sums(logits_BTV, targets_BT, weights_BT, z_loss: float):
  """Summed cross-entropy (plus z-loss) and metric sums over weighted tokens."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  nll_BT = lse_BT - target_logit_BT
  z_BT = z_loss * lse_BT**2
  correct_BT = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(jnp.float32)
  stats = {
      "tokens": jnp.sum(weights_BT),
      "nll": jnp.sum(nll_BT * weights_BT),
      "z_loss": jnp.sum(z_BT * weights_BT),
      "correct": jnp.sum(correct_BT * weights_BT),
  }
  return stats["nll"] + stats["z_loss"], stats


def chunked_cross_entropy_sums(unembed, h_BTD, targets_BT, weights_BT, z_loss: float,
                               chunk: int):
  """`cross_entropy_sums` of `unembed(h_BTD)`, computed `chunk` positions at a time.

  The float32 (B, T, V) logits never exist whole: a scan over sequence chunks
  makes each (B, chunk, V) block, reduces it to sums, and drops it; the
  backward pass recomputes each block from its hidden states (one more
  unembedding matmul) instead of keeping them all.
  """
  B, T, D = h_BTD.shape
  n = T // chunk

  def split(x):  # (B, T, ...) -> (n, B, chunk, ...)
    return x.reshape(B, n, chunk, *x.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def add_chunk(total, chunk_inputs):
    h_BCD, targets_BC, weights_BC = chunk_inputs
    _, stats = cross_entropy_sums(unembed(h_BCD), targets_BC, weights_BC, z_loss)
    return jax.tree.map(jnp.add, total, stats), None

  zeros = {k: jnp.zeros((), jnp.float32) for k in ("tokens", "nll", "z_loss", "correct")}
  stats, _ = jax.lax.scan(add_chunk, zeros, (split(h_BTD), split(targets_BT), split(weights_BT)))
  return stats["nll"] + stats["z_loss"], stats


def next_token(params, batch, spec, o):
  """Next-token prediction, for pretraining and continued pretraining.

  MoE models add their balancing losses (fmjax.nn.moe), and models with
  multi-token prediction its loss (fmjax.nn.mtp).
  """
  targets_BT, weights_BT = next_token_targets(batch)
  chunk = o.ce_chunk
  x0_BTD = model.embed(params, batch["tokens"], spec)
  x_BTD, moe_stats = model.trunk(params, x0_BTD, batch["segment_ids"], batch["positions"], spec)
  h_BTD = model.final_norm(params, x_BTD, spec)
  unembed = lambda h: model.unembed(params, h, spec)
  if not chunk or chunk >= targets_BT.shape[1]:
    loss, stats = cross_entropy_sums(unembed(h_BTD), targets_BT, weights_BT, o.z_loss)
  else:
    loss, stats = chunked_cross_entropy_sums(unembed, h_BTD, targets_BT, weights_BT, o.z_loss,
                                             chunk)
  if moe_stats:
    loss, stats = moe.add_losses(loss, stats, moe_stats, spec)
  if spec.model.mtp_depth:
    loss, stats = mtp.add_loss(loss, stats, params, x_BTD, x0_BTD, batch, weights_BT, spec,
                               unembed, cross_entropy_sums)
  return loss, stats


def sft(params, batch, spec, o):
  """Supervised fine-tuning: next-token loss where the batch's loss_mask is 1 (the response)."""
  if "loss_mask" not in batch:
    raise ValueError("objective sft needs batches with a loss_mask (fmjax.data.task_batches)")
  return next_token(params, batch, spec, o)


def denominator(stats):
  """What the statistics are sums over: tokens, or pairs."""
  return stats["tokens"] if "tokens" in stats else stats["pairs"]


def summarize(stats) -> dict:
  """Means from summed statistics: loss, perplexity, accuracy (next token); for pair
  objectives, the mean of every statistic per pair; RL's (`sequences`) are means already."""
  if "sequences" in stats:
    return {k: float(v) for k, v in stats.items()}
  if "nll" not in stats:
    n = max(float(stats["pairs"]), 1.0)
    return dict({k: float(v) / n for k, v in stats.items() if k != "pairs"},
                pairs=float(stats["pairs"]))
  n = max(float(stats["tokens"]), 1.0)
  loss = float(stats["nll"]) / n
  out = {"loss": loss, "perplexity": float(jnp.exp(jnp.minimum(loss, 50.0))),
         "accuracy": float(stats["correct"]) / n, "tokens": float(stats["tokens"])}
  if float(stats.get("z_loss", 0.0)):
    out["z_loss"] = float(stats["z_loss"]) / n
  return out


OBJECTIVES = {"next_token": next_token, "sft": sft, "dpo": dpo.dpo,
              "contrastive": contrastive.contrastive,
              "reward_model": reward_model.reward_model}

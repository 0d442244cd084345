"""Direct preference optimisation against a frozen reference (`objective.name = 'dpo'`).

A batch holds B preference pairs: chosen_* and rejected_* rows, one example
per row, with loss_mask[t] = 1 where token t+1 is a response token
(fmjax.data.task_batches). log pi(y|x) is summed over the response tokens
only. With m = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)):

  sigmoid  -(1 - eps) log sigmoid(beta m) - eps log sigmoid(-beta m)
           (Rafailov et al. 2023; eps > 0 is the conservative DPO of label smoothing)
  ipo      (m - 1 / (2 beta))^2                    (Azar et al. 2023)
  hinge    max(0, 1 - beta m)                      (SLiC, Zhao et al. 2023)

Rewards are beta (log pi - log ref) of each response; the statistics are
sums over pairs of rewards/chosen, rewards/rejected, rewards/margins and
rewards/accuracies (chosen reward strictly above the rejected one), as
TRL and the DPO paper report them.

The reference log-probabilities come either from the reference parameters,
computed in the same step (`reference=` params sharded like the policy's),
or precomputed once for the whole dataset and carried by the batch
(`chosen_ref_logps`, `rejected_ref_logps`, shape (B, 1)): see
`precompute` and `AttachReference`.
"""

from __future__ import annotations

import hashlib

import grain
import jax
import jax.numpy as jnp
import numpy as np

from fmjax.nn import model

SIDES = ("chosen", "rejected")
REF_KEYS = tuple(f"{side}_ref_logps" for side in SIDES)


def sequence_logps(params, tokens_BT, segment_ids_BT, positions_BT, loss_mask_BT, spec):
  """log p(response | prompt) per row (B,): log-probs summed where loss_mask is 1."""
  logits_BTV = model.forward(params, tokens_BT, segment_ids_BT, positions_BT, spec)
  targets_BT = jnp.concatenate([tokens_BT[:, 1:], jnp.zeros_like(tokens_BT[:, :1])], axis=1)
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return jnp.sum(logp_BT * loss_mask_BT.astype(jnp.float32), axis=1)


def pair_logps(params, batch, spec):
  """(chosen, rejected) log-probs (B,) of one pass over both sides stacked along the batch."""
  B = batch["chosen_tokens"].shape[0]
  cat = {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)
         for k in ("tokens", "segment_ids", "positions", "loss_mask")}
  logps = sequence_logps(params, cat["tokens"], cat["segment_ids"], cat["positions"],
                         cat["loss_mask"], spec)
  return logps[:B], logps[B:]


def losses(margin_B, d):
  """Per-pair loss of the reference-relative log-ratio margin m, for objective.dpo `d`."""
  h_B = d.beta * margin_B
  if d.loss == "sigmoid":
    eps = d.label_smoothing
    return -(1.0 - eps) * jax.nn.log_sigmoid(h_B) - eps * jax.nn.log_sigmoid(-h_B)
  if d.loss == "ipo":
    return (margin_B - 1.0 / (2.0 * d.beta))**2
  return jax.nn.relu(1.0 - h_B)  # hinge


def dpo(params, batch, spec, o, reference=None):
  """DPO loss summed over the batch's pairs, and its statistics (sums over pairs)."""
  d = o.dpo
  chosen_B, rejected_B = pair_logps(params, batch, spec)
  if reference is not None:
    ref_c_B, ref_r_B = jax.lax.stop_gradient(pair_logps(reference, batch, spec))
  else:
    ref_c_B, ref_r_B = (batch[k][:, 0] for k in REF_KEYS)
  reward_c_B = d.beta * (chosen_B - ref_c_B)
  reward_r_B = d.beta * (rejected_B - ref_r_B)
  loss_B = losses((chosen_B - ref_c_B) - (rejected_B - ref_r_B), d)
  correct = jnp.sum((reward_c_B > reward_r_B).astype(jnp.float32))
  stats = {
      "pairs": jnp.asarray(chosen_B.shape[0], jnp.float32),
      "loss": jnp.sum(loss_B),
      "accuracy": correct,
      "rewards/chosen": jnp.sum(jax.lax.stop_gradient(reward_c_B)),
      "rewards/rejected": jnp.sum(jax.lax.stop_gradient(reward_r_B)),
      "rewards/margins": jnp.sum(jax.lax.stop_gradient(reward_c_B - reward_r_B)),
      "rewards/accuracies": correct,
      "logps/chosen": jnp.sum(jax.lax.stop_gradient(chosen_B)),
      "logps/rejected": jnp.sum(jax.lax.stop_gradient(rejected_B)),
  }
  return stats["loss"], stats


# Reference log-probabilities, precomputed once per dataset.

def row_key(batch, i: int) -> bytes:
  """What identifies row i of a DPO batch: a digest of its chosen and rejected tokens."""
  h = hashlib.blake2b(digest_size=16)
  for side in SIDES:
    h.update(np.ascontiguousarray(batch[f"{side}_tokens"][i]).tobytes())
  return h.digest()


def precompute(logps_fn, batches, batch_size: int) -> dict[bytes, tuple[float, float]]:
  """{row key: (chosen, rejected) reference log-probs} over every row of `batches`.

  `logps_fn(batch)` returns the (chosen, rejected) arrays of a full batch; a
  last batch with fewer rows is padded by repeating its first row. One batch is
  in flight at a time.
  """
  table = {}
  for b in batches:
    n = len(b["chosen_tokens"])
    if n < batch_size:
      b = {k: np.concatenate([v, np.repeat(v[:1], batch_size - n, axis=0)]) for k, v in b.items()}
    chosen, rejected = (np.asarray(x) for x in jax.device_get(logps_fn(b)))
    for i in range(n):
      table[row_key(b, i)] = (float(chosen[i]), float(rejected[i]))
  return table


class AttachReference(grain.transforms.Map):
  """Adds chosen_ref_logps and rejected_ref_logps (B, 1) to a DPO batch from a table."""

  def __init__(self, table: dict):
    self.table = table

  def map(self, batch):
    n = len(batch["chosen_tokens"])
    try:
      values = np.asarray([self.table[row_key(batch, i)] for i in range(n)], np.float32)
    except KeyError:
      raise KeyError("a DPO example has no precomputed reference log-probs: the table was "
                     "made from other data") from None
    return dict(batch, **{k: values[:, j:j + 1] for j, k in enumerate(REF_KEYS)})

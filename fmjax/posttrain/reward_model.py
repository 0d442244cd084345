"""A reward model: a scalar head on the decoder (`objective.name = 'reward_model'`).

The reward of a sequence is an affine function of the final (normed) hidden
state at its last token, r = h_last . w + b: the decoder is causal, so that
state is the only one that has seen the whole prompt and response.

Trained on preference pairs (the DPO batches of fmjax.data.task_batches: the
task preferences, or a JSONL of prompt/chosen/rejected) with the
Bradley-Terry loss -log sigmoid(r_chosen - r_rejected) (Ouyang et al. 2022).
The statistics are sums over pairs: loss, accuracy (r_chosen strictly above
r_rejected), margin (r_chosen - r_rejected) and the mean reward of each side;
evaluated on held-out pairs, they are the pairwise accuracy and margin.

The same `head` entry, declared here, is PPO's value head (fmjax.posttrain.rl),
read at every position instead of the last one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fmjax.nn import model
from fmjax.nn.params import Param, normal, zeros
from fmjax.nn.sharding import constrain


def head_decls(cfg) -> dict:
  """The head: a weight over d_model and a bias."""
  D = cfg.model.d_model
  return {"w": Param((D,), ("embed",), normal(D**-0.5)), "b": Param((), (), zeros)}


def hidden(params, tokens_BT, segment_ids_BT, positions_BT, spec):
  """Final normed hidden states (B, T, D) in float32."""
  x_BTD = model.embed(params, tokens_BT, spec)
  return model.decode(params, x_BTD, segment_ids_BT, positions_BT, spec).astype(jnp.float32)


def head(params, h_BTD):
  """The head applied at every position: (B, T)."""
  return jnp.einsum("btd,d->bt", h_BTD, params["head"]["w"]) + params["head"]["b"]


def rewards(params, tokens_BT, segment_ids_BT, positions_BT, spec):
  """The reward (B,) of one sequence per row (left-aligned), read at its last token."""
  h_BTD = hidden(params, tokens_BT, segment_ids_BT, positions_BT, spec)
  last_B = jnp.maximum(jnp.sum(segment_ids_BT != 0, axis=1).astype(jnp.int32) - 1, 0)
  h_BD = jnp.take_along_axis(h_BTD, last_B[:, None, None], axis=1)[:, 0]
  h_BD = constrain(h_BD, ("batch", None), spec.activations)
  return h_BD @ params["head"]["w"] + params["head"]["b"]


def reward_model(params, batch, spec, o):
  """Bradley-Terry loss summed over the batch's pairs, and its statistics (sums over pairs)."""
  del o
  B = batch["chosen_tokens"].shape[0]
  cat = {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)
         for k in ("tokens", "segment_ids", "positions")}
  r_2B = rewards(params, cat["tokens"], cat["segment_ids"], cat["positions"], spec)
  chosen_B, rejected_B = r_2B[:B], r_2B[B:]
  margin_B = chosen_B - rejected_B
  loss_B = -jax.nn.log_sigmoid(margin_B)
  stop = jax.lax.stop_gradient
  stats = {
      "pairs": jnp.asarray(B, jnp.float32),
      "loss": jnp.sum(loss_B),
      "accuracy": jnp.sum((margin_B > 0).astype(jnp.float32)),
      "margin": jnp.sum(stop(margin_B)),
      "rewards/chosen": jnp.sum(stop(chosen_B)),
      "rewards/rejected": jnp.sum(stop(rejected_B)),
  }
  return stats["loss"], stats

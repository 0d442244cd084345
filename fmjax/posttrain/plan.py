"""What a run's objective adds to the model: parameters, and which of them are trained.

- Parameters: the model's (fmjax.nn.model.param_decls), plus a contrastive
  `head` for objective 'contrastive', a scalar `head` for 'reward_model' and for
  PPO's value (objective 'grpo' with rl.advantage 'gae'), and LoRA adapters under `lora` when
  lora.rank > 0. All are declared as `Param`s, so they are created and
  sharded like the model's; a run that starts from another run's checkpoint
  (checkpoint.init_from) restores the model's and initialises these
  (fmjax.train.inputs).
- Trained: every parameter; with LoRA, only the added ones (adapters, head).
  The optimizer sees the trained subtree only, so frozen weights have neither
  gradients nor optimizer state.
- Frozen inputs: DPO's reference parameters (fmjax.train.inputs).
"""

from __future__ import annotations

from fmjax.nn import model
from fmjax.posttrain import contrastive, lora, reward_model

ADDED = ("head", "lora")  # top-level entries that post-training adds to the model's


def param_decls(cfg) -> dict:
  """Every parameter of the run: the model's and what the objective and LoRA add."""
  decls = model.param_decls(cfg.model)
  if cfg.objective.name == "contrastive":
    decls["head"] = contrastive.head_decls(cfg)
  if has_scalar_head(cfg):
    decls["head"] = reward_model.head_decls(cfg)
  if cfg.lora.rank:
    decls["lora"] = lora.decls(decls, cfg.lora)
  return decls


def has_scalar_head(cfg) -> bool:
  """A reward model's head, or PPO's value head."""
  o = cfg.objective
  return o.name == "reward_model" or (o.name == "grpo" and o.rl.advantage == "gae")


def is_trained(cfg, top_level_key: str) -> bool:
  return not cfg.lora.rank or top_level_key in ADDED


def split(tree, trained_keys) -> tuple[dict, dict]:
  """(trained, frozen) top-level entries of a parameter tree (or of anything shaped like one)."""
  trained = {k: v for k, v in tree.items() if k in trained_keys}
  return trained, {k: v for k, v in tree.items() if k not in trained}


def model_params(params, cfg):
  """What the model reads: the parameters with the LoRA adapters merged in."""
  return lora.merge(params, cfg.lora)


def model_shardings(param_shardings):
  """The model's entries of a parameter tree: without those post-training adds."""
  return {k: v for k, v in param_shardings.items() if k not in ADDED}


def reference_path(cfg) -> str:
  if cfg.objective.name == "grpo":
    return cfg.checkpoint.init_from
  return cfg.objective.dpo.reference or cfg.checkpoint.init_from


def needs_reference(cfg) -> bool:
  """Whether the train step takes a frozen reference's parameters as an input: DPO's
  (unless precomputed), or the KL reference of RL (unless its coefficient is 0)."""
  o = cfg.objective
  if o.name == "grpo":
    return o.rl.kl_beta > 0
  return o.name == "dpo" and not o.dpo.precompute_reference

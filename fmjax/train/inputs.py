"""What a run reads besides its own checkpoints: its objective's train data and held-out
batches, the parameters of checkpoint.init_from, DPO's frozen reference (or that
reference's log-probabilities, precomputed once), and RL's reference and reward model."""

from __future__ import annotations

import functools
import itertools
import json
import os

import jax

from fmjax.data import pipeline, task_batches
from fmjax.errors import ConfigError
from fmjax.hf import files as hf
from fmjax.nn import model, params as params_lib
from fmjax.posttrain import dpo, reward_model as rm, rl as rl_lib
from fmjax.posttrain import plan
from fmjax.posttrain.plan import ADDED, model_shardings, reference_path
from fmjax.runtime import distributed
from fmjax.train import checkpoint, state as state_lib


def datasets(cfg, tokenizer, *, batch_size: int, rows: tuple[int, int], shards: int,
             process_count: int = 1, batch_shards: int = 1):
  """(train dataset, held-out batches) of the objective: rows [start, stop) of each
  global batch of `batch_size` rows (`rows` and `shards` as in
  fmjax.data.pipeline.host_train_dataset).

  next_token reads data.mixture (fmjax.data.pipeline); sft, dpo, reward_model,
  grpo and contrastive read the task datasets (fmjax.data.task_batches) of
  objective.tasks (reward_model: or the JSONL objective.reward_model.data); grpo
  reads prompts only, objective.rl.max_new_tokens short of data.seq_len, and
  its held-out batches are the first objective.rl.eval_prompts validation prompts. Contrastive
  holds out one batch of every validation pair (cut to a multiple of
  `batch_shards`), so its held-out accuracy is recall@1 over all of them.
  """
  d, name = cfg.data, cfg.objective.name
  if name == "next_token":
    held_out = pipeline.eval_batches(d, tokenizer, batch_size=batch_size,
                                     num_batches=d.eval_batches)
    return (pipeline.host_train_dataset(d, tokenizer, batch_size=batch_size, rows=rows,
                                        shards=shards),
            [{k: v[rows[0]:rows[1]] for k, v in b.items()} for b in held_out])
  if process_count > 1:
    raise ConfigError(f"objective.name={name!r} reads task data on one host only so far; "
                      f"run it on one host, not {process_count}")
  size = d.task_size or None
  if name == "contrastive":
    data_dir = os.path.expanduser(d.data_dir)
    train = task_batches.contrastive_batches(tokenizer, data_dir, "train", seq_len=d.seq_len,
                                             batch_size=batch_size, seed=d.seed)
    pairs = len(task_batches.tasks.PassagePairs(data_dir, "validation", d.seed))
    whole = pairs - pairs % batch_shards
    held_out = list(task_batches.contrastive_batches(
        tokenizer, data_dir, "validation", seq_len=d.seq_len, batch_size=whole, seed=d.seed))
    return train, held_out
  names = task_batches.tasks.parse_tasks(cfg.objective.tasks)
  if name == "grpo":
    rl = cfg.objective.rl
    width, prompts = d.seq_len - rl.max_new_tokens, batch_size // rl.group_size
    train = task_batches.prompt_batches(tokenizer, "train", prompt_len=width, batch_size=prompts,
                                        seed=d.seed, size=size, task_names=names)
    n_eval = rl.eval_prompts - rl.eval_prompts % batch_shards
    held_out = task_batches.prompt_batches(tokenizer, "validation", prompt_len=width,
                                           batch_size=n_eval, seed=d.seed, task_names=names)
    return train, list(itertools.islice(held_out, 1))
  if name == "sft":
    make = functools.partial(task_batches.sft_batches, task_names=names)
  else:
    make = functools.partial(task_batches.dpo_batches, task_names=names,
                             jsonl=cfg.objective.reward_model.data if name == "reward_model"
                             else "")
  train = make(tokenizer, "train", seq_len=d.seq_len, batch_size=batch_size, seed=d.seed,
               size=size)
  held_out = make(tokenizer, "validation", seq_len=d.seq_len, batch_size=batch_size, seed=d.seed)
  return train, list(itertools.islice(held_out, d.eval_batches if d.eval_batches > 0 else None))


def restore_params(path: str, abstract_params, m=None):
  """The entries of `abstract_params` that the latest checkpoint under `path` holds,
  restored onto their shardings; entries post-training adds may be missing (they are
  initialised). Raises ConfigError if a model entry is missing, or if the checkpoint
  holds LoRA adapters that this run would drop."""
  if hf.is_hf_dir(path):  # a Hugging Face model holds the model's entries, never adapters
    return checkpoint.restore_params(path, model_shardings(abstract_params), m)
  saved = checkpoint.saved_param_keys(path)
  missing = [k for k in abstract_params if k not in saved and k not in ADDED]
  if missing:
    raise ConfigError(f"checkpoint {path} has no parameters {', '.join(missing)}: it was "
                      "trained with another model config")
  if "lora" in saved and "lora" not in abstract_params:
    raise ConfigError(f"checkpoint {path} holds LoRA adapters; merge them into its weights "
                      f"first: python -m fmjax.export --workdir={path} --out=DIR")
  return checkpoint.restore_params(
      path, {k: v for k, v in abstract_params.items() if k in saved}, m)


def load_reference(cfg, param_shardings):
  """The reference's model parameters from the latest checkpoint of its workdir (or from
  its Hugging Face directory), sharded like the policy's (`param_shardings`): no device
  ever holds all of them."""
  abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                          params_lib.abstract(model.param_decls(cfg.model)),
                          model_shardings(param_shardings))
  return restore_params(reference_path(cfg), abstract, cfg.model)


def frozen_inputs(s, tokenizer, train_ds, held_out: list):
  """(train dataset, held-out batches, frozen inputs of the step) of setup `s`'s objective.

  DPO loads its reference here. With objective.dpo.precompute_reference, the
  reference's log-probabilities of every train example (one pass over
  data.task_size examples) and held-out example are computed once, attached
  to their batches, and the reference is dropped.
  """
  cfg = s.cfg
  if cfg.objective.name != "dpo" and not s.frozen_shardings:
    return train_ds, held_out, {}
  reference = load_reference(cfg, s.state_shardings["params"])
  if cfg.objective.name != "dpo" or not cfg.objective.dpo.precompute_reference:
    return train_ds, held_out, {"reference": reference}
  logps = jax.jit(lambda p, b: dpo.pair_logps(p, b, s.spec),
                  in_shardings=(model_shardings(s.state_shardings["params"]), s.batch_sharding))
  batch_size, d = cfg.train.batch_size, cfg.data
  one_pass = task_batches.dpo_batches(tokenizer, "train", seq_len=d.seq_len,
                                      batch_size=batch_size, seed=d.seed,
                                      size=d.task_size or None, one_pass=True)
  with jax.set_mesh(s.mesh):
    table = dpo.precompute(
        lambda b: logps(reference, distributed.global_batch(b, s.batch_sharding)),
        itertools.chain(one_pass, held_out), batch_size)
  attach = dpo.AttachReference(table)
  return train_ds.map(attach), [attach.map(b) for b in held_out], {}


def load_reward_model(cfg, s):
  """rows -> rewards (B,) of the latest checkpoint of the reward_model run
  objective.rl.reward_model, its parameters sharded over `s`'s mesh by its own
  config and the policy's sharding rules. ConfigError if there is none."""
  path = cfg.objective.rl.reward_model
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise ConfigError(f"objective.rl.reward_model={path!r} holds no config.json: point it at "
                      "the workdir of a reward_model run")
  rm_cfg = cfg.copy_and_resolve_references()
  with open(config_path) as f:
    rm_cfg.update(json.load(f))
  if rm_cfg.objective.name != "reward_model":
    raise ConfigError(f"objective.rl.reward_model={path!r} is a {rm_cfg.objective.name!r} "
                      "run, not a reward_model one")
  if rm_cfg.model.vocab_size != cfg.model.vocab_size:
    raise ConfigError(f"objective.rl.reward_model={path!r} has vocab_size "
                      f"{rm_cfg.model.vocab_size}, the policy {cfg.model.vocab_size}: they "
                      "must share the tokenizer")
  rm_cfg.mesh.update(cfg.mesh)
  rm_cfg.sharding.update(cfg.sharding.to_dict())
  rm_s = state_lib.setup(rm_cfg, s.mesh)
  try:
    checkpoint.latest_checkpoint(checkpoint.run_directory(path, rm_cfg.checkpoint.root))
  except FileNotFoundError as e:
    raise ConfigError(f"objective.rl.reward_model={path!r}: {e}") from None
  params = restore_params(path, rm_s.abstract_state["params"], rm_cfg.model)
  params = plan.model_params(params, rm_cfg)
  score = jax.jit(lambda p, r: rm.rewards(p, r["tokens"], r["segment_ids"], r["positions"],
                                         rm_s.spec))
  return functools.partial(score, params)


def rollouts(s, tokenizer, frozen: dict):
  """The rollouts of an RL run (fmjax.posttrain.rl.Rollouts), or None for other objectives."""
  cfg = s.cfg
  if cfg.objective.name != "grpo":
    return None
  scorer = load_reward_model(cfg, s) if cfg.objective.rl.reward_model_weight else None
  return rl_lib.Rollouts(cfg, s, tokenizer, frozen, scorer)

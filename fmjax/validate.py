"""Checks a whole experiment config before anything is compiled or written.

`validate(cfg, n_devices)` raises `ConfigError` with a one-line message that
names the first bad field and the fix, and returns the resolved mesh shape.
Only the commands call it (through `fmjax.runtime.cli` and `fmjax.main`); the
checks of a part live here, beside the checks of every other part, so that the
schema (fmjax/config.py) imports nothing of what it describes.
"""

from __future__ import annotations

import difflib
import math
import os
import re

import jax
import ml_collections

from fmjax import config as config_lib
from fmjax.data import mixture, tasks
from fmjax.data.tokenizer import MIN_VOCAB_SIZE  # the tokenizer is trained at model.vocab_size
from fmjax.errors import ConfigError, UsageError
from fmjax.evaluation import suite
from fmjax.nn import attention, dispatch, model
from fmjax.nn.sharding import MESH_AXES, mesh_shape, parse_axes
from fmjax.nn.spec import head_dim
from fmjax.posttrain import lora
from fmjax.scaling import sizing
from fmjax.train.preemption import parse_duration
from fmjax.train.profiling import parse_steps


def resolve(cfg, n_devices: int):
  """`cfg` with its size dial and training horizon written out (fmjax/scaling/sizing.py),
  then checked by `validate`: what every command runs once, before it builds anything."""
  cfg = sizing.resolve(cfg)
  validate(cfg, n_devices)
  return cfg


def _unknown_fields(cfg, schema, prefix=""):
  for key in cfg.keys():
    path = f"{prefix}{key}"
    if key not in schema:
      close = difflib.get_close_matches(key, list(schema.keys()), n=1)
      hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
      yield f"unknown config field {path}{hint}"
    elif isinstance(schema[key], ml_collections.ConfigDict):
      if not isinstance(cfg[key], (ml_collections.ConfigDict, dict)):
        yield f"{path} must be a section with fields, got {cfg[key]!r}"
      else:
        yield from _unknown_fields(cfg[key], schema[key], path + ".")


def _wrong_types(cfg, schema, prefix=""):
  for key, default in schema.items():
    path = f"{prefix}{key}"
    if key not in cfg:
      yield f"missing config field {path}; start the experiment from fmjax.config.base()"
      continue
    value = cfg[key]
    if isinstance(default, ml_collections.ConfigDict):
      if isinstance(value, (ml_collections.ConfigDict, dict)):
        yield from _wrong_types(value, default, path + ".")
      continue
    ok = (isinstance(value, type(default)) and not
          (isinstance(value, bool) and not isinstance(default, bool)))
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
      ok = True
    if not ok:
      yield (f"{path}={value!r} has type {type(value).__name__}, "
             f"expected {type(default).__name__} like {default!r}")


def _get(cfg, path: str):
  for key in path.split("."):
    cfg = cfg[key]
  return cfg


def _positive(path, value, allow_zero=False):
  if value < 0 or (value == 0 and not allow_zero):
    raise ConfigError(f"{path}={value} must be {'>= 0' if allow_zero else '> 0'}")


def _check_constraints(cfg):
  """The schema's simple constraints (fmjax.config.CHOICES, POSITIVE, NON_NEGATIVE)."""
  for path, options in config_lib.CHOICES.items():
    if _get(cfg, path) not in options:
      raise ConfigError(f"{path}={_get(cfg, path)!r} is not one of {', '.join(options)}")
  for path in config_lib.POSITIVE:
    _positive(path, _get(cfg, path))
  for path in config_lib.NON_NEGATIVE:
    _positive(path, _get(cfg, path), allow_zero=True)


def validate(cfg: ml_collections.ConfigDict, n_devices: int) -> dict[str, int]:
  """Checks the whole config; returns the resolved mesh shape.

  Raises ConfigError on the first problem found.
  """
  schema = config_lib.base()
  for problem in _unknown_fields(cfg, schema):
    raise ConfigError(problem)
  for problem in _wrong_types(cfg, schema):
    raise ConfigError(problem)

  _check_constraints(cfg)

  m, d, o, t = cfg.model, cfg.data, cfg.optimizer, cfg.train
  if m.attention == "gqa":
    _check_gqa(m)
  elif m.attention_bias or m.qk_norm:
    raise ConfigError(f"model.{'attention_bias' if m.attention_bias else 'qk_norm'}=True is "
                      "for model.attention='gqa'; MLA's projections have no such option")
  elif m.qk_rope_head_dim % 2:
    raise ConfigError(f"model.qk_rope_head_dim={m.qk_rope_head_dim} must be even for "
                      "rotary embeddings")
  _check_rope_scaling(m.rope_scaling)
  _check_local_layers(m)
  _check_moe(m)
  _check_kernels(m, jax.default_backend())

  if m.vocab_size < MIN_VOCAB_SIZE:
    raise ConfigError(f"model.vocab_size={m.vocab_size} is below {MIN_VOCAB_SIZE}, the smallest "
                      "tokenizer with byte fallback; raise it")
  try:
    mixture.from_config(d)
  except ValueError as e:
    field = "data.curriculum" if str(e).startswith("curriculum") else "data.mixture"
    raise ConfigError(f"{field}={d[field.split('.')[1]]!r}: {e}") from None
  if not 0 <= d.max_skip_fraction <= 1:
    raise ConfigError(f"data.max_skip_fraction={d.max_skip_fraction} must be in [0, 1]")
  if d.seq_len < 2:
    raise ConfigError(f"data.seq_len={d.seq_len} must be >= 2")
  if d.shards and t.batch_size % d.shards:
    raise ConfigError(f"data.shards={d.shards} must divide train.batch_size={t.batch_size}")

  if cfg.objective.ce_chunk and d.seq_len % cfg.objective.ce_chunk:
    raise ConfigError(f"objective.ce_chunk={cfg.objective.ce_chunk} must divide "
                      f"data.seq_len={d.seq_len}; pick a divisor, or 0 for no chunking")

  _check_posttraining(cfg)

  if not 0 <= o.min_lr_ratio <= 1:
    raise ConfigError(f"optimizer.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
  if not 0 < o.wsd_decay_fraction <= 1:
    raise ConfigError(f"optimizer.wsd_decay_fraction={o.wsd_decay_fraction} must be in (0, 1]")

  if not 0 < t.spike_decay < 1:
    raise ConfigError(f"train.spike_decay={t.spike_decay} must be in (0, 1), e.g. 0.98")
  try:
    parse_duration(t.max_runtime)
  except ValueError as e:
    raise ConfigError(f"train.max_runtime: {e}") from None
  _check_profile_steps(t)
  _check_eval_suite(t)

  shape = mesh_shape(cfg.mesh, n_devices)
  _check_rules(cfg.sharding, shape)
  if m.moe.n_routed_experts:
    batch_axes = parse_axes(cfg.sharding.activations.batch)
    for a in parse_axes(cfg.sharding.params.expert):
      if shape[a] > 1 and a not in batch_axes:
        raise ConfigError(
            f"sharding.activations.batch={cfg.sharding.activations.batch!r} must include "
            f"{a!r}: experts are sharded over it, so tokens must be too (e.g. 'data,fsdp,{a}')")
  batch_shards = math.prod(shape[a] for a in parse_axes(cfg.sharding.activations.batch))
  if t.batch_size % t.microbatches:
    raise ConfigError(f"train.microbatches={t.microbatches} must divide "
                      f"train.batch_size={t.batch_size}")
  micro = t.batch_size // t.microbatches
  if micro % batch_shards:
    raise ConfigError(
        f"microbatch size {micro} (train.batch_size/train.microbatches) is not "
        f"divisible by the {batch_shards} batch shards of the mesh; "
        f"make it a multiple of {batch_shards}")
  return shape


def _check_posttraining(cfg):
  o, dp, c, lo = cfg.objective, cfg.objective.dpo, cfg.objective.contrastive, cfg.lora
  if not 0 <= dp.label_smoothing < 0.5:
    raise ConfigError(f"objective.dpo.label_smoothing={dp.label_smoothing} must be in [0, 0.5)")
  if o.name == "dpo" and not (dp.reference or cfg.checkpoint.init_from):
    raise ConfigError("objective.name='dpo' needs a reference model: set "
                      "objective.dpo.reference or checkpoint.init_from to a workdir")
  if c.max_logit_scale < 1:
    raise ConfigError(f"objective.contrastive.max_logit_scale={c.max_logit_scale} must be "
                      ">= 1 (CLIP's is 100)")
  if o.name == "contrastive" and cfg.train.microbatches != 1:
    raise ConfigError(f"train.microbatches={cfg.train.microbatches} must be 1 for "
                      "objective.name='contrastive': its negatives are the whole batch")
  _check_rl(cfg)
  if lo.rank:
    pats = lora.patterns(lo.targets)
    if not pats:
      raise ConfigError(f"lora.rank={lo.rank} needs lora.targets, e.g. 'layers.w[qkvo]$'")
    for p in pats:
      try:
        re.compile(p)
      except re.error as e:
        raise ConfigError(f"lora.targets: {p!r} is not a regular expression ({e})") from None
    if not lora.targets(model.param_decls(cfg.model), lo):
      raise ConfigError(f"lora.targets={lo.targets!r} matches no weight matrix; names look "
                        "like layers.wq, layers.w_down, unembed")


def _check_rl(cfg):
  """objective.tasks, objective.reward_model and objective.rl (fmjax/posttrain/rl.py)."""
  o, rl = cfg.objective, cfg.objective.rl
  try:
    tasks.parse_tasks(o.tasks)
  except ValueError as e:
    raise ConfigError(f"objective.tasks={o.tasks!r}: {e}") from None
  if o.name == "reward_model" and o.reward_model.data and not os.path.isfile(
      os.path.expanduser(o.reward_model.data)):
    raise ConfigError(f"objective.reward_model.data={o.reward_model.data!r} is not a file; "
                      "give a JSONL of prompt/chosen/rejected records, or '' for the tasks'")
  if o.name != "grpo":
    return
  if rl.group_size < 2:
    raise ConfigError(f"objective.rl.group_size={rl.group_size} must be >= 2: advantages are "
                      "relative to the other samples of the same prompt")
  if cfg.train.batch_size % rl.group_size:
    raise ConfigError(f"objective.rl.group_size={rl.group_size} must divide train.batch_size="
                      f"{cfg.train.batch_size} (sequences a step: prompts x group_size)")
  if rl.max_new_tokens >= cfg.data.seq_len:
    raise ConfigError(f"objective.rl.max_new_tokens={rl.max_new_tokens} must be below "
                      f"data.seq_len={cfg.data.seq_len}, the cache holds prompt and response")
  if not 0 < rl.top_p <= 1:
    raise ConfigError(f"objective.rl.top_p={rl.top_p} must be in (0, 1]")
  if rl.temperature <= 0:
    raise ConfigError(f"objective.rl.temperature={rl.temperature} must be > 0: the policy "
                      "is softmax(logits / temperature)")
  if rl.clip_low >= 1:
    raise ConfigError(f"objective.rl.clip_low={rl.clip_low} must be below 1")
  if not (0 <= rl.lam <= 1 and 0 < rl.gamma <= 1):
    raise ConfigError(f"objective.rl.gamma={rl.gamma} must be in (0, 1] and "
                      f"objective.rl.lam={rl.lam} in [0, 1]")
  if rl.kl_beta > 0 and not cfg.checkpoint.init_from:
    raise ConfigError(f"objective.rl.kl_beta={rl.kl_beta} needs a reference model: set "
                      "checkpoint.init_from (or kl_beta=0)")
  if not (rl.verifier_weight or rl.reward_model_weight):
    raise ConfigError("objective.rl.verifier_weight and reward_model_weight are both 0: "
                      "nothing gives a reward")
  if rl.reward_model_weight and not rl.reward_model:
    raise ConfigError(f"objective.rl.reward_model_weight={rl.reward_model_weight} needs "
                      "objective.rl.reward_model: the workdir of a reward_model run")
  if (rl.verifier_weight or rl.verifier) and not re.fullmatch(r"[\w.]+:\w+", rl.verifier):
    raise ConfigError(f"objective.rl.verifier={rl.verifier!r} must name a function as "
                      "module:function, e.g. fmjax.data.tasks:reward")
  if rl.eval_prompts < 1:
    raise ConfigError(f"objective.rl.eval_prompts={rl.eval_prompts} must be >= 1")


def _check_profile_steps(t):
  try:
    parse_steps(t.profile_steps)
  except ValueError as e:
    raise ConfigError(f"train.profile_steps={t.profile_steps!r}: {e}") from None


def _check_eval_suite(t):
  """A suite that cannot be parsed (unknown kind or setting, k > n, no such file) stops the
  run before anything is compiled; its data is read when the run starts."""
  if t.eval_suite_every and not t.eval_suite:
    raise ConfigError(f"train.eval_suite_every={t.eval_suite_every} needs train.eval_suite: "
                      "a shipped suite (quick, default) or a .yaml/.py suite file")
  if t.eval_suite:
    try:
      suite.parse_suite(t.eval_suite)
    except UsageError as e:
      raise ConfigError(f"train.eval_suite={t.eval_suite!r}: {e}") from None


def _check_gqa(m):
  if not m.head_dim and m.d_model % m.n_heads:
    raise ConfigError(
        f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}; "
        "change one, or set model.head_dim explicitly")
  if m.n_heads % m.n_kv_heads:
    raise ConfigError(
        f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads} "
        "(grouped-query attention shares each KV head among n_heads/n_kv_heads queries)")
  if head_dim(m) % 2:
    raise ConfigError(f"head dim {head_dim(m)} must be even for rotary embeddings; "
                      "change model.head_dim or model.d_model/model.n_heads")


def _check_local_layers(m):
  """Settings of the windowed layers need a window."""
  for field in ("full_attention_every", "local_rope_theta"):
    if m[field] and not m.sliding_window:
      raise ConfigError(f"model.{field}={m[field]} sets the layers with a sliding window apart, "
                        "but model.sliding_window=0; set a window or leave it at 0")


def _check_kernels(m, backend: str):
  """The kernels the model names must exist on this backend (`auto` always does)."""
  qk_dim = m.qk_nope_head_dim + m.qk_rope_head_dim if m.attention == "mla" else head_dim(m)
  why = attention.unavailable(m.attention_impl, backend, m.dtype, qk_dim, m.sliding_window,
                              m.attn_softcap)
  if why:
    raise ConfigError(f"model.attention_impl={m.attention_impl!r} {why}")
  how = m.moe.grouped_matmul
  if how != "auto" and backend not in dispatch.GROUPED_MATMUL_BACKENDS[how]:
    have = ", ".join(dispatch.GROUPED_MATMUL_BACKENDS[how])
    raise ConfigError(f"model.moe.grouped_matmul={how!r} is not available on the {backend} "
                      f"backend (it runs on: {have}); use auto, blocked or ragged_dot")


def _check_moe(m):
  e = m.moe
  if not e.n_routed_experts:
    return
  E = e.n_routed_experts
  if m.mlp_activation != "silu":
    raise ConfigError(f"model.mlp_activation={m.mlp_activation!r} with experts: the grouped "
                      "expert matmuls (fmjax/nn/dispatch.py) are SwiGLU only; use 'silu'")
  if not 1 <= e.experts_per_token <= E:
    raise ConfigError(f"model.moe.experts_per_token={e.experts_per_token} must be in "
                      f"[1, n_routed_experts={E}]")
  if not 0 <= e.first_k_dense < m.n_layers:
    raise ConfigError(f"model.moe.first_k_dense={e.first_k_dense} must be in [0, "
                      f"n_layers={m.n_layers}): at least one layer must be MoE")
  if E % e.n_group:
    raise ConfigError(f"model.moe.n_group={e.n_group} must divide n_routed_experts={E}")
  if not 1 <= e.topk_group <= e.n_group:
    raise ConfigError(f"model.moe.topk_group={e.topk_group} must be in [1, n_group={e.n_group}]")
  if e.experts_per_token > e.topk_group * (E // e.n_group):
    raise ConfigError(f"model.moe.experts_per_token={e.experts_per_token} exceeds the "
                      f"{e.topk_group * (E // e.n_group)} experts of topk_group groups; "
                      "raise model.moe.topk_group")
  if e.balance == "aux" and not e.aux_loss_coef:
    raise ConfigError("model.moe.aux_loss_coef=0 with balance='aux': set a coefficient "
                      "(e.g. 0.01) or balance='none'")
  _positive("model.moe.bias_update_rate", e.bias_update_rate, allow_zero=e.balance != "aux_free")


def _check_rope_scaling(r):
  if r.factor < 1:
    raise ConfigError(f"model.rope_scaling.factor={r.factor} must be >= 1 (the context "
                      "is extended by this factor)")
  if r.kind in ("yarn", "llama3") and r.original_seq_len <= 0:
    raise ConfigError(f"model.rope_scaling.original_seq_len={r.original_seq_len} must be "
                      f"> 0 for {r.kind}: set it to the sequence length the model was trained at")
  if r.kind == "yarn" and not r.beta_fast > r.beta_slow > 0:
    raise ConfigError(f"model.rope_scaling.beta_fast={r.beta_fast} must exceed "
                      f"beta_slow={r.beta_slow} > 0 (rotations per original context)")
  if r.kind == "llama3" and not r.high_freq_factor > r.low_freq_factor > 0:
    raise ConfigError(f"model.rope_scaling.high_freq_factor={r.high_freq_factor} must exceed "
                      f"low_freq_factor={r.low_freq_factor} > 0 (Llama 3.1's are 4 and 1)")


def _check_rules(sharding, shape):
  for kind in ("params", "activations"):
    for logical, value in sharding[kind].items():
      axes = parse_axes(value)
      for a in axes:
        if a not in MESH_AXES:
          raise ConfigError(
              f"sharding.{kind}.{logical}={value!r} names mesh axis {a!r}; "
              f"mesh axes are {', '.join(MESH_AXES)}")
      if len(set(axes)) != len(axes):
        raise ConfigError(f"sharding.{kind}.{logical}={value!r} repeats a mesh axis")

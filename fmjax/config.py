"""The experiment schema: every field fmjax reads, its default, and its checks.

An experiment file starts from `base()` and overrides what it needs. `validate`
then checks the whole config before anything is compiled or written, and raises
`ConfigError` with a one-line message that names the field and the fix.
"""

from __future__ import annotations

import difflib
import json
import math

import ml_collections

MESH_AXES = ("data", "fsdp", "expert", "tensor")
SCHEDULES = ("cosine", "wsd", "constant")
OPTIMIZERS = ("adamw", "lion")
REMAT = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16")
OBJECTIVES = ("next_token", "sft", "dpo", "contrastive")
DPO_LOSSES = ("sigmoid", "ipo", "hinge")
POOLING = ("mean", "last")
ATTENTION = ("gqa", "mla")
ROPE_SCALING = ("none", "linear", "ntk", "yarn")
ROUTER_SCORES = ("softmax", "sigmoid")
BALANCE = ("aux", "aux_free", "none")
AUX_LOSS_SCOPES = ("batch", "sequence")
DISPATCH = ("capacity", "dropless")
GROUPED_MATMUL = ("auto", "ragged_dot", "blocked")
BAD_UTF8 = ("error", "skip")
NONFINITE = ("skip", "restore", "halt")


class ConfigError(ValueError):
  """A bad experiment config. The message is one line: the field, then the fix."""


def base() -> ml_collections.ConfigDict:
  """Every field, with its default. Experiment files override these."""
  c = ml_collections.ConfigDict()

  c.model = dict(
      vocab_size=2048,
      depth=0,  # size dial: > 0 sets n_layers, d_model, heads and d_ff (fmjax/scaling/sizing.py)
      aspect_ratio=64,  # d_model per layer under the size dial
      d_model=256,
      n_layers=4,
      n_heads=4,
      d_ff=768,
      tie_embeddings=False,
      attention="gqa",  # gqa | mla
      # gqa: grouped-query attention
      n_kv_heads=4,
      head_dim=0,  # 0: d_model // n_heads
      # mla: DeepSeek-V3 multi-head latent attention
      q_lora_rank=0,  # 0: a plain query projection
      kv_lora_rank=64,  # the cached latent
      qk_nope_head_dim=32,
      qk_rope_head_dim=16,  # one rotary key, shared by all heads
      v_head_dim=32,
      rope_theta=10000.0,
      # Context extension: 'linear' divides positions by factor, 'ntk' raises
      # theta, 'yarn' interpolates low frequencies only and sharpens the
      # softmax by (0.1 * mscale * ln(factor) + 1)^2.
      rope_scaling=dict(kind="none", factor=1.0, original_seq_len=0, beta_fast=32.0,
                        beta_slow=1.0, mscale=1.0),
      norm_eps=1e-5,
      init_std=0.02,
      dtype="float32",  # compute dtype; parameters are always float32
      remat="none",  # none | full | dots
      scan_layers=True,
      # Mixture of experts (fmjax/nn/moe.py); n_routed_experts=0 keeps every MLP dense.
      moe=dict(
          n_routed_experts=0,
          n_shared_experts=0,  # experts every token goes through
          experts_per_token=2,  # top-k
          moe_intermediate_size=256,  # width of one expert (and of one shared expert)
          first_k_dense=0,  # the first k layers keep the dense MLP (model.d_ff)
          moe_layer_freq=1,  # after those, layer i is MoE when i % moe_layer_freq == 0
          score="softmax",  # router scores: softmax | sigmoid
          n_group=1,  # group-limited routing: experts in n_group groups, tokens
          topk_group=1,  # pick experts only from their topk_group best groups
          norm_topk_prob=True,  # the top-k weights sum to 1
          routed_scaling_factor=1.0,  # multiplies the routed experts' output
          # aux: the f.P loss; aux_free: DeepSeek-V3's per-expert selection bias,
          # moved by bias_update_rate after each step (plus the f.P loss if
          # aux_loss_coef > 0, V3's complementary loss); none: neither.
          balance="aux",
          aux_loss_coef=0.01,
          aux_loss_scope="batch",  # batch | sequence (f and P per sequence, averaged)
          router_z_loss_coef=0.0,
          bias_update_rate=1e-3,  # gamma
          dispatch="capacity",  # capacity (drops over capacity) | dropless
          capacity_factor=1.25,  # slots per expert = factor x assignments / experts
          grouped_matmul="auto",  # dropless: ragged_dot | blocked; auto: blocked on CPU
      ),
      mtp_depth=0,  # DeepSeek-V3 multi-token prediction: extra tokens predicted (fmjax/nn/mtp.py)
      mtp_weight=0.3,  # lambda: the MTP loss weight
  )
  c.data = dict(
      # Sources and weights, e.g. "kjv:0.7, synthetic:0.3" (see fmjax/data/mixture.py).
      mixture="kjv",
      curriculum="",  # weights from given steps on, e.g. "500: kjv:0.5, synthetic:0.5"
      data_dir="~/.cache/fmjax",  # where the built corpus and tokenizer live
      tokenizer="bpe",  # model type of the tokenizer trained on kjv: bpe | unigram
      tokenizer_path="",  # a sentencepiece model to use instead (tools/train_tokenizer.py)
      seq_len=256,
      seed=0,
      num_workers=0,  # grain worker processes; 0 reads in the main process
      eval_batches=8,
      max_doc_bytes=1 << 20,  # longer documents are skipped, counted and logged
      bad_utf8="error",  # text that is not UTF-8: error (naming file and record) | skip
      max_skip_fraction=0.01,  # more skipped documents than this stops the run
      # The train stream is read as this many shards (shard i: documents i, i+n, ...),
      # each packed on its own and giving batch_size/shards rows of every batch; a
      # process reads the shards of its rows. 0: one per process. Fixed, the batches
      # are the same on any number of processes.
      shards=0,
      # Train examples of the task datasets the sft and dpo objectives read
      # (fmjax/data/tasks.py); 0: the dataset's default (100k).
      task_size=0,
  )
  c.objective = dict(
      name="next_token",
      z_loss=0.0,
      ce_chunk=0,  # >0: cross-entropy over sequence chunks of this many positions
      # next_token: the data.mixture; sft, dpo, contrastive: the task data
      # (fmjax/data/task_batches.py). See fmjax/train/objectives.py.
      dpo=dict(
          loss="sigmoid",  # sigmoid | ipo | hinge
          beta=0.1,
          label_smoothing=0.0,  # sigmoid only: the chance a preference label is flipped
          reference="",  # workdir of the frozen reference; "" means checkpoint.init_from
          precompute_reference=False,  # its log-probs once per dataset, then free it
      ),
      contrastive=dict(
          pooling="mean",  # mean | last (token)
          projection_dim=0,  # > 0: a linear projection head to this many dims
          symmetric=True,  # CLIP's two directions; False: anchor -> positive only
          temperature=0.07,  # initial; learned, as logit_scale = ln(1/temperature)
          max_logit_scale=100.0,  # the clamp on 1/temperature (CLIP's)
      ),
  )
  c.optimizer = dict(
      name="adamw",
      lr=3e-3,
      schedule="cosine",
      warmup_steps=100,
      decay_steps=0,  # length of the schedule; 0 means train.steps
      wsd_decay_fraction=0.2,
      min_lr_ratio=0.1,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      clip_norm=1.0,
  )
  # Mesh axis sizes; -1 takes the devices that are left.
  c.mesh = dict(data=-1, fsdp=1, expert=1, tensor=1, cpu_devices=0)
  # Logical axis -> mesh axes ("" replicated, "data,fsdp" for several).
  # Parameters and activations have separate rules: FSDP is a change to the
  # first only.
  c.sharding = dict(
      params=dict(
          vocab="tensor", embed="fsdp", heads="tensor", kv_heads="tensor",
          head_dim="", mlp="tensor", layers="", q_lora="", kv_lora="", expert="expert"),
      activations=dict(
          batch="data,fsdp", seq="", embed="", heads="tensor",
          kv_heads="tensor", head_dim="", mlp="tensor", vocab="tensor",
          q_lora="", kv_lora="", layers="", expert="expert"),
  )
  c.train = dict(
      steps=1000,
      # Or give the horizon as one of these (fmjax/scaling/sizing.py turns it into steps):
      tokens=0,
      tokens_per_param=0.0,
      flops=0.0,  # a training-FLOP budget
      batch_size=32,  # global, in sequences
      microbatches=1,
      seed=0,
      log_every=10,
      eval_every=200,
      progress=True,
      sample_prompt="And God said",
      sample_tokens=80,
      sample_temperature=0.7,
      # A step whose loss or gradients are NaN/Inf never updates the parameters.
      # skip: count it and go on; halt after nonfinite_max_consecutive in a row.
      # restore: after nonfinite_max_consecutive in a row, go back to the last
      #   checkpoint and skip every batch drawn since it.
      # halt: stop at the first one.
      nonfinite="skip",
      nonfinite_max_consecutive=5,
      # A loss more than spike_zscore running standard deviations above its running
      # mean (exponential moving averages with decay spike_decay) is logged as a
      # spike; 0 turns detection off.
      spike_zscore=6.0,
      spike_decay=0.98,
      # Wall-clock budget ("90m", "2h", "1h30m", "3600"; "" none): when it runs out,
      # the run saves a checkpoint and exits 0, as on SIGTERM (fmjax/train/preemption.py).
      max_runtime="",
  )
  # init_from: a workdir (or its checkpoints/ directory) whose latest parameters
  # start this run when its own workdir has no checkpoint: parameters only, with a
  # fresh optimizer at step 0 (continued pretraining, fine-tuning).
  # root: "" keeps checkpoints in <workdir>/checkpoints; else they go to
  # <root>/<workdir>/checkpoints, e.g. gs://bucket/fmjax/runs/x/checkpoints for
  # --workdir=runs/x: storage every host of a pod can reach (fmjax.train.checkpoint).
  c.checkpoint = dict(every=200, keep=3, async_save=True, init_from="", root="")
  # Low-rank adapters (fmjax/posttrain/lora.py): rank > 0 adds them to the weights whose
  # dotted names match one of the comma-separated regexes in targets (e.g.
  # "layers.w[qkvo]$, layers.w_down") and trains only them (and any head).
  c.lora = dict(rank=0, alpha=16.0, targets="")
  return ml_collections.ConfigDict(c)


def to_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads(text))


def head_dim(m) -> int:
  return m.head_dim or m.d_model // m.n_heads


def parse_axes(value: str) -> tuple[str, ...]:
  """'data,fsdp' -> ('data', 'fsdp'); '' -> ()."""
  return tuple(a.strip() for a in value.split(",") if a.strip())


def mesh_shape(mesh_cfg, n_devices: int) -> dict[str, int]:
  """Resolves the -1 entry of the mesh config against the device count."""
  sizes = {a: int(mesh_cfg[a]) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if bad:
    raise ConfigError(f"mesh.{bad[0]}={sizes[bad[0]]}: axis sizes must be >= 1, "
                      "or -1 for 'the rest of the devices'")
  if len(free) > 1:
    raise ConfigError(f"mesh: only one axis may be -1, got {', '.join(free)}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if n_devices % fixed:
      raise ConfigError(
          f"mesh: fixed axes multiply to {fixed}, which does not divide the "
          f"{n_devices} devices; change mesh.* so their product divides {n_devices}")
    sizes[free[0]] = n_devices // fixed
  elif fixed != n_devices:
    shape = " x ".join(f"{a}={s}" for a, s in sizes.items())
    raise ConfigError(
        f"mesh {shape} needs {fixed} devices but {n_devices} are present; "
        "set one axis to -1 or make the product equal the device count")
  return sizes


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


def _choice(path, value, options):
  if value not in options:
    raise ConfigError(f"{path}={value!r} is not one of {', '.join(options)}")


def _positive(path, value, allow_zero=False):
  if value < 0 or (value == 0 and not allow_zero):
    raise ConfigError(f"{path}={value} must be {'>= 0' if allow_zero else '> 0'}")


def validate(cfg: ml_collections.ConfigDict, n_devices: int) -> dict[str, int]:
  """Checks the whole config; returns the resolved mesh shape.

  Raises ConfigError on the first problem found.
  """
  schema = base()
  for problem in _unknown_fields(cfg, schema):
    raise ConfigError(problem)
  for problem in _wrong_types(cfg, schema):
    raise ConfigError(problem)

  m, d, o, t = cfg.model, cfg.data, cfg.optimizer, cfg.train
  for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff"):
    _positive(f"model.{name}", m[name])
  _choice("model.attention", m.attention, ATTENTION)
  if m.attention == "gqa":
    _check_gqa(m)
  else:
    _check_mla(m)
  _choice("model.dtype", m.dtype, DTYPES)
  _choice("model.remat", m.remat, REMAT)
  _positive("model.rope_theta", m.rope_theta)
  _check_rope_scaling(m.rope_scaling)
  _check_moe(m)

  from fmjax.data.tokenizer import MIN_VOCAB_SIZE  # the tokenizer is trained at model.vocab_size
  if m.vocab_size < MIN_VOCAB_SIZE:
    raise ConfigError(f"model.vocab_size={m.vocab_size} is below {MIN_VOCAB_SIZE}, the smallest "
                      "tokenizer with byte fallback; raise it")
  from fmjax.data import mixture  # imported here, not when the schema is imported
  try:
    mixture.from_config(d)
  except ValueError as e:
    field = "data.curriculum" if str(e).startswith("curriculum") else "data.mixture"
    raise ConfigError(f"{field}={d[field.split('.')[1]]!r}: {e}") from None
  _choice("data.bad_utf8", d.bad_utf8, BAD_UTF8)
  _positive("data.max_doc_bytes", d.max_doc_bytes)
  if not 0 <= d.max_skip_fraction <= 1:
    raise ConfigError(f"data.max_skip_fraction={d.max_skip_fraction} must be in [0, 1]")
  _choice("data.tokenizer", d.tokenizer, ("bpe", "unigram"))
  if d.seq_len < 2:
    raise ConfigError(f"data.seq_len={d.seq_len} must be >= 2")
  _positive("data.num_workers", d.num_workers, allow_zero=True)
  _positive("data.shards", d.shards, allow_zero=True)
  if d.shards and t.batch_size % d.shards:
    raise ConfigError(f"data.shards={d.shards} must divide train.batch_size={t.batch_size}")

  _choice("objective.name", cfg.objective.name, OBJECTIVES)
  _positive("objective.z_loss", cfg.objective.z_loss, allow_zero=True)
  _positive("objective.ce_chunk", cfg.objective.ce_chunk, allow_zero=True)
  if cfg.objective.ce_chunk and d.seq_len % cfg.objective.ce_chunk:
    raise ConfigError(f"objective.ce_chunk={cfg.objective.ce_chunk} must divide "
                      f"data.seq_len={d.seq_len}; pick a divisor, or 0 for no chunking")

  _check_posttraining(cfg)

  _choice("optimizer.name", o.name, OPTIMIZERS)
  _choice("optimizer.schedule", o.schedule, SCHEDULES)
  _positive("optimizer.lr", o.lr)
  _positive("optimizer.warmup_steps", o.warmup_steps, allow_zero=True)
  _positive("optimizer.decay_steps", o.decay_steps, allow_zero=True)
  _positive("optimizer.clip_norm", o.clip_norm, allow_zero=True)
  if not 0 <= o.min_lr_ratio <= 1:
    raise ConfigError(f"optimizer.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
  if not 0 < o.wsd_decay_fraction <= 1:
    raise ConfigError(f"optimizer.wsd_decay_fraction={o.wsd_decay_fraction} must be in (0, 1]")

  for name in ("steps", "batch_size", "microbatches", "log_every"):
    _positive(f"train.{name}", t[name])
  _positive("train.eval_every", t.eval_every, allow_zero=True)
  _choice("train.nonfinite", t.nonfinite, NONFINITE)
  _positive("train.nonfinite_max_consecutive", t.nonfinite_max_consecutive)
  _positive("train.spike_zscore", t.spike_zscore, allow_zero=True)
  if not 0 < t.spike_decay < 1:
    raise ConfigError(f"train.spike_decay={t.spike_decay} must be in (0, 1), e.g. 0.98")
  from fmjax.train.preemption import parse_duration
  try:
    parse_duration(t.max_runtime)
  except ValueError as e:
    raise ConfigError(f"train.max_runtime: {e}") from None
  _positive("checkpoint.every", cfg.checkpoint.every, allow_zero=True)
  _positive("checkpoint.keep", cfg.checkpoint.keep)

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
  _positive("data.task_size", cfg.data.task_size, allow_zero=True)
  _choice("objective.dpo.loss", dp.loss, DPO_LOSSES)
  _positive("objective.dpo.beta", dp.beta)
  if not 0 <= dp.label_smoothing < 0.5:
    raise ConfigError(f"objective.dpo.label_smoothing={dp.label_smoothing} must be in [0, 0.5)")
  if o.name == "dpo" and not (dp.reference or cfg.checkpoint.init_from):
    raise ConfigError("objective.name='dpo' needs a reference model: set "
                      "objective.dpo.reference or checkpoint.init_from to a workdir")
  _choice("objective.contrastive.pooling", c.pooling, POOLING)
  _positive("objective.contrastive.projection_dim", c.projection_dim, allow_zero=True)
  _positive("objective.contrastive.temperature", c.temperature)
  if c.max_logit_scale < 1:
    raise ConfigError(f"objective.contrastive.max_logit_scale={c.max_logit_scale} must be "
                      ">= 1 (CLIP's is 100)")
  if o.name == "contrastive" and cfg.train.microbatches != 1:
    raise ConfigError(f"train.microbatches={cfg.train.microbatches} must be 1 for "
                      "objective.name='contrastive': its negatives are the whole batch")
  _positive("lora.rank", lo.rank, allow_zero=True)
  _positive("lora.alpha", lo.alpha)
  if lo.rank:
    import re
    from fmjax.posttrain import lora
    from fmjax.nn import model
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


def _check_gqa(m):
  _positive("model.n_kv_heads", m.n_kv_heads)
  _positive("model.head_dim", m.head_dim, allow_zero=True)
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


def _check_mla(m):
  _positive("model.q_lora_rank", m.q_lora_rank, allow_zero=True)
  for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
    _positive(f"model.{name}", m[name])
  _positive("model.qk_nope_head_dim", m.qk_nope_head_dim, allow_zero=True)
  if m.qk_rope_head_dim % 2:
    raise ConfigError(f"model.qk_rope_head_dim={m.qk_rope_head_dim} must be even for "
                      "rotary embeddings")


def _check_moe(m):
  e = m.moe
  _positive("model.mtp_depth", m.mtp_depth, allow_zero=True)
  _positive("model.mtp_weight", m.mtp_weight, allow_zero=True)
  _positive("model.moe.n_routed_experts", e.n_routed_experts, allow_zero=True)
  if not e.n_routed_experts:
    return
  E = e.n_routed_experts
  if not 1 <= e.experts_per_token <= E:
    raise ConfigError(f"model.moe.experts_per_token={e.experts_per_token} must be in "
                      f"[1, n_routed_experts={E}]")
  _positive("model.moe.n_shared_experts", e.n_shared_experts, allow_zero=True)
  _positive("model.moe.moe_intermediate_size", e.moe_intermediate_size)
  _positive("model.moe.moe_layer_freq", e.moe_layer_freq)
  if not 0 <= e.first_k_dense < m.n_layers:
    raise ConfigError(f"model.moe.first_k_dense={e.first_k_dense} must be in [0, "
                      f"n_layers={m.n_layers}): at least one layer must be MoE")
  _choice("model.moe.score", e.score, ROUTER_SCORES)
  _positive("model.moe.n_group", e.n_group)
  if E % e.n_group:
    raise ConfigError(f"model.moe.n_group={e.n_group} must divide n_routed_experts={E}")
  if not 1 <= e.topk_group <= e.n_group:
    raise ConfigError(f"model.moe.topk_group={e.topk_group} must be in [1, n_group={e.n_group}]")
  if e.experts_per_token > e.topk_group * (E // e.n_group):
    raise ConfigError(f"model.moe.experts_per_token={e.experts_per_token} exceeds the "
                      f"{e.topk_group * (E // e.n_group)} experts of topk_group groups; "
                      "raise model.moe.topk_group")
  _positive("model.moe.routed_scaling_factor", e.routed_scaling_factor)
  _choice("model.moe.balance", e.balance, BALANCE)
  _positive("model.moe.aux_loss_coef", e.aux_loss_coef, allow_zero=True)
  if e.balance == "aux" and not e.aux_loss_coef:
    raise ConfigError("model.moe.aux_loss_coef=0 with balance='aux': set a coefficient "
                      "(e.g. 0.01) or balance='none'")
  _choice("model.moe.aux_loss_scope", e.aux_loss_scope, AUX_LOSS_SCOPES)
  _positive("model.moe.router_z_loss_coef", e.router_z_loss_coef, allow_zero=True)
  _positive("model.moe.bias_update_rate", e.bias_update_rate, allow_zero=e.balance != "aux_free")
  _choice("model.moe.dispatch", e.dispatch, DISPATCH)
  _positive("model.moe.capacity_factor", e.capacity_factor)
  _choice("model.moe.grouped_matmul", e.grouped_matmul, GROUPED_MATMUL)


def _check_rope_scaling(r):
  _choice("model.rope_scaling.kind", r.kind, ROPE_SCALING)
  if r.factor < 1:
    raise ConfigError(f"model.rope_scaling.factor={r.factor} must be >= 1 (the context "
                      "is extended by this factor)")
  if r.kind == "yarn":
    if r.original_seq_len <= 0:
      raise ConfigError(f"model.rope_scaling.original_seq_len={r.original_seq_len} must be "
                        "> 0 for yarn: set it to the sequence length the model was trained at")
    if not r.beta_fast > r.beta_slow > 0:
      raise ConfigError(f"model.rope_scaling.beta_fast={r.beta_fast} must exceed "
                        f"beta_slow={r.beta_slow} > 0 (rotations per original context)")
  _positive("model.rope_scaling.mscale", r.mscale, allow_zero=True)


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

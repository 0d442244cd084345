"""What a run writes about itself: step records, its summary, JSON files, and the lines
it prints at start-up, before it compiles anything (what is trained, where, on what)."""

from __future__ import annotations

import json
import os

import jax

from fmjax.nn import cost, model, moe
from fmjax.nn import params as params_lib
from fmjax.train import objectives


def step_record(stats, step_time: float, tokens_per_step: int, flops_per_token: float,
                peak: float) -> dict:
  """One metrics record from a step's fetched statistics."""
  record = objectives.summarize(stats)
  tokens_per_s = tokens_per_step / step_time if step_time > 0 else 0.0
  record.update(lr=float(stats["lr"]), grad_norm=float(stats["grad_norm"]),
                tokens_per_s=tokens_per_s, step_time_s=step_time,
                mfu=tokens_per_s * flops_per_token / peak,
                nonfinite_consecutive=int(stats["nonfinite_consecutive"]),
                nonfinite_total=int(stats["nonfinite_total"]))
  if "rollout_s" in stats:  # RL: a step is rollouts, rewards, then updates (fmjax.posttrain.rl)
    update_s = step_time - float(stats["rollout_s"]) - float(stats["reward_s"])
    record["update_tokens_per_s"] = tokens_per_step / update_s if update_s > 0 else 0.0
  record.update(moe.summarize(stats))
  return record


def run_summary(cfg, s, **extra) -> dict:
  """The summary of a run of `cfg` on setup `s` (fmjax.train.state.Setup), with `extra`."""
  counts = cost.param_counts(cfg.model)
  assert counts["total"] == params_lib.count(model.param_decls(cfg.model))
  return {"params": counts["total"], "non_embedding_params": counts["non_embedding"],
          "active_params": counts["active"],
          "trained_params": params_lib.count(s.split(s.decls)[0]),
          "flops_per_token": cost.flops_per_token(cfg.model, cfg.data.seq_len),
          "mesh": dict(s.mesh.shape), **extra}


def _short(n: float) -> str:
  """1234 -> '1.23K', 2_400_000 -> '2.4M': three significant digits."""
  for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= size:
      return f"{n / size:.3g}{unit}"
  return f"{n:g}"


def startup_lines(cfg, s, workdir: str, checkpoints: str) -> list[str]:
  """What the run trains, on which devices, on what data and where: a few lines to print
  before anything is compiled."""
  m, d, t = cfg.model, cfg.data, cfg.train
  counts = cost.param_counts(m)
  trained = params_lib.count(s.split(s.decls)[0])
  attention = (f"MLA, {m.n_heads} heads" if m.attention == "mla" else
               f"GQA, {m.n_heads} heads, {m.n_kv_heads} KV heads")
  params = (f"{_short(counts['total'])} parameters "
            f"({_short(counts['non_embedding'])} without embeddings")
  if m.moe.n_routed_experts:
    params += (f"; {_short(counts['active'])} active per token: {m.moe.experts_per_token} of "
               f"{m.moe.n_routed_experts} experts")
  if trained != params_lib.count(s.decls):
    params += f"; {_short(trained)} trained"
  devices = jax.devices()
  mesh = " x ".join(f"{a}={n}" for a, n in s.mesh.shape.items())
  tokens = t.batch_size * d.seq_len
  processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
  curriculum = f" (curriculum {d.curriculum!r})" if d.curriculum else ""
  o = cfg.objective
  if o.name == "next_token":
    source = f"{d.mixture!r}{curriculum}"
  elif o.name == "reward_model" and o.reward_model.data:
    source = repr(o.reward_model.data)
  else:  # the task families (fmjax.data.tasks)
    source = f"the tasks {o.tasks!r}" if o.tasks else "the tasks"
  elsewhere = checkpoints != os.path.join(workdir, "checkpoints")
  return [
      f"model: {m.n_layers} layers, d_model {m.d_model}, {attention}, vocab {m.vocab_size}: "
      f"{params})",
      f"mesh: {mesh} over {len(devices)} {devices[0].device_kind} devices{processes}",
      f"data: {o.name} on {source}; {t.batch_size} x "
      f"{d.seq_len} = {tokens:,} tokens a step, {t.steps:,} steps ({_short(tokens * t.steps)} "
      "tokens)",
      f"workdir: {os.path.abspath(workdir)}"
      + (f" (checkpoints: {checkpoints})" if elsewhere else ""),
  ]


def write_json(path: str, obj, indent: int = 2) -> None:
  """Writes `obj` through a temporary file, so `path` never holds half of it."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=indent, sort_keys=True)
  os.replace(tmp, path)

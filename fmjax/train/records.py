"""What a run writes about itself: step records, its summary, and JSON files."""

from __future__ import annotations

import json
import os

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


def write_json(path: str, obj, indent: int = 2) -> None:
  """Writes `obj` through a temporary file, so `path` never holds half of it."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=indent, sort_keys=True)
  os.replace(tmp, path)

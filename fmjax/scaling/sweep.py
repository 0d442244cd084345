"""Sweeps declared in experiment files: expand, run (or print launch commands), collect.

An experiment file that declares a sweep has, next to `get_config()`, a
`sweep()` that returns a list of override dicts ({"model.depth": 4, ...}); the
helpers `grid` and `isoflop` build the usual designs. Each member is the file's
config with its overrides applied and the size dial and horizon resolved
(fmjax.scaling.sizing). It trains in DIR/<member name> through `fmjax.main`, exactly as
its printed launch command would, and a member whose workdir already holds a
finished run of the same config is skipped, so re-running a sweep resumes it.
After each member, DIR/records.jsonl is rewritten with one record per finished
member: the table that `python -m fmjax.scaling fit` reads.

  python -m fmjax.sweep --config=experiments/scaling_tiny.py --workdir=runs/scaling_tiny
  python -m fmjax.sweep --config=experiments/scaling_tiny.py --workdir=DIR --print_commands
  python -m fmjax.sweep --config=experiments/scaling_tiny.py --workdir=DIR --collect

--config.FIELD=VALUE arguments apply to every member (e.g.
--config.checkpoint.root=gs://bucket/fmjax on a TPU pod), and --config=FILE:ARG
sweeps the variant get_config(ARG): each member's command passes FILE:ARG on.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
import time

import tqdm

from fmjax import config as config_lib
from fmjax.nn import cost
from fmjax.scaling import sizing
from fmjax.train import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECORDS = "records.jsonl"


def grid(**axes) -> list[dict]:
  """Every combination: grid(model__depth=[2, 4], train__flops=[1e13]) ('__' for '.')."""
  keys = [k.replace("__", ".") for k in axes]
  return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


def isoflop(budgets, depths, **fixed) -> list[dict]:
  """For each FLOP budget, one member per depth, each trained to that budget."""
  fixed = {k.replace("__", "."): v for k, v in fixed.items()}
  return [{"train.flops": float(c), "model.depth": int(d), **fixed}
          for c in budgets for d in depths]


@dataclasses.dataclass
class Member:
  name: str
  overrides: dict
  cfg: object  # resolved ConfigDict


def member_name(overrides: dict) -> str:
  """A short, filesystem-safe name: 'flops=1e+13,depth=2' -> 'flops1e+13_depth2'."""
  parts = [key.split(".")[-1] + (f"{value:g}" if isinstance(value, float) else str(value))
           for key, value in overrides.items()]
  return re.sub(r"[^A-Za-z0-9_+.=-]", "-", "_".join(parts)) or "base"


def load_experiment(path: str):
  if not os.path.isfile(path):
    raise config_lib.ConfigError(f"--config={path}: no such experiment file")
  spec = importlib.util.spec_from_file_location("fmjax_experiment", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "sweep"):
    raise config_lib.ConfigError(f"{path} declares no sweep(); add one that returns a list of "
                                 "override dicts (see fmjax.scaling.sweep.grid and fmjax.scaling.sweep.isoflop)")
  return module


def apply_overrides(cfg, overrides: dict):
  cfg = config_lib.from_json(config_lib.to_json(cfg))
  for key, value in overrides.items():
    *path, leaf = key.split(".")
    node = cfg
    for p in path:
      if p not in node:
        raise config_lib.ConfigError(f"sweep override {key}: no section {p!r} in the config")
      node = node[p]
    if leaf not in node:
      raise config_lib.ConfigError(f"sweep override {key}: unknown field; check fmjax/config.py")
    if isinstance(node[leaf], float) and isinstance(value, int):
      value = float(value)
    try:
      node[leaf] = value
    except TypeError as e:
      raise config_lib.ConfigError(f"sweep override {key}={value!r}: {e}") from None
  return cfg


def expand(spec: str, common: dict | None = None) -> list[Member]:
  """The sweep's members, each with its fully resolved config.

  `spec` is 'FILE' or 'FILE:ARG': ARG picks the variant get_config(ARG) every member
  starts from (the file's sweep() is the same for every variant). `common` overrides
  apply to every member (e.g. checkpoint.root on a pod); members are named by their
  own overrides only.
  """
  path, _, arg = spec.partition(":")
  module = load_experiment(path)
  base = module.get_config(arg) if arg else module.get_config()
  members, seen = [], {}
  for overrides in module.sweep():
    name = member_name(overrides)
    if name in seen:
      raise config_lib.ConfigError(f"sweep members {seen[name]} and {overrides} share the "
                                   f"name {name!r}; make their overrides differ")
    seen[name] = overrides
    overrides = {**(common or {}), **overrides}
    members.append(Member(name, overrides, sizing.resolve(apply_overrides(base, overrides))))
  return members


def command(path: str, member: Member, workdir: str, python: str = "python") -> list[str]:
  """The launch command that trains `member` into workdir/<name>."""
  args = [python, "-m", "fmjax.main", f"--config={path}"]
  for key, value in member.overrides.items():  # as fmjax.main's flags read them: no quotes
    args.append(f"--config.{key}={value}")
  return args + [f"--workdir={os.path.join(workdir, member.name)}"]


def is_finished(member: Member, workdir: str) -> bool:
  """True if workdir/<name> holds a finished run of this config.

  A run made before fmjax's schema gained fields counts as the same config
  when only those new fields differ, at their defaults (as a resume does, see
  fmjax.train.workdir.config_changes): updating fmjax in the middle of a sweep does
  not train its finished members again.
  """
  run_dir = os.path.join(workdir, member.name)
  path = os.path.join(run_dir, "summary.json")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    summary = json.load(f)
  if summary.get("steps") != member.cfg.train.steps:
    return False
  if summary.get("config_hash") == config_lib.config_hash(member.cfg):
    return True
  try:
    with open(os.path.join(run_dir, "config.json")) as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return False
  return not workdir_lib.config_changes(saved, member.cfg.to_dict())


def record(member: Member, workdir: str, budget=None) -> dict:
  """One row of the records table, from the member's summary and metrics files."""
  run_dir = os.path.join(workdir, member.name)
  with open(os.path.join(run_dir, "summary.json")) as f:
    summary = json.load(f)
  curve, evals = [], []
  metrics_path = os.path.join(run_dir, "metrics.jsonl")
  if os.path.exists(metrics_path):
    with open(metrics_path) as f:
      for line in f:
        r = json.loads(line)
        if "eval_loss" in r:
          evals.append([r["step"], r["eval_loss"]])
        elif "loss" in r:
          curve.append([r["step"], r["loss"]])
  m, counts = member.cfg.model, cost.param_counts(member.cfg.model)
  tokens = member.cfg.train.steps * sizing.tokens_per_step(member.cfg)
  fpt = cost.flops_per_token(m, member.cfg.data.seq_len)
  return {
      "name": member.name, "config_hash": summary["config_hash"], "workdir": run_dir,
      "params": counts["total"], "non_embedding_params": counts["non_embedding"],
      "active_params": counts.get("active", counts["total"]),
      "tokens": tokens, "flops": tokens * fpt, "flops_6nd": 6 * counts["total"] * tokens,
      "budget": budget if budget is not None else member.overrides.get("train.flops"),
      "flops_per_token": fpt, "depth": m.depth, "n_layers": m.n_layers, "d_model": m.d_model,
      "steps": member.cfg.train.steps,
      "final_eval_loss": summary["final_eval_loss"],
      "best_eval_loss": min([e[1] for e in evals] + [summary["final_eval_loss"]]),
      "eval_curve": evals, "loss_curve": curve, "wall_time_s": summary.get("wall_time_s"),
      **{k: v for k, v in summary.items() if k.startswith("data_")},
      # train.eval_suite's last results ({task: metrics, stderr, ...}): the downstream
      # scores that `python -m fmjax.scaling downstream` fits against loss or compute.
      **({"suite": summary["suite"]} if summary.get("suite") else {}),
  }


def collect(members: list[Member], workdir: str) -> list[dict]:
  """Rewrites workdir/records.jsonl from every finished member; returns the records."""
  rows = [record(m, workdir) for m in members if is_finished(m, workdir)]
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, RECORDS + ".tmp")
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  os.replace(tmp, os.path.join(workdir, RECORDS))
  return rows


def run(path: str, workdir: str, members: list[Member] | None = None, progress=True) -> int:
  """Trains every unfinished member in turn; returns how many failed."""
  members = expand(path) if members is None else members
  todo = [m for m in members if not is_finished(m, workdir)]
  print(f"sweep: {len(members)} members, {len(members) - len(todo)} already finished, "
        f"{len(todo)} to run -> {os.path.join(workdir, RECORDS)}", flush=True)
  failed = 0
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(  # members import fmjax from this checkout
      [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  bar = tqdm.tqdm(total=len(members), initial=len(members) - len(todo), unit="run",
                  desc="sweep", disable=not progress, position=0)
  for m in todo:
    bar.write(f"sweep: training {m.name}: {m.cfg.model.n_layers} layers, d_model "
              f"{m.cfg.model.d_model}, {m.cfg.train.steps} steps")
    started = time.time()
    result = subprocess.run(command(path, m, workdir, python=sys.executable), env=env)
    if result.returncode:
      failed += 1
      bar.write(f"sweep: {m.name} failed with exit code {result.returncode}; re-run the sweep "
                f"to retry it (its workdir resumes from its last checkpoint)")
    else:
      bar.write(f"sweep: {m.name} finished in {time.time() - started:.0f} s")
    collect(members, workdir)
    bar.update(1)
  bar.close()
  rows = collect(members, workdir)
  print(f"sweep: {len(rows)}/{len(members)} members finished; records in "
        f"{os.path.join(workdir, RECORDS)}", flush=True)
  return failed


"""Every GPU benchmark target of fmjax in one command, inside a fixed time budget.

  python tools/bench_gpu.py --out=DIR [--only=NAME,...] [--budget_s=280] [--resume]
  python tools/bench_gpu.py --smoke --out=DIR     # the same plan on a CPU, at a tiny size
  python tools/bench_gpu.py --list                # the plan: names and commands

Each run is a subprocess: `python -m fmjax.bench ... --json=...` (see
fmjax/bench.py), or tools/bench_torch.py for the PyTorch baseline. Its record,
or why it failed, is one line of DIR/records.jsonl, written as soon as the run
ends: the run's JSON record plus `name`, `group`, `settings`, `command`,
`ok`, `error` (the tail of its output when it failed; None otherwise) and
`wall_s`. Its full output is in DIR/logs/NAME.log. DIR/summary.md, rewritten
after every run and printed at the end, has a table of the runs, the targets,
the fastest attention kernel at each shape and each XLA flag's step time
against XLA's defaults.

The plan (`--list` prints it in the order it runs: the targets' runs first,
so that a budget that runs out drops comparisons, not targets):
- dense 1B (experiments/bench_dense_1b.py), seq 2048, batch 8: attention
  cudnn, remat dots (the headline); with remat none; pallas and xla;
- the same at seq 8192, batch 2 (`:seq8192`): cudnn and pallas;
- seq 32768, batch 1, remat full (`:seq32768`): cudnn;
- MoE 1B (experiments/bench_moe_1b.py), attention auto: dropless with
  grouped matmuls ragged_dot and blocked, and capacity dispatch (factor 1.25);
- PyTorch (transformers' LlamaForCausalLM at the dense 1B shape, when torch
  is importable): under torch.compile, and eager;
- XLA flags: the dense headline with XLA's defaults (FMJAX_XLA_FLAGS=0,
  XLA_FLAGS empty), then each of fmjax's GPU flag candidates alone.

Every run has a timeout (`--timeout_s`, and the time left of `--budget_s`),
so one hung run cannot use up the budget, and
a run is skipped (recorded with ok=false) when less than `--min_start_s` of
the budget is left. A run costs about 20 s on the GPU (start-up, a 1B
compile, 12 steps), torch.compile of the whole model more
(`--torch_compile_scope=layers` compiles one decoder layer for all of them
instead); what a budget leaves out, `--resume` runs next time: it keeps the
successful records of an earlier invocation into the same DIR and runs only
the rest.

`--extra=NAME:field=value,...` adds a run of the dense seq 2048 headline with
those config overrides, after the plan's runs (with `--only` too).

`--smoke` runs the same plan on a CPU at a tiny size (2 layers, d_model 64,
vocab 512; seq 128, 256 and 512 for the three dense shapes, 64 with the
interpreted pallas kernel; batch 2, or 1 at the longest), cudnn replaced by
xla, the torch baseline eager only, 2 timed steps after 1 warm-up step.
Its figures check the plumbing, not the targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DENSE = "experiments/bench_dense_1b.py"
MOE = "experiments/bench_moe_1b.py"
TORCH = "tools/bench_torch.py"
FLAG_CANDIDATES = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_triton_gemm=false",
    "--xla_gpu_enable_highest_priority_async_stream=true",
)
MOE_BASELINE_TOKENS_PER_S = 30_570
# target name -> goal, as the summary checks them
GOALS = {"ratio_torch": 1.2, "mfu_2048": 0.50, "mfu_8192": 0.50, "mfu_moe": 0.35,
         "moe_vs_baseline": 3.0}

# Smoke sizes: tiny models with the presets' structure.
SMOKE_DENSE = {"model.vocab_size": 512, "model.d_model": 64, "model.n_layers": 2,
               "model.n_heads": 4, "model.n_kv_heads": 2, "model.d_ff": 128}
SMOKE_MOE = {"model.vocab_size": 512, "model.d_model": 64, "model.n_layers": 2,
             "model.n_heads": 2, "model.d_ff": 128, "model.q_lora_rank": 32,
             "model.kv_lora_rank": 16, "model.qk_nope_head_dim": 16,
             "model.qk_rope_head_dim": 8, "model.v_head_dim": 16,
             "model.moe.n_routed_experts": 8, "model.moe.moe_intermediate_size": 32,
             "data.seq_len": 128, "train.batch_size": 2}
SMOKE_SHAPES = {2048: (128, 2), 8192: (256, 2), 32768: (512, 1)}  # seq -> (seq, batch)
SMOKE_PALLAS_SEQ = 64


@dataclasses.dataclass
class Run:
  """One subprocess of the plan."""
  name: str
  group: str  # dense2048 | dense8192 | dense32768 | moe | torch | flags | extra
  argv: list  # the command, "python" standing for this interpreter
  settings: dict  # what sets it apart from the other runs of its group
  timeout_s: float
  env: dict = dataclasses.field(default_factory=dict)  # environment changes

  def command(self) -> str:
    """The command line that reproduces the run."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
    return " ".join(filter(None, [env, shlex.join(self.argv)]))


def flag_candidates() -> tuple:
  """fmjax's GPU XLA flag candidates (fmjax/runtime/xla_flags.py), each to be measured alone."""
  from fmjax.runtime import xla_flags
  return tuple(getattr(xla_flags, "GPU_CANDIDATES", FLAG_CANDIDATES))


def flag_name(flag: str) -> str:
  """--xla_gpu_enable_triton_gemm=false -> flag_triton_gemm_false (a value of true is left out)."""
  short, _, value = flag.lstrip("-").partition("=")
  for prefix in ("xla_gpu_enable_", "xla_gpu_", "xla_"):
    if short.startswith(prefix):
      short = short[len(prefix):]
      break
  return "flag_" + short + ("" if value in ("", "true") else f"_{value}")


def torch_available() -> bool:
  return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def overrides_argv(overrides: dict) -> list:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def make_plan(smoke: bool = False, steps: int = 10, warmup: int = 2, timeout_s: float = 90,
              with_torch: bool = True, candidates=FLAG_CANDIDATES, extras=(),
              compile_scope: str = "model") -> list[Run]:
  """The runs, in the order they run (see the module docstring)."""
  slow = 1 if smoke else 2  # longer timeouts for the runs that compile more
  runs = []

  def dense(name, group, seq, impl, remat=None, env=None):
    """The dense 1B preset at `seq` (its 2048, 8192 or 32768 variant) with attention `impl`."""
    arg = {2048: "", 8192: ":seq8192", 32768: ":seq32768"}[seq]
    overrides, settings = {}, {"attention_impl": impl}
    if smoke:
      impl = "xla" if impl == "cudnn" else impl
      s_seq, s_batch = SMOKE_SHAPES[seq]
      if impl == "pallas":
        s_seq = SMOKE_PALLAS_SEQ
      overrides.update(SMOKE_DENSE, **{"data.seq_len": s_seq, "train.batch_size": s_batch})
      settings.update(attention_impl=impl, seq_len=s_seq, batch_size=s_batch)
    else:
      settings.update(seq_len=seq, batch_size={2048: 8, 8192: 2, 32768: 1}[seq])
    overrides["model.attention_impl"] = impl
    if remat:
      overrides["model.remat"] = remat
    settings["remat"] = remat or {32768: "full"}.get(seq, "dots")
    if env is not None:
      settings["xla_flags"] = env.get("XLA_FLAGS") or "XLA defaults"
    t = timeout_s * (slow if impl == "pallas" or seq == 32768 else 1)
    return Run(name, group, ["python", "-m", "fmjax.bench", f"--config={DENSE}{arg}",
                             *overrides_argv(overrides), f"--steps={steps}",
                             f"--warmup={warmup}"], settings, t, dict(env or {}))

  def moe(name, dispatch, grouped_matmul=None):
    overrides = dict(SMOKE_MOE) if smoke else {}
    overrides.update({"model.attention_impl": "auto", "model.moe.dispatch": dispatch})
    settings = {"attention_impl": "auto", "dispatch": dispatch}
    if grouped_matmul:
      overrides["model.moe.grouped_matmul"] = grouped_matmul
      settings["grouped_matmul"] = grouped_matmul
    else:
      overrides["model.moe.capacity_factor"] = 1.25
      settings["capacity_factor"] = 1.25
    return Run(name, "moe", ["python", "-m", "fmjax.bench", f"--config={MOE}",
                             *overrides_argv(overrides), f"--steps={steps}",
                             f"--warmup={warmup}"], settings, timeout_s * slow)

  def torch_run(mode):
    overrides = dict(SMOKE_DENSE, **{"data.seq_len": SMOKE_SHAPES[2048][0],
                                     "train.batch_size": SMOKE_SHAPES[2048][1]}) if smoke else {}
    settings = {"mode": mode, "attention": "causal, one document per row"}
    argv = ["python", TORCH, f"--config={DENSE}", *overrides_argv(overrides), f"--mode={mode}"]
    if mode == "compile":
      settings["compile_scope"] = compile_scope
      argv.append(f"--compile_scope={compile_scope}")
    return Run(f"torch_{mode}", "torch", argv + [f"--steps={steps}", f"--warmup={warmup}"],
               settings, timeout_s * (slow if mode == "compile" else 1))

  runs += [dense("dense2048_cudnn_dots", "dense2048", 2048, "cudnn", "dots"),
           moe("moe_dropless_ragged_dot", "dropless", "ragged_dot"),
           moe("moe_dropless_blocked", "dropless", "blocked"),
           dense("dense8192_cudnn", "dense8192", 8192, "cudnn"),
           dense("dense32768_cudnn_full", "dense32768", 32768, "cudnn")]
  if with_torch and not smoke:
    runs.append(torch_run("compile"))
  runs += [dense("dense2048_cudnn_none", "dense2048", 2048, "cudnn", "none"),
           dense("dense2048_pallas_dots", "dense2048", 2048, "pallas", "dots"),
           dense("dense8192_pallas", "dense8192", 8192, "pallas"),
           dense("dense2048_xla_dots", "dense2048", 2048, "xla", "dots"),
           dense("flags_defaults", "flags", 2048, "cudnn", "dots",
                 env={"FMJAX_XLA_FLAGS": "0", "XLA_FLAGS": ""})]
  runs += [dense(flag_name(f), "flags", 2048, "cudnn", "dots",
                 env={"FMJAX_XLA_FLAGS": "0", "XLA_FLAGS": f}) for f in candidates]
  runs.append(moe("moe_capacity", "capacity"))
  if with_torch:
    runs.append(torch_run("eager"))
  for name, overrides in extras:
    run = dense(name, "extra", 2048, "cudnn", "dots")
    run.argv[-2:-2] = overrides_argv(overrides)  # after the preset's, so they win
    run.settings.update({k.split(".")[-1]: v for k, v in overrides.items()})
    runs.append(run)
  return runs


def parse_extra(text: str) -> tuple[str, dict]:
  """NAME:field=value[,field=value...] -> (NAME, {field: value})."""
  name, _, rest = text.partition(":")
  if not name or not rest:
    raise ValueError(f"--extra={text!r}: expected NAME:field=value[,field=value...]")
  overrides = {}
  for item in rest.split(","):
    key, eq, value = item.partition("=")
    if not eq:
      raise ValueError(f"--extra={text!r}: {item!r} is not field=value")
    overrides[key.strip().removeprefix("--config.")] = value.strip()
  return name, overrides


# ---------------------------------------------------------------------------- running


def child_env(run: Run, smoke: bool) -> dict:
  env = dict(os.environ)
  path = env.get("PYTHONPATH", "")
  if REPO not in path.split(os.pathsep):
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, path]))
  env["PYTHONUNBUFFERED"] = "1"
  if smoke:  # one CPU device, whatever the caller's fake device count
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
  env.update(run.env)
  return env


def tail(path: str, lines: int = 15, chars: int = 2000) -> str:
  try:
    with open(path, errors="replace") as f:
      text = f.read()
  except OSError:
    return ""
  kept = [line for line in text.splitlines() if line.strip()][-lines:]
  return "\n".join(kept)[-chars:]


def stop(proc: subprocess.Popen) -> None:
  """Ends the run's whole process group: SIGTERM, then SIGKILL."""
  for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
    try:
      os.killpg(proc.pid, sig)
    except ProcessLookupError:
      return
    try:
      proc.wait(timeout=wait)
      return
    except subprocess.TimeoutExpired:
      continue


def execute(run: Run, out: str, timeout_s: float, smoke: bool) -> dict:
  """Runs `run` for at most `timeout_s`; its record (see the module docstring)."""
  json_path = os.path.join(out, "runs", f"{run.name}.json")
  log_path = os.path.join(out, "logs", f"{run.name}.log")
  if os.path.exists(json_path):
    os.remove(json_path)
  argv = [sys.executable if a == "python" else a for a in run.argv] + [f"--json={json_path}"]
  base = {"name": run.name, "group": run.group, "settings": run.settings,
          "command": run.command(), "smoke": smoke}
  start = time.perf_counter()
  timed_out = False
  with open(log_path, "w") as log:
    log.write(f"$ {run.command()}\n")
    log.flush()
    proc = subprocess.Popen(argv, cwd=REPO, env=child_env(run, smoke), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
      rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      timed_out = True
      stop(proc)
      rc = proc.returncode
    except BaseException:
      stop(proc)
      raise
  wall_s = time.perf_counter() - start
  record = None
  if rc == 0 and not timed_out:
    try:
      with open(json_path) as f:
        record = json.loads(f.read())
    except (OSError, ValueError):
      record = None
  if record is not None:
    record.update(base, ok=True, error=None, rc=rc, wall_s=wall_s)
    return record
  if timed_out:
    error = f"timed out after {timeout_s:.0f} s\n{tail(log_path)}"
  elif rc == 0:
    error = f"exit 0 without a JSON record\n{tail(log_path)}"
  else:
    error = tail(log_path) or f"exit {rc}"
  return dict(base, ok=False, error=error, rc=rc, timed_out=timed_out, wall_s=wall_s)


def skipped(run: Run, reason: str, smoke: bool) -> dict:
  return {"name": run.name, "group": run.group, "settings": run.settings,
          "command": run.command(), "smoke": smoke, "ok": False, "skipped": True,
          "error": f"skipped: {reason}", "rc": None, "wall_s": 0.0}


# ---------------------------------------------------------------------------- summary


def _pct(x) -> str:
  return "-" if x is None else f"{x:.1%}"


def _memory(record) -> str:
  """The run's peak memory per device (the compiled step's, for fmjax)."""
  n = (record.get("memory_per_device") or {}).get("peak_bytes")
  if n is None:
    return "-"
  return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.1f} GiB"


def _first_line(error) -> str:
  lines = [line for line in (error or "").splitlines() if line.strip()]
  if not lines:
    return ""
  first = lines[0]
  if first.startswith(("timed out", "skipped", "exit 0")):
    return first
  fmjax_lines = [line for line in lines if line.startswith("fmjax:")]
  return (fmjax_lines or lines)[-1][:200]


def run_line(r: dict) -> str:
  """One line on how a run went."""
  if not r["ok"]:
    return f"FAILED in {r['wall_s']:.1f} s: {_first_line(r['error'])}"
  parts = [f"ok in {r['wall_s']:.1f} s: {r['step_time_s'] * 1e3:,.1f} ms/step",
           f"{r['tokens_per_s']:,.0f} tokens/s"]
  if r.get("mfu") is not None:
    full = r.get("mfu_full_square")
    parts.append(f"MFU {r['mfu']:.1%}" + (f" (full square {full:.1%})" if full else ""))
  if _memory(r) != "-":
    parts.append(f"peak {_memory(r)}")
  if r.get("compile_s") is not None:
    parts.append(f"compile {r['compile_s']:.1f} s")
  elif r.get("warmup_s") is not None:
    parts.append(f"warm-up {r['warmup_s']:.1f} s")
  return ", ".join(parts)


def _best(records, key):
  records = [r for r in records if r.get(key) is not None]
  return max(records, key=lambda r: r[key]) if records else None


def targets(records: list[dict], smoke: bool) -> list[tuple]:
  """[(target, measured, goal, status)] from the records."""
  ok = [r for r in records if r.get("ok")]
  by_name = {r["name"]: r for r in ok}
  group = lambda g: [r for r in ok if r.get("group") == g]
  rows = []

  def status(value, goal):
    if value is None:
      return "not measured"
    return ("met" if value >= goal else "missed") + (" (smoke)" if smoke else "")

  best = _best(group("dense2048"), "tokens_per_s")
  base = by_name.get("torch_compile") or (by_name.get("torch_eager") if smoke else None)
  ratio = best["tokens_per_s"] / base["tokens_per_s"] if best and base else None
  rows.append((f"dense 1B, seq 2048: best fmjax tokens/s / torch.compile tokens/s"
               + (" (smoke: torch eager)" if smoke else ""),
               f"{ratio:.2f}x ({best['tokens_per_s']:,.0f} {best['name']} / "
               f"{base['tokens_per_s']:,.0f} {base['name']})" if ratio else "-",
               f">= {GOALS['ratio_torch']}x", status(ratio, GOALS["ratio_torch"])))
  for key, g, label in (("mfu_2048", "dense2048", "dense 1B, seq 2048: MFU"),
                        ("mfu_8192", "dense8192", "dense 1B, seq 8192: MFU")):
    r = _best(group(g), "mfu")
    rows.append((label, f"{r['mfu']:.1%} ({r['name']}; full square "
                        f"{_pct(r.get('mfu_full_square'))})" if r else "-",
                 f">= {GOALS[key]:.0%}", status(r and r["mfu"], GOALS[key])))
  dropless = [r for r in group("moe") if r.get("settings", {}).get("dispatch") == "dropless"]
  r = _best(dropless, "mfu")
  rows.append(("MoE 1B, dropless: MFU", f"{r['mfu']:.1%} ({r['name']})" if r else "-",
               f">= {GOALS['mfu_moe']:.0%}", status(r and r["mfu"], GOALS["mfu_moe"])))
  r = _best(dropless, "tokens_per_s")
  x = r["tokens_per_s"] / MOE_BASELINE_TOKENS_PER_S if r else None
  rows.append((f"MoE 1B, dropless: tokens/s vs {MOE_BASELINE_TOKENS_PER_S:,}",
               f"{x:.2f}x ({r['tokens_per_s']:,.0f}, {r['name']})" if r else "-",
               f">= {GOALS['moe_vs_baseline']:.0f}x", status(x, GOALS["moe_vs_baseline"])))
  r = next(iter(group("dense32768")), None)
  tried = any(x.get("group") == "dense32768" and not x.get("skipped") for x in records)
  rows.append(("dense 1B, seq 32768, batch 1, remat full: trains",
               f"yes: peak {_memory(r)} per device (compiled step), MFU {_pct(r.get('mfu'))}"
               if r else ("no" if tried else "-"),
               "runs", ("met" + (" (smoke)" if smoke else "")) if r else
               ("missed" if tried else "not measured")))
  return rows


def kernels(records: list[dict]) -> list[tuple]:
  """[(shape, fastest run, every run's step time and loss)] over the runs that differ only in
  attention. The runs train the same model on the same batch for the same steps, so exact
  kernels end at the same loss, up to bf16 rounding: a kernel that drops a mask does not."""
  ok = [r for r in records if r.get("ok")]
  rows = []
  for g, label in (("dense2048", "seq 2048, batch 8, remat dots"),
                   ("dense8192", "seq 8192, batch 2, remat dots"),
                   ("dense32768", "seq 32768, batch 1, remat full")):
    same = [r for r in ok if r.get("group") == g
            and r.get("settings", {}).get("remat") == ("full" if g == "dense32768" else "dots")]
    if not same:
      continue
    same.sort(key=lambda r: r["step_time_s"])
    impl = lambda r: r.get("settings", {}).get("attention_impl", "?")
    rows.append((label, f"{impl(same[0])} ({same[0]['name']})",
                 ", ".join(f"{impl(r)} {r['step_time_s'] * 1e3:,.1f} ms (loss {r.get('loss', 0):.4f})"
                           for r in same)))
  return rows


def flag_rows(records: list[dict]) -> list[tuple]:
  """[(flags, run, step time, vs XLA defaults)] of the XLA flag runs."""
  ok = {r["name"]: r for r in records if r.get("ok")}
  defaults = ok.get("flags_defaults")
  rows = []
  for r in records:
    if r.get("group") != "flags" and r["name"] != "dense2048_cudnn_dots":
      continue
    flags_text = ("fmjax's GPU flags (the default)" if r["group"] != "flags"
                  else r["settings"].get("xla_flags", "?"))
    if not r.get("ok"):
      rows.append((flags_text, r["name"], "failed", "-"))
      continue
    vs = "-"
    if defaults:
      ratio = r["step_time_s"] / defaults["step_time_s"]
      vs = (f"{ratio:.3f}x ({abs(1 - ratio):.1%} {'less' if ratio < 1 else 'more'} time)"
            if r is not defaults else "1.000x")
    rows.append((flags_text, r["name"], f"{r['step_time_s'] * 1e3:,.1f} ms", vs))
  return rows


def _table(header, rows) -> list[str]:
  out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
  out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
  return out


def summarize(records: list[dict], meta: dict) -> str:
  """The markdown summary of `records` (see the module docstring)."""
  ok = [r for r in records if r.get("ok")]
  jax_r = next((r for r in ok if r.get("jax")), None)
  torch_r = next((r for r in ok if r.get("torch")), None)
  smoke = meta.get("smoke", False)
  lines = ["# fmjax GPU benchmark" + (" (smoke: tiny sizes on a CPU)" if smoke else ""), ""]
  lines.append(
      f"Date {meta.get('date', '?')}; device {(jax_r or torch_r or {}).get('device_kind', '?')}; "
      f"jax {jax_r['jax'] if jax_r else '?'}; torch {torch_r['torch'] if torch_r else '-'}; "
      f"{len(ok)} of {len(records)} runs ok; {meta.get('elapsed_s', 0):.0f} s in all"
      + (f"; not yet run: {', '.join(meta['pending'])}" if meta.get("pending") else "") + ".")
  lines += ["", "MFU counts causal attention as half the T x T square (the honest figure); "
                "\"full square\" counts all of it.", ""]
  lines += ["## Targets", ""]
  lines += _table(("target", "measured", "goal", "status"), targets(records, smoke))
  rows = kernels(records)
  if rows:
    lines += ["", "## Fastest exact attention kernel (what `auto` should pick)", ""]
    lines += _table(("shape", "fastest", "step time (and final loss) of each"), rows)
  rows = flag_rows(records)
  if rows:
    lines += ["", "## XLA flags (dense 1B, cudnn, seq 2048)", ""]
    lines += _table(("XLA_FLAGS", "run", "step time", "vs XLA defaults"), rows)
  lines += ["", "## Runs", ""]
  table_rows = []
  for r in records:
    if r.get("ok"):
      compile_s = r.get("compile_s", r.get("warmup_s"))
      table_rows.append((r["name"], "ok", f"{r['step_time_s'] * 1e3:,.1f}",
                         f"{r['tokens_per_s']:,.0f}", _pct(r.get("mfu")),
                         _pct(r.get("mfu_full_square")), _memory(r),
                         "-" if compile_s is None else f"{compile_s:.1f}", ""))
    else:
      table_rows.append((r["name"], "failed", "-", "-", "-", "-", "-", "-",
                         _first_line(r.get("error"))))
  lines += _table(("run", "ok", "step (ms)", "tokens/s", "MFU", "MFU full square",
                   "peak memory/device", "compile s", "error"), table_rows)
  lines += ["", "Commands: the `command` field of each record in records.jsonl; "
                "output of each run in logs/.", ""]
  return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", help="Directory for records.jsonl, summary.md, runs/ and logs/.")
  p.add_argument("--smoke", action="store_true", help="The same plan on a CPU at a tiny size.")
  p.add_argument("--only", default="", help="Comma-separated run names to run (default: all).")
  p.add_argument("--extra", action="append", default=[], metavar="NAME:FIELD=VALUE,...",
                 help="Also run the dense seq 2048 headline with these config overrides.")
  p.add_argument("--steps", type=int, help="Timed steps per run (default 10; smoke 2).")
  p.add_argument("--warmup", type=int, help="Warm-up steps per run (default 2; smoke 1).")
  p.add_argument("--budget_s", type=float,
                 help="Wall-clock budget of the whole plan (default 280; smoke 1800).")
  p.add_argument("--timeout_s", type=float,
                 help="Timeout of one run; twice this for pallas, seq 32768, MoE and "
                      "torch.compile (default 90; smoke 600).")
  p.add_argument("--min_start_s", type=float,
                 help="Skip a run when less budget than this is left (default 20; smoke 0).")
  p.add_argument("--resume", action="store_true",
                 help="Keep the ok records of an earlier invocation into --out; run the rest.")
  p.add_argument("--no_torch", action="store_true", help="Leave out the PyTorch baseline.")
  p.add_argument("--torch_compile_scope", choices=("model", "layers"), default="model",
                 help="What torch.compile compiles: the whole model, or each decoder layer "
                      "(a fraction of the compile time).")
  p.add_argument("--list", action="store_true", help="Print the plan and exit.")
  args = p.parse_args(argv)
  defaults = (dict(steps=2, warmup=1, budget_s=1800, timeout_s=600, min_start_s=0) if args.smoke
              else dict(steps=10, warmup=2, budget_s=280, timeout_s=90, min_start_s=20))
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  if not args.list and not args.out:
    p.error("--out is required")
  try:
    args.extra = [parse_extra(e) for e in args.extra]
  except ValueError as e:
    p.error(str(e))
  return p, args


def main(argv=None) -> int:
  parser, args = parse_args(sys.argv[1:] if argv is None else argv)
  with_torch = not args.no_torch and torch_available()
  plan = make_plan(args.smoke, args.steps, args.warmup, args.timeout_s, with_torch,
                   flag_candidates(), args.extra, args.torch_compile_scope)
  names = [r.name for r in plan]
  if len(set(names)) != len(names):
    parser.error(f"run names repeat: {names}")
  if args.only:
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in only if n not in names]
    if unknown:
      parser.error(f"--only: unknown run(s) {', '.join(unknown)}; the plan has: "
                   f"{', '.join(names)}")
    extra_names = {name for name, _ in args.extra}
    plan = [r for r in plan if r.name in only or r.name in extra_names]
  if args.list:
    for r in plan:
      print(f"{r.name:<36} {r.command()}")
    return 0
  if not args.smoke:
    from fmjax.runtime import xla_flags
    if xla_flags.platform() != "gpu":
      print("bench_gpu: no jax GPU plugin is installed here; run it on the GPU machine, "
            "or with --smoke on a CPU", file=sys.stderr)
      return 2
  if not with_torch and not args.no_torch:
    print("bench_gpu: torch or transformers is not importable: no PyTorch baseline",
          file=sys.stderr, flush=True)

  out = os.path.abspath(args.out)
  for sub in ("runs", "logs"):
    os.makedirs(os.path.join(out, sub), exist_ok=True)
  records_path = os.path.join(out, "records.jsonl")
  summary_path = os.path.join(out, "summary.md")
  kept = {}
  if args.resume and os.path.exists(records_path):
    with open(records_path) as f:
      for line in f:
        r = json.loads(line)
        kept[r["name"]] = r
    commands = {r.name: r.command() for r in plan}
    kept = {n: r for n, r in kept.items() if r.get("ok") and r.get("command") == commands.get(n)}

  meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "smoke": args.smoke}
  records = []
  start = time.perf_counter()

  def write_summary(pending):
    meta.update(elapsed_s=time.perf_counter() - start, pending=pending)
    with open(summary_path, "w") as f:
      f.write(summarize(records, meta))

  print(f"bench_gpu: {len(plan)} runs, budget {args.budget_s:.0f} s, output in {out}",
        flush=True)
  with open(records_path, "w") as f:
    for i, run in enumerate(plan):
      elapsed = time.perf_counter() - start
      left = args.budget_s - elapsed
      prefix = f"[{i + 1:2d}/{len(plan)} {elapsed:4.0f} s]"
      if run.name in kept:
        record = kept[run.name]
        print(f"{prefix} {run.name}: kept from the earlier invocation", flush=True)
      elif left < max(args.min_start_s, 1):
        record = skipped(run, f"{max(left, 0):.0f} s of the {args.budget_s:.0f} s budget left",
                         args.smoke)
        print(f"{prefix} {run.name}: {record['error']}", flush=True)
      else:
        print(f"{prefix} {run.name}: {run.command()}", flush=True)
        record = execute(run, out, min(run.timeout_s, left), args.smoke)
        print(f"{' ' * len(prefix)} {run_line(record)}", flush=True)
      records.append(record)
      f.write(json.dumps(record, sort_keys=True) + "\n")
      f.flush()
      write_summary([r.name for r in plan[i + 1:]])
  write_summary([])
  with open(summary_path) as f:
    print("\n" + f.read(), flush=True)
  failed = [r["name"] for r in records if not r["ok"]]
  print(f"bench_gpu: {len(records) - len(failed)} of {len(records)} runs ok"
        + (f"; failed or skipped: {', '.join(failed)}" if failed else "")
        + f"; records in {records_path}, summary in {summary_path}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

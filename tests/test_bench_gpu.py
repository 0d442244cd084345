"""tools/bench_gpu.py: its plan covers every GPU target, failures become records, and the
summary computes the targets; one smoke invocation on the CPU end to end."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_FIELDS = ("name", "group", "settings", "command", "ok", "error", "wall_s")
MEASURED_FIELDS = ("step_time_s", "tokens_per_s", "mfu", "mfu_full_square", "device_kind",
                   "memory_per_device")


def _load():
  spec = importlib.util.spec_from_file_location("bench_gpu",
                                                os.path.join(REPO, "tools", "bench_gpu.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


bench_gpu = _load()


def test_plan_covers_every_target():
  plan = bench_gpu.make_plan(candidates=bench_gpu.flag_candidates())
  by_name = {r.name: r for r in plan}
  assert len(by_name) == len(plan)
  for name in ("dense2048_xla_dots", "dense2048_cudnn_dots", "dense2048_pallas_dots",
               "dense2048_cudnn_none", "dense8192_cudnn", "dense8192_pallas",
               "dense32768_cudnn_full", "moe_dropless_blocked", "moe_dropless_ragged_dot",
               "moe_capacity", "flags_defaults", "torch_eager", "torch_compile"):
    assert name in by_name, name
  assert ":seq8192" in by_name["dense8192_cudnn"].command()
  assert ":seq32768" in by_name["dense32768_cudnn_full"].command()
  assert "--config.model.remat=none" in by_name["dense2048_cudnn_none"].command()
  assert "grouped_matmul=ragged_dot" in by_name["moe_dropless_ragged_dot"].command()
  assert "capacity_factor=1.25" in by_name["moe_capacity"].command()
  flags = [r for r in plan if r.group == "flags"]
  assert len(flags) == 1 + len(bench_gpu.flag_candidates())
  for r in flags:
    assert r.env["FMJAX_XLA_FLAGS"] == "0"
  assert by_name["flags_defaults"].env["XLA_FLAGS"] == ""
  assert {r.env["XLA_FLAGS"] for r in flags[1:]} == set(bench_gpu.flag_candidates())
  # The smoke plan is the same plan, on the CPU: no cudnn, no torch.compile.
  smoke = bench_gpu.make_plan(smoke=True, candidates=bench_gpu.flag_candidates())
  assert [r.name for r in smoke] == [n for n in by_name if n != "torch_compile"]
  assert not any("attention_impl=cudnn" in r.command() for r in smoke)


def test_a_hung_run_is_stopped_and_recorded(tmp_path):
  for sub in ("runs", "logs"):
    os.makedirs(tmp_path / sub)
  run = bench_gpu.Run("hangs", "extra", ["python", "-c", "import time; time.sleep(60)"],
                      {}, timeout_s=1)
  record = bench_gpu.execute(run, str(tmp_path), run.timeout_s, smoke=True)
  assert record["ok"] is False and record["timed_out"] is True
  assert record["error"].startswith("timed out after 1 s")
  assert record["wall_s"] < 30


def _ok(name, group, step, tokens_per_s, mfu, **settings):
  return {"name": name, "group": group, "settings": settings, "ok": True, "error": None,
          "step_time_s": step, "tokens_per_s": tokens_per_s, "mfu": mfu,
          "mfu_full_square": mfu * 1.1, "memory_per_device": {"peak_bytes": 60 * 2**30},
          "device_kind": "NVIDIA H200", "jax": "0.11.2", "compile_s": 9.0, "wall_s": 20.0,
          "command": "python -m fmjax.bench"}


def test_summary_computes_the_targets():
  records = [
      _ok("dense2048_cudnn_dots", "dense2048", 0.300, 54_600, 0.56, attention_impl="cudnn",
          remat="dots"),
      _ok("dense2048_xla_dots", "dense2048", 0.400, 41_000, 0.42, attention_impl="xla",
          remat="dots"),
      _ok("dense8192_cudnn", "dense8192", 0.350, 46_800, 0.48, attention_impl="cudnn",
          remat="dots"),
      _ok("dense8192_pallas", "dense8192", 0.340, 48_200, 0.49, attention_impl="pallas",
          remat="dots"),
      _ok("dense32768_cudnn_full", "dense32768", 0.900, 36_400, 0.45, attention_impl="cudnn",
          remat="full"),
      _ok("moe_dropless_blocked", "moe", 0.150, 109_000, 0.30, dispatch="dropless"),
      _ok("moe_capacity", "moe", 0.120, 136_000, 0.38, dispatch="capacity"),
      dict(_ok("torch_compile", "torch", 0.390, 42_000, 0.43), torch="2.11"),
      _ok("flags_defaults", "flags", 0.310, 52_800, 0.54, xla_flags="XLA defaults"),
      {"name": "flag_triton_gemm_false", "group": "flags", "ok": False, "wall_s": 3.0,
       "settings": {"xla_flags": "--xla_gpu_enable_triton_gemm=false"},
       "error": "Traceback ...\nfmjax: config error: nope", "command": "x"},
  ]
  text = bench_gpu.summarize(records, {"date": "2026-12-01", "elapsed_s": 250})
  rows = {row[0]: row for row in bench_gpu.targets(records, smoke=False)}
  ratio = rows["dense 1B, seq 2048: best fmjax tokens/s / torch.compile tokens/s"]
  assert ratio[1].startswith("1.30x") and ratio[3] == "met"
  assert rows["dense 1B, seq 2048: MFU"][3] == "met"
  assert rows["dense 1B, seq 8192: MFU"][1].startswith("49.0%")
  assert rows["dense 1B, seq 8192: MFU"][3] == "missed"
  assert rows["MoE 1B, dropless: MFU"][1].startswith("30.0% (moe_dropless_blocked)")
  assert rows["MoE 1B, dropless: tokens/s vs 30,570"][1].startswith("3.57x")
  assert rows["dense 1B, seq 32768, batch 1, remat full: trains"][3] == "met"
  kernels = {row[0]: row[1] for row in bench_gpu.kernels(records)}
  assert kernels["seq 2048, batch 8, remat dots"].startswith("cudnn")
  assert kernels["seq 8192, batch 2, remat dots"].startswith("pallas")
  flags = {row[1]: row for row in bench_gpu.flag_rows(records)}
  assert flags["dense2048_cudnn_dots"][3] == "0.968x (3.2% less time)"
  assert flags["flag_triton_gemm_false"][2] == "failed"
  assert "fmjax: config error: nope" in text and "NVIDIA H200" in text


def test_smoke_records_every_run_and_failures(tmp_path):
  """The smoke plan on the CPU, a subset: one fmjax run, the torch baseline (when torch is
  importable), and two runs that must not stop the script: cudnn attention on a CPU, and
  a setting fmjax rejects."""
  out = tmp_path / "out"
  with_torch = bench_gpu.torch_available()
  only = ["dense2048_cudnn_dots"] + (["torch_eager"] if with_torch else [])
  r = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "bench_gpu.py"), "--smoke",
       f"--out={out}", f"--only={','.join(only)}",
       "--extra=cpu_cudnn:model.attention_impl=cudnn", "--extra=bad_remat:model.remat=sometimes"],
      capture_output=True, text=True, timeout=600, cwd=tmp_path)
  assert r.returncode == 0, r.stdout + r.stderr
  with open(out / "records.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [x["name"] for x in records] == only + ["cpu_cudnn", "bad_remat"]
  by_name = {x["name"]: x for x in records}
  for x in records:
    for field in RECORD_FIELDS:
      assert field in x, (x["name"], field)
  for name in only:
    assert by_name[name]["ok"], by_name[name]["error"]
    for field in MEASURED_FIELDS:
      assert field in by_name[name], (name, field)
    assert by_name[name]["step_time_s"] > 0 and by_name[name]["tokens_per_s"] > 0
  assert "attention_impl=xla" in by_name["dense2048_cudnn_dots"]["command"]
  assert by_name["dense2048_cudnn_dots"]["memory_per_device"]["peak_bytes"] > 0
  if with_torch:
    assert by_name["torch_eager"]["attention"] == "causal, one document per row"
  bad = by_name["bad_remat"]
  assert bad["ok"] is False and bad["rc"] == 2
  assert "fmjax: config error: model.remat='sometimes'" in bad["error"]
  cudnn = by_name["cpu_cudnn"]
  assert "--config.model.attention_impl=cudnn" in cudnn["command"]
  if not cudnn["ok"]:  # rejected on a CPU: a one-line fmjax error, exit 2
    assert cudnn["rc"] == 2 and "fmjax:" in cudnn["error"], cudnn["error"]
  summary = (out / "summary.md").read_text()
  assert "## Targets" in summary and "bad_remat" in summary
  assert "runs ok" in r.stdout

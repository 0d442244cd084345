"""The benchmark's accounting (not its speed), the chunked cross-entropy, and start-up flags."""

import json
import math
import os
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fmjax.train import benchmark as bench
from fmjax.nn import cost, model, sharding
from fmjax.train import objectives, state as state_lib
from fmjax.runtime import distributed
from fmjax.runtime import xla_flags
from fmjax.nn import params as params_lib
from fmjax.nn.spec import ModelSpec
from test_model import random_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXED_PEAK = (1e12, "fixed for the test")


def _loss_stats_grads(cfg, batch):
  params = params_lib.init(model.param_decls(cfg.model), jax.random.key(0))
  objective = objectives.OBJECTIVES["next_token"]
  (loss, stats), grads = jax.jit(jax.value_and_grad(
      lambda p: objective(p, jax.tree.map(jnp.asarray, batch), ModelSpec.from_config(cfg), cfg.objective), has_aux=True))(params)
  return loss, stats, grads


@pytest.mark.parametrize("chunk", [8])
def test_chunked_cross_entropy_equals_unchunked(chunk):
  base = tiny_config()
  base.objective.z_loss = 1e-3
  batch = random_batch(base, docs_per_row=3)
  chunked = base.copy_and_resolve_references()
  chunked.objective.ce_chunk = chunk
  loss0, stats0, g0 = _loss_stats_grads(base, batch)
  loss1, stats1, g1 = _loss_stats_grads(chunked, batch)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  for k in stats0:
    np.testing.assert_allclose(stats1[k], stats0[k], rtol=1e-6, err_msg=k)
  # Summation order differs: compare each gradient to within 1e-5 of its own scale.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max()), g1, g0)


def test_chunked_cross_entropy_never_makes_the_whole_logits():
  cfg = tiny_config(vocab_size=4096)
  cfg.data.seq_len = 64
  cfg.objective.ce_chunk = 16
  params = jax.eval_shape(lambda: params_lib.init(model.param_decls(cfg.model),
                                                  jax.random.key(0)))
  batch = jax.tree.map(jnp.asarray, random_batch(cfg))
  grad = jax.grad(lambda p, b: objectives.next_token(p, b, ModelSpec.from_config(cfg), cfg.objective)[0])
  hlo = jax.jit(grad).lower(params, batch).as_text()
  B, T, V = cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size
  assert f"{B}x{cfg.objective.ce_chunk}x{V}xf32" in hlo
  assert f"{B}x{T}x{V}xf32" not in hlo


def test_chunked_cross_entropy_on_a_sharded_mesh():
  """Chunks of a batch-, fsdp- and vocab-sharded computation: the same loss and gradients."""
  cfg = tiny_config()
  batch = random_batch(cfg, docs_per_row=2)
  loss0, _, g0 = _loss_stats_grads(cfg, batch)
  cfg.objective.ce_chunk = 8
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(cfg.mesh)
  s = state_lib.setup(cfg, mesh)
  params = params_lib.init(s.decls, jax.random.key(0))
  grad_fn = jax.jit(jax.value_and_grad(lambda p, b: objectives.next_token(p, b, ModelSpec.from_config(cfg), cfg.objective)[0]),
                    in_shardings=(s.state_shardings["params"], s.batch_sharding))
  with jax.set_mesh(mesh):
    loss1, g1 = jax.device_get(grad_fn(params, distributed.global_batch(batch, s.batch_sharding)))
  np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max()), g1, g0)


def _flops_config():
  # Wide enough that matmuls dominate, unscanned so XLA counts every layer.
  cfg = tiny_config(d_model=256, n_heads=4, n_kv_heads=2, d_ff=768, vocab_size=512,
                    scan_layers=False)
  cfg.data.seq_len = 128
  cfg.train.batch_size = 8
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  return cfg


@pytest.fixture(scope="module")
def one_device_record():
  cfg = _flops_config()
  return cfg, bench.measure(cfg, steps=3, warmup=1, devices=jax.devices()[:1], peak=FIXED_PEAK)


def test_bench_flops_match_xla_cost_analysis(one_device_record):
  """The headline counts causal attention; XLA computes, and counts, the full square."""
  cfg, r = one_device_record
  T = cfg.data.seq_len
  assert r["flops_per_token"] == cost.flops_per_token(cfg.model, T, attention="causal")
  assert r["flops_per_token_full_square"] == cost.flops_per_token(cfg.model, T)
  assert r["xla_flops_per_token"] == pytest.approx(r["flops_per_token_full_square"], rel=0.05)
  xla = r["xla_flops_per_token"]
  assert abs(xla - r["flops_per_token_full_square"]) < abs(xla - r["flops_per_token"])


@pytest.mark.parametrize("attention", ["gqa", "mla"])
@pytest.mark.parametrize("mtp_depth", [0, 2])
def test_causal_flops_are_the_square_less_the_masked_half(attention, mtp_depth):
  """Per attention layer and token, the square counts T keys and causal (T + 1) / 2:
  (T - 1) / 2 fewer, each one multiply-add for q.k and one for p.v per head."""
  fields = dict(n_layers=3, d_model=96, n_heads=6, n_kv_heads=2, head_dim=24,
                mtp_depth=mtp_depth)
  if attention == "mla":
    fields.update(attention="mla", q_lora_rank=0, kv_lora_rank=32, qk_nope_head_dim=16,
                  qk_rope_head_dim=8, v_head_dim=12)
  m = tiny_config(**fields).model
  per_key = 6 * ((16 + 8) + 12) if attention == "mla" else 6 * (24 + 24)
  layers = 3 + mtp_depth
  for T in (1, 2, 7, 256):
    square = cost.flops_per_token(m, T, training=False)
    causal = cost.flops_per_token(m, T, training=False, attention="causal")
    assert square - causal == 2 * layers * (T - 1) / 2 * per_key
    assert (cost.flops_per_token(m, T) - cost.flops_per_token(m, T, attention="causal")
            == 3 * 2 * layers * (T - 1) / 2 * per_key)
  with pytest.raises(ValueError):
    cost.flops_per_token(m, 8, attention="triangle")


def test_synthetic_batch_is_packed():
  cfg = tiny_config()
  cfg.train.batch_size, cfg.data.seq_len = 16, 256
  b = bench.synthetic_batch(cfg, seed=3)
  tokens, seg, pos = b["tokens"], b["segment_ids"], b["positions"]
  assert tokens.shape == seg.shape == pos.shape == (16, 256)
  assert tokens.min() >= 1 and tokens.max() < cfg.model.vocab_size
  for row_seg, row_pos in zip(seg, pos):
    assert row_seg[0] == 1 and row_pos[0] == 0
    for t in range(1, 256):
      step = row_seg[t] - row_seg[t - 1]
      assert step in (0, 1)
      assert row_pos[t] == (0 if step else row_pos[t - 1] + 1)
  docs = seg[:, -1]  # documents per row
  assert 2 < docs.mean() < 8 and docs.max() > 1
  again = bench.synthetic_batch(cfg, seed=3)
  assert all((again[k] == b[k]).all() for k in b)
  other = bench.synthetic_batch(cfg, seed=4)
  assert not (other["segment_ids"] == seg).all()


def test_bench_record_is_consistent(one_device_record):
  cfg, r = one_device_record
  assert r["params"] == cost.param_counts(cfg.model)["total"]
  assert r["tokens_per_step"] == cfg.train.batch_size * cfg.data.seq_len
  assert len(r["step_times_s"]) == r["steps"] == 3
  assert r["step_time_s"] == statistics.median(r["step_times_s"])
  assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_time_s"])
  assert r["model_flops_per_s"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"])
  assert r["mfu"] == pytest.approx(r["model_flops_per_s"] / FIXED_PEAK[0])
  assert r["mfu_full_square"] == pytest.approx(
      r["tokens_per_s"] * r["flops_per_token_full_square"] / FIXED_PEAK[0])
  assert r["mfu"] < r["mfu_full_square"]
  assert "causal" in r["mfu_convention"]
  assert (r["peak_flops"], r["peak_source"]) == FIXED_PEAK
  assert math.isfinite(r["loss"]) and r["loss"] > 0
  json.dumps(r)  # plain data


def test_bench_memory_matches_the_state_tree(one_device_record):
  cfg, r = one_device_record
  # float32 parameters, AdamW's two moments, and a few scalars (step, Adam's count).
  assert 12 * r["params"] <= r["state_bytes_total"] <= 12 * r["params"] + 64
  assert r["state_bytes_per_device"] == r["state_bytes_total"]  # one device holds it all
  mem = r["memory_per_device"]
  assert mem["argument_bytes"] == pytest.approx(
      r["state_bytes_per_device"] + r["batch_bytes_per_device"], rel=1e-3)
  # The state is donated: its buffers are reused for the new state.
  assert mem["alias_bytes"] == pytest.approx(r["state_bytes_per_device"], rel=1e-3)
  assert mem["peak_bytes"] >= mem["argument_bytes"]


def test_fsdp_divides_state_memory_per_device(one_device_record):
  cfg, r1 = one_device_record
  cfg = cfg.copy_and_resolve_references()
  cfg.model.scan_layers = True
  cfg.train.batch_size = 8
  cfg.mesh.update(data=1, fsdp=8, tensor=1)
  r8 = bench.measure(cfg, steps=1, warmup=0, peak=FIXED_PEAK)
  assert r8["devices"] == 8 and r8["mesh"]["fsdp"] == 8
  assert r8["state_bytes_total"] == r1["state_bytes_total"]
  # Every parameter has an 'embed' dimension, sharded over fsdp: only scalars are replicated.
  assert r8["state_bytes_per_device"] == pytest.approx(r1["state_bytes_per_device"] / 8, rel=1e-4)
  mem = r8["memory_per_device"]
  assert mem["argument_bytes"] == pytest.approx(
      r8["state_bytes_per_device"] + r8["batch_bytes_per_device"], rel=1e-3)


def test_bench_command_prints_a_table_and_writes_json(tmp_path):
  out = tmp_path / "bench.json"
  env = dict(os.environ, PYTHONPATH=REPO)
  r = subprocess.run(
      [sys.executable, "-m", "fmjax.bench", "--config=experiments/pretrain_tiny.py",
       "--steps=2", "--warmup=0", f"--json={out}", "--config.train.batch_size=8",
       "--config.data.seq_len=64", "--config.model.d_model=64", "--config.model.d_ff=128"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  record = json.loads(r.stdout.strip().splitlines()[-1])
  assert json.loads(out.read_text()) == record
  for field in ("compile_s", "lower_s", "step_time_s", "tokens_per_s", "flops_per_token",
                "flops_per_token_full_square", "mfu", "mfu_full_square", "mfu_convention",
                "peak_flops", "memory_per_device", "params", "state_bytes_per_device"):
    assert field in record, field
  assert record["devices"] == 8
  assert record["mesh"] == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
  assert record["peak_source"].startswith("measured float32 matmul")
  assert record["tokens_per_step"] == 8 * 64
  for label in ("step time", "tokens/s", "MFU", "memory/device"):
    assert label in r.stderr
  mfu_line = next(line for line in r.stderr.splitlines() if line.startswith("MFU"))
  assert f"{record['mfu']:.1%} (causal half; {record['mfu_full_square']:.1%}" in mfu_line


def test_compile_only_sizes_a_model_without_running_it():
  cfg = tiny_config()
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  r = bench.measure(cfg, steps=0, devices=jax.devices()[:1])
  assert r["step_time_s"] is None and r["mfu"] is None and r["loss"] is None
  assert r["memory_per_device"]["argument_bytes"] == pytest.approx(
      r["state_bytes_per_device"] + r["batch_bytes_per_device"], rel=1e-3)
  assert "MFU" not in bench.table(r)


def test_bench_command_rejects_a_bad_config(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO)
  r = subprocess.run(
      [sys.executable, "-m", "fmjax.bench", "--config=experiments/pretrain_tiny.py",
       "--config.objective.ce_chunk=100"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].startswith(
      "fmjax: config error: objective.ce_chunk=100 must divide data.seq_len=256")


def test_xla_flags_per_platform(monkeypatch):
  monkeypatch.setattr(xla_flags, "platform", lambda: "cpu")
  cpu_env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert xla_flags.apply(cpu_env) == "cpu"
  assert cpu_env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8",
                                          "--xla_cpu_experimental_ynn_fusion_type="]
  chosen = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
  xla_flags.apply(chosen)
  assert chosen["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"
  # GPUs: XLA's defaults measured faster than every flag fmjax has tried; none is set.
  monkeypatch.setattr(xla_flags, "platform", lambda: "gpu")
  gpu_env, user_env = {}, {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true"}
  assert xla_flags.apply(gpu_env) == "gpu" and gpu_env == {}
  xla_flags.apply(user_env)
  assert user_env == {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true"}
  assert xla_flags.GPU_CANDIDATES == ("--xla_gpu_enable_latency_hiding_scheduler=true",
                                      "--xla_gpu_enable_triton_gemm=false",
                                      "--xla_gpu_enable_highest_priority_async_stream=true")
  # A flag that measures faster goes back in the same way; the user's choice still stands.
  monkeypatch.setitem(xla_flags._SETTINGS, "gpu", ("XLA_FLAGS", xla_flags.GPU_CANDIDATES[:2]))
  xla_flags.apply(user_env)
  assert user_env["XLA_FLAGS"].split() == ["--xla_gpu_enable_triton_gemm=true",
                                           "--xla_gpu_enable_latency_hiding_scheduler=true"]
  assert "LIBTPU_INIT_ARGS" not in user_env
  monkeypatch.setattr(xla_flags, "platform", lambda: "tpu")
  tpu_env = {}
  xla_flags.apply(tpu_env)
  assert "--xla_tpu_enable_async_collective_fusion=true" in tpu_env["LIBTPU_INIT_ARGS"]
  off = {"FMJAX_XLA_FLAGS": "0"}
  xla_flags.apply(off)
  assert off == {"FMJAX_XLA_FLAGS": "0"}


def test_platform_follows_jax_platforms(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert xla_flags.platform() == "cpu"
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert xla_flags.platform() == "gpu"


@pytest.mark.parametrize("kind,peak", [("TPU v4", 275e12), ("TPU v5 lite", 197e12),
                                       ("TPU v5", 459e12), ("TPU v5p", 459e12),
                                       ("TPU v6 lite", 918e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                       ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
                                       ("cpu", None)])
def test_datasheet_peaks(kind, peak):
  sheet = cost.datasheet_peak(kind)
  assert (sheet and sheet[0]) == peak

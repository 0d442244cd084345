"""End to end: the training loop, exact resume, restore into another mesh, the CLI."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import tiny_config
from fmjax.train import checkpoint, loop, metrics, state as state_lib
from fmjax.nn import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_config(data_dir, steps, decay_steps):
  c = tiny_config(vocab_size=512)
  c.data.update(data_dir=data_dir, eval_batches=2)
  c.optimizer.update(decay_steps=decay_steps, warmup_steps=2, lr=3e-3)
  c.train.update(steps=steps, log_every=1, eval_every=0, sample_tokens=0, progress=False)
  c.checkpoint.update(every=0, keep=2)
  return c


def final_state(cfg, workdir, mesh_cfg=None):
  cfg = cfg.copy_and_resolve_references()
  if mesh_cfg:
    cfg.mesh.update(mesh_cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  s = state_lib.setup(cfg, mesh)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=2)
  state = ckpt.restore(ckpt.latest_step(), s.abstract_state)
  ckpt.close()
  return state


def losses(workdir):
  return [(r["step"], r["loss"], r["grad_norm"], r["lr"])
          for r in metrics.read(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]


@pytest.fixture(scope="module")
def straight_and_resumed(data_dir, tmp_path_factory):
  n = 4
  straight = str(tmp_path_factory.mktemp("straight"))
  resumed = str(tmp_path_factory.mktemp("resumed"))
  summary = loop.run(run_config(data_dir, 2 * n, 2 * n), straight)
  loop.run(run_config(data_dir, n, 2 * n), resumed)
  assert [s for s, *_ in losses(resumed)] == list(range(1, n + 1))
  loop.run(run_config(data_dir, 2 * n, 2 * n), resumed)
  return straight, resumed, summary


def test_resume_is_bit_identical(straight_and_resumed, data_dir):
  straight, resumed, _ = straight_and_resumed
  cfg = run_config(data_dir, 8, 8)
  a, b = final_state(cfg, straight), final_state(cfg, resumed)
  assert int(a["step"]) == int(b["step"]) == 8
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert losses(straight) == losses(resumed)
  assert len(losses(straight)) == 8


def test_training_reduces_loss_and_writes_records(straight_and_resumed):
  straight, _, summary = straight_and_resumed
  records = losses(straight)
  assert records[-1][1] < records[0][1]
  assert summary["final_eval_loss"] < np.log(512)
  for name in ("config.json", "summary.json", "loss_curve.png", "metrics.jsonl"):
    assert os.path.getsize(os.path.join(straight, name)) > 0
  assert os.listdir(os.path.join(straight, "tensorboard"))
  with open(os.path.join(straight, "summary.json")) as f:
    assert json.load(f)["params"] == summary["params"]


def test_restore_into_a_different_mesh(straight_and_resumed, data_dir):
  straight, _, _ = straight_and_resumed
  cfg = run_config(data_dir, 8, 8)
  a = final_state(cfg, straight)
  b = final_state(cfg, straight, dict(data=1, fsdp=4, tensor=2))
  assert b["params"]["layers"]["wq"].sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", "tensor", None)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_default_experiment_runs_from_the_command_line(data_dir, tmp_path):
  workdir = tmp_path / "default"
  env = dict(os.environ, PYTHONPATH=REPO)
  # A relative workdir, and a checkpoint in the middle of the run as well as at its end.
  cmd = [sys.executable, "-m", "fmjax.main", f"--config={REPO}/experiments/pretrain_tiny.py",
         "--workdir=default", "--config.train.steps=3", f"--config.data.data_dir={data_dir}",
         "--config.data.eval_batches=1", "--config.train.sample_tokens=8",
         "--config.checkpoint.every=2"]
  r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "final held-out loss" in r.stdout
  assert "sample: " in r.stdout
  for name in ("config.json", "summary.json", "loss_curve.png", "metrics.jsonl"):
    assert (workdir / name).exists()
  # Running it again resumes at the end: nothing is retrained.
  before = losses(str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "3"]
  r2 = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert r2.returncode == 0, r2.stderr[-3000:]
  assert losses(str(workdir)) == before
  with open(workdir / "summary.json") as f:
    assert json.load(f)["steps"] == 3
  # fmjax.sample reads the checkpoint; greedy decoding is deterministic.
  sample_cmd = [sys.executable, "-m", "fmjax.sample", "--workdir=default", "--temperature=0",
                "--max_new_tokens=12", "--prompt=And God said"]
  outs = [subprocess.run(sample_cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300) for _ in range(2)]
  assert outs[0].returncode == 0, outs[0].stderr[-3000:]
  assert outs[0].stdout.startswith("And God said")
  assert outs[0].stdout == outs[1].stdout
  # A different learning rate on the same workdir is refused.
  r3 = subprocess.run(cmd + ["--config.optimizer.lr=0.1"], cwd=tmp_path, env=env,
                      capture_output=True, text=True, timeout=600)
  assert r3.returncode == 2
  assert "optimizer.lr: 0.003 -> 0.1" in r3.stderr

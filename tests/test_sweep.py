"""The size dial, training horizons, sweep expansion, and a sweep that resumes."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fmjax.validate import validate
from fmjax import config as config_lib
from fmjax.nn import cost
from fmjax import eval as eval_command, sweep as sweep_command
from fmjax.scaling import sizing, sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from fmjax.train.records import write_json

from conftest import tiny_config


def test_size_dial_sets_the_model_by_the_documented_rule():
  c = tiny_config()
  c.model.update(depth=3, aspect_ratio=96, head_dim=32)
  m = sizing.resolve(c).model
  assert (m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.head_dim) == (3, 288, 9, 9, 32)
  assert m.d_ff == 768  # 8/3 * 288 = 768, already a multiple of 32
  c.model.update(depth=2, aspect_ratio=64, head_dim=0)
  m = sizing.resolve(c).model
  assert (m.d_model, m.head_dim, m.n_heads, m.d_ff) == (128, 64, 2, 384)  # 341.3 -> 384
  validate(sizing.resolve(c), 8)


def test_horizons_become_exact_steps():
  c = tiny_config()
  per_step = c.train.batch_size * c.data.seq_len
  c.train.tokens = 100 * per_step + 3
  assert sizing.resolve(c).train.steps == 100
  c.train.tokens = 0
  c.train.tokens_per_param = 2.0
  n = cost.param_counts(c.model)["total"]
  assert sizing.resolve(c).train.steps == round(2.0 * n / per_step)
  c.train.tokens_per_param = 0.0
  fpt = cost.flops_per_token(c.model, c.data.seq_len)
  c.train.flops = 37 * per_step * fpt
  assert sizing.resolve(c).train.steps == 37


@pytest.mark.parametrize("field,value,message", [
    ("train.flops", 1.0, "less than one step"),
    ("model.depth", -1, "model.depth=-1"),
    ("model.aspect_ratio", 48, "model.aspect_ratio=48"),
])
def test_bad_dial_and_horizon_values_are_named(field, value, message):
  c = tiny_config()
  c.model.update(depth=2, aspect_ratio=64, head_dim=32)
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    sizing.resolve(c)


def test_two_horizons_are_refused():
  c = tiny_config()
  c.train.update(tokens=1000, flops=1e9)
  with pytest.raises(config_lib.ConfigError, match="train.tokens and train.flops"):
    sizing.resolve(c)


def test_shipped_mini_sweep_expands_to_an_isoflop_design():
  members = sweep.expand("experiments/scaling_tiny.py")
  assert len(members) == 16
  budgets = sorted({m.overrides["train.flops"] for m in members})
  assert len(budgets) == 4
  for m in members:
    c = m.cfg
    assert c.model.n_layers == m.overrides["model.depth"]
    spent = c.train.steps * sizing.tokens_per_step(c) * cost.flops_per_token(c.model, c.data.seq_len)
    half_step = 0.5 * sizing.tokens_per_step(c) * cost.flops_per_token(c.model, c.data.seq_len)
    assert abs(spent - m.overrides["train.flops"]) <= half_step
  # Within a budget, bigger models train for fewer tokens.
  same = sorted((m for m in members if m.overrides["train.flops"] == budgets[0]),
                key=lambda m: m.cfg.model.depth)
  steps = [m.cfg.train.steps for m in same]
  assert steps == sorted(steps, reverse=True)
  assert len({m.name for m in members}) == 16


def test_grid_is_the_cartesian_product():
  members = sweep.grid(model__depth=[1, 2], optimizer__lr=[1e-3, 3e-3, 1e-2])
  assert len(members) == 6
  assert {"model.depth": 2, "optimizer.lr": 1e-2} in members


def test_sweep_runs_members_records_them_and_skips_finished_ones(tmp_path, data_dir, monkeypatch,
                                                                 capsys):
  suite = tmp_path / "suite.yaml"  # run in training: mid-run and at the end
  suite.write_text("- {kind: multiple_choice, data: kjv_cloze, settings: {examples: 6}}\n"
                   "- {kind: perplexity, data: kjv, settings: {split: validation, documents: 2}}\n")
  experiment = tmp_path / "tiny_sweep.py"
  experiment.write_text(textwrap.dedent(f"""
      from fmjax import config
      from fmjax.scaling import sweep as sweep_lib

      def get_config(arg=None):
        c = config.base()
        c.model.update(vocab_size=512, depth=1, aspect_ratio=32, head_dim=16)
        c.data.update(data_dir={data_dir!r}, seq_len=32, eval_batches=1)
        c.optimizer.update(warmup_steps=0)
        c.train.update(batch_size=8, tokens=3 * 8 * 32, progress=False, sample_tokens=0,
                       eval_every=0, eval_suite={str(suite)!r}, eval_suite_every=2)
        c.checkpoint.update(every=0)
        return c

      def sweep():
        return sweep_lib.grid(model__depth=[1, 2])
      """))
  workdir = str(tmp_path / "sweep")
  assert sweep_command.main([f"--config={experiment}", f"--workdir={workdir}", "--print_commands"]) == 0
  commands = capsys.readouterr().out.strip().splitlines()
  assert len(commands) == 2 and "--config.model.depth=2" in commands[1]

  assert sweep.run(str(experiment), workdir, progress=False) == 0
  with open(os.path.join(workdir, "records.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["name"] for r in records] == ["depth1", "depth2"]
  for r, depth in zip(records, (1, 2)):
    assert r["n_layers"] == depth and r["steps"] == 3 and r["tokens"] == 3 * 8 * 32
    assert r["params"] == cost.param_counts(sweep.expand(str(experiment))[depth - 1].cfg.model)["total"]
    assert r["flops"] == r["tokens"] * r["flops_per_token"]
    assert 0 < r["final_eval_loss"] < 10 and r["best_eval_loss"] <= r["final_eval_loss"]
  assert records[1]["params"] > records[0]["params"]

  # Each record carries the suite's results of the member's last step, which equal what
  # fmjax.eval measures on the member's final checkpoint; the suite also ran mid-run.
  tasks = ["kjv_cloze", "kjv_perplexity"]
  for r in records:
    assert list(r["suite"]) == tasks and r["suite"]["kjv_cloze"]["examples"] == 6
    assert 0 <= r["suite"]["kjv_cloze"]["metrics"]["acc"] <= 1
  run_dir = os.path.join(workdir, "depth1")
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  assert [r["step"] for r in logged if "suite/kjv_perplexity/bits_per_byte" in r] == [2, 3]
  assert eval_command.main(["--workdir", run_dir, "--suite", str(suite), "--out",
                            str(tmp_path / "again")]) == 0
  with open(tmp_path / "again" / "results.jsonl") as f:
    again = {r["task"]: r for r in map(json.loads, f)}
  for task in tasks:
    assert again[task]["step"] == 3
    for name, value in again[task]["metrics"].items():
      assert records[0]["suite"][task]["metrics"][name] == pytest.approx(value, rel=1e-5,
                                                                           abs=1e-6), name
  assert os.path.exists(os.path.join(run_dir, "eval", "step_2", "results.jsonl"))

  def no_training(*args, **kwargs):
    raise AssertionError(f"re-running a finished sweep trained again: {args}")

  monkeypatch.setattr(subprocess, "run", no_training)
  capsys.readouterr()
  assert sweep.run(str(experiment), workdir, progress=False) == 0
  assert "2 already finished, 0 to run" in capsys.readouterr().out
  assert sweep_command.main([f"--config={experiment}", f"--workdir={workdir}", "--print_commands"]) == 0
  assert capsys.readouterr().out == ""

  # A member trained before the schema gained a field (absent from its saved
  # config, default now) is still finished; one whose config differs is not.
  member = sweep.expand(str(experiment))[0]
  run_dir = os.path.join(workdir, member.name)
  with open(os.path.join(run_dir, "config.json")) as f:
    saved = json.load(f)
  with open(os.path.join(run_dir, "summary.json")) as f:
    summary = json.load(f)
  summary["config_hash"] = "made-by-an-older-fmjax"
  del saved["optimizer"]["lr"]  # a field the older schema lacked; the member keeps its default
  assert member.cfg.optimizer.lr == config_lib.base().optimizer.lr
  write_json(os.path.join(run_dir, "summary.json"), summary)
  write_json(os.path.join(run_dir, "config.json"), saved)
  assert sweep.is_finished(member, workdir)
  saved["model"]["d_model"] += 1
  write_json(os.path.join(run_dir, "config.json"), saved)
  assert not sweep.is_finished(member, workdir)


def test_a_file_without_sweep_gets_a_clear_error(capsys):
  assert sweep_command.main(["--config=experiments/pretrain_tiny.py", "--workdir=/tmp/unused"]) == 2
  assert "declares no sweep()" in capsys.readouterr().err


def test_a_variant_is_swept_from_its_own_config_and_passed_on():
  """--config=FILE:ARG: every member starts from get_config(ARG), and its command says so."""
  plain, dense = (sweep.expand("experiments/moe_vs_dense.py" + arg) for arg in ("", ":dense"))
  assert plain[0].cfg.model.moe.n_routed_experts > 0
  assert [m.cfg.model.moe.n_routed_experts for m in dense] == [0, 0]
  argv = sweep.command("experiments/moe_vs_dense.py:dense", dense[0], "/tmp/unused")
  assert "--config=experiments/moe_vs_dense.py:dense" in argv


def test_a_members_command_gives_fmjax_main_the_members_config():
  """Overrides of every type (string ones too, sweep-wide or the member's own) reach
  fmjax.main as the member has them: its --print_config shows the member's values."""
  path = os.path.join(REPO, "experiments", "scaling_tiny.py")
  common = {"model.parametrization": "mup", "model.mup_base_width": 32,
            "optimizer.clip_norm": 0.0, "data.mixture": "kjv:0.5, synthetic:0.5",
            "train.progress": False}
  member = sweep.expand(path, common)[5]
  argv = sweep.command(path, member, "/tmp/unused", python=sys.executable)
  assert "--config.model.parametrization=mup" in argv
  r = subprocess.run(argv[:-1] + ["--print_config"], cwd=REPO, capture_output=True, text=True,
                     timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
  assert r.returncode == 0, r.stderr
  shown = r.stdout.splitlines()
  for key, value in member.overrides.items():  # printed as YAML: booleans in lower case
    text = str(value).lower() if isinstance(value, bool) else str(value)
    assert f"  {key.split('.')[-1]}: {text}" in shown, key

"""Several processes as one run (fmjax.launch_local), stopping cleanly (SIGTERM, max_runtime),
and the TPU VM commands.

The runs are real command lines, with this file as their experiment: a tiny
decoder on the synthetic source, 8 steps, 8 CPU devices in one process or 4 in
each of two. They share a persistent compilation cache, so only the first run
of each layout compiles.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fmjax.validate import validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8


def get_config(arg=None):
  """The runs' experiment; data.shards=2 gives the same batches on one process or two."""
  del arg
  from fmjax import config

  c = config.base()
  c.model.update(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
  c.data.update(mixture="synthetic", seq_len=32, eval_batches=1, shards=2)
  c.optimizer.update(lr=3e-3, warmup_steps=2)
  c.mesh.update(data=-1, fsdp=1, tensor=1, cpu_devices=8)
  c.train.update(steps=STEPS, batch_size=8, log_every=1, eval_every=0, sample_tokens=0,
                 progress=False)
  c.checkpoint.update(every=4, keep=3)
  return c


class Runs:
  """Starts runs of this experiment in `root`, one process (8 devices) or several (4 each)."""

  def __init__(self, root, data_dir):
    self.root, self.data_dir = str(root), data_dir
    self.env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
                    JAX_COMPILATION_CACHE_DIR=os.path.join(self.root, "jax_cache"),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    self.env.pop("XLA_FLAGS", None)  # the experiment sets its devices itself

  def workdir(self, name):
    return os.path.join(self.root, name)

  def command(self, name, *flags, processes=1):
    args = [f"--config={os.path.abspath(__file__)}", f"--workdir={self.workdir(name)}",
            f"--config.data.data_dir={self.data_dir}", *flags]
    if processes == 1:
      return [sys.executable, "-m", "fmjax.main", *args]
    return [sys.executable, "-m", "fmjax.launch_local", f"--processes={processes}",
            f"--devices-per-process={8 // processes}", "--", *args]

  def start(self, name, *flags, processes=1):
    return subprocess.Popen(self.command(name, *flags, processes=processes), cwd=REPO,
                            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)

  def run(self, name, *flags, processes=1):
    started = time.perf_counter()
    for attempt in range(2):
      r = subprocess.run(self.command(name, *flags, processes=processes), cwd=REPO,
                         env=self.env, capture_output=True, text=True, timeout=900)
      if not _gloo_timeout(r.returncode, r.stderr):
        break
    r.seconds = time.perf_counter() - started
    return r

  def start_until_step(self, name, step, processes):
    """A started run that has logged `step` (started again once after a gloo connect timeout)."""
    for attempt in range(2):
      proc = self.start(name, processes=processes)
      try:
        self.wait_for_step(name, proc, step)
        return proc
      except AssertionError as e:
        if attempt or "Gloo context initialization failed" not in str(e):
          raise

  def records(self, name):
    path = os.path.join(self.workdir(name), "metrics.jsonl")
    if not os.path.exists(path):
      return []
    with open(path) as f:
      return [json.loads(line) for line in f if line.strip()]

  def wait_for_step(self, name, proc, step, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
      if any(r.get("step", 0) >= step and "loss" in r for r in self.records(name)):
        return
      time.sleep(0.05)
    out, err = proc.communicate()
    raise AssertionError(f"no step {step} logged; exit {proc.returncode}\n{out[-2000:]}\n"
                         f"{err[-3000:]}")

  def checkpoints(self, name):
    return sorted(int(s) for s in os.listdir(os.path.join(self.workdir(name), "checkpoints"))
                  if s.isdigit())

  def params(self, name, step=STEPS):
    import jax
    from fmjax.train import checkpoint, state as state_lib
    from fmjax.nn import sharding
    cfg = get_config()
    s = state_lib.setup(cfg, sharding.make_mesh(cfg.mesh))
    with checkpoint.Checkpointer(os.path.join(self.workdir(name), "checkpoints"), keep=99) as c:
      return jax.device_get(c.restore(step, s.abstract_state)["params"])


def _gloo_timeout(returncode, stderr):
  """gloo's TCP connect timeout (fixed in jaxlib) can expire when the CPU is heavily oversubscribed:
  a fault of the machine, not of the run, which resumes from its checkpoint when started again."""
  return returncode != 0 and "Gloo context initialization failed" in stderr


def _ok(r):
  assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
  return r


def _losses(records):
  return [(r["step"], r["loss"]) for r in records if "loss" in r]


def _assert_trees(a, b, equal=True):
  import jax
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    if equal:
      np.testing.assert_array_equal(x, y)
    else:
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir, tok):
  del tok  # built once: the runs load the tokenizer from data_dir
  return Runs(tmp_path_factory.mktemp("multihost"), data_dir)


@pytest.fixture(scope="module")
def one(runs):
  """One process, 8 devices, straight through."""
  r = _ok(runs.run("one"))
  print(f"one process x 8 devices: {r.seconds:.1f} s")
  return "one"


@pytest.fixture(scope="module")
def two(runs):
  """Two processes of 4 devices, straight through."""
  r = _ok(runs.run("two", processes=2))
  print(f"two processes x 4 devices: {r.seconds:.1f} s")
  return "two"


def test_two_processes_of_four_devices_match_one_of_eight(runs, one, two):
  a, b = runs.records(one), runs.records(two)
  assert [s for s, _ in _losses(a)] == [s for s, _ in _losses(b)] == list(range(1, STEPS + 1))
  # Cross-process sums (gloo) add in another order than in-process ones: float32 rounding apart.
  np.testing.assert_allclose([l for _, l in _losses(b)], [l for _, l in _losses(a)], rtol=1e-6)
  _assert_trees(runs.params(two), runs.params(one), equal=False)
  # Only process 0 writes records; every process saves its data position.
  assert len(b) == len(a)
  data = os.path.join(runs.workdir(two), "checkpoints", str(STEPS), "data")
  assert sorted(os.listdir(data))[-2:] == ["process_0-of-2.json", "process_1-of-2.json"]


def test_sigterm_stops_both_processes_at_one_step_and_the_run_resumes_exactly(runs, two):
  proc = runs.start_until_step("sigterm", 1, processes=2)
  os.kill(proc.pid, signal.SIGTERM)  # the launcher passes it on to both processes
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-4000:]
  stopped = re.search(r"\[0\] stopped at step (\d+) of 8 \(SIGTERM\)", out)
  assert stopped, out[-2000:]
  step = int(stopped.group(1))
  assert step < STEPS and runs.checkpoints("sigterm")[-1] == step
  assert not os.path.exists(os.path.join(runs.workdir("sigterm"), "summary.json"))

  r = _ok(runs.run("sigterm", processes=2))
  assert f"resuming from checkpoint {step}" in r.stdout
  assert _losses(runs.records("sigterm")) == _losses(runs.records(two))
  _assert_trees(runs.params("sigterm"), runs.params(two))


def test_killing_one_process_fails_the_launch_promptly(runs, two):
  del two  # compiled
  proc = runs.start_until_step("sigkill", 1, processes=2)
  children = _children(proc.pid)
  victim = next(pid for pid in children if _env_of(pid).get("FMJAX_PROCESS_ID") == "1")
  killed = time.perf_counter()
  os.kill(victim, signal.SIGKILL)
  out, err = proc.communicate(timeout=60)
  took = time.perf_counter() - killed
  print(f"launcher exited {took:.2f} s after the SIGKILL")
  assert proc.returncode == 128 + signal.SIGKILL
  assert "process 1 exited with signal 9; killing the others" in err
  assert took < 10
  assert not any(os.path.exists(f"/proc/{pid}") and _state(pid) != "Z" for pid in children)


def test_max_runtime_stops_with_a_checkpoint_and_the_run_resumes_exactly(runs, one):
  # A budget of 1 s is spent before the first step ends: it stops after step 1.
  r = _ok(runs.run("budget", "--max_runtime=1s"))
  assert "stopped at step 1 of 8 (max_runtime)" in r.stdout
  assert runs.checkpoints("budget") == [1]
  r = _ok(runs.run("budget"))
  assert "resuming from checkpoint 1" in r.stdout
  assert _losses(runs.records("budget")) == _losses(runs.records(one))
  _assert_trees(runs.params("budget"), runs.params(one))


def _children(pid):
  with open(f"/proc/{pid}/task/{pid}/children") as f:
    return [int(p) for p in f.read().split()]


def _env_of(pid):
  with open(f"/proc/{pid}/environ", "rb") as f:
    pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
  return {k.decode(): v.decode(errors="replace") for k, v in pairs}


def _state(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0]
  except OSError:
    return "gone"


# -- without processes -------------------------------------------------------------


def test_durations():
  from fmjax.train.preemption import parse_duration
  assert [parse_duration(t) for t in ("", "90", "90s", "2m", "1h30m", "1.5h", "1d")] == \
      [0, 90, 90, 120, 5400, 5400, 86400]
  for bad in ("1h30", "ten", "-5", "5 m"):
    with pytest.raises(ValueError, match="not a duration"):
      parse_duration(bad)


def test_config_checks_max_runtime_and_data_shards():
  from fmjax import config
  c = get_config()
  c.train.max_runtime = "2 hours"
  with pytest.raises(config.ConfigError, match="train.max_runtime"):
    validate(c, 8)
  c = get_config()
  c.data.shards = 3
  with pytest.raises(config.ConfigError, match="data.shards=3 must divide train.batch_size=8"):
    validate(c, 8)


def test_incomplete_multi_process_settings_are_a_config_error(monkeypatch):
  from fmjax import config
  from fmjax.runtime import distributed
  with pytest.raises(config.ConfigError, match="needs all of --coordinator_address"):
    distributed.initialize("cpu", {"FMJAX_COORDINATOR_ADDRESS": "localhost:1234"})
  with pytest.raises(config.ConfigError, match=r"--process_id=2 must be in \[0, "):
    distributed.initialize("cpu", {"FMJAX_COORDINATOR_ADDRESS": "h:1", "FMJAX_NUM_PROCESSES":
                                   "2", "FMJAX_PROCESS_ID": "2"})


def test_one_process_holds_every_row():
  from fmjax.runtime import distributed
  from fmjax.nn import sharding
  cfg = get_config()
  mesh = sharding.make_mesh(cfg.mesh)
  assert distributed.host_rows(sharding.batch_sharding(mesh, cfg.sharding.activations), 8) == \
      (0, 8)


def test_data_shards_give_the_same_batches_to_one_process_or_several(data_dir, tok):
  from conftest import assert_batches_equal, data_cfg, take
  from fmjax.data import pipeline
  d = data_cfg(data_dir, mixture="synthetic")
  both = iter(pipeline.host_train_dataset(d, tok, batch_size=8, rows=(0, 8), shards=2))
  halves = [iter(pipeline.host_train_dataset(d, tok, batch_size=8, rows=rows, shards=2))
            for rows in ((0, 4), (4, 8))]
  expected = [{k: np.concatenate([a[k], b[k]]) for k in a}
              for a, b in zip(take(halves[0], 3), take(halves[1], 3))]
  assert_batches_equal(take(both, 3), expected)
  state = json.loads(json.dumps(both.get_state()))  # as checkpointed
  after = take(both, 2)
  both.set_state(state)
  assert_batches_equal(take(both, 2), after)
  with pytest.raises(ValueError, match="not a whole number of data shards"):
    pipeline.host_shards(8, (0, 2), 2)


def test_checkpoint_paths_keep_urls_as_they_are():
  from fmjax.train import checkpoint
  from fmjax import config
  assert checkpoint.absolute("gs://bucket/run/checkpoints") == "gs://bucket/run/checkpoints"
  assert checkpoint.absolute("runs/x") == os.path.join(os.getcwd(), "runs/x")
  assert checkpoint.run_directory("runs/x") == "runs/x/checkpoints"
  assert checkpoint.run_directory("runs/x/", "gs://b/fmjax/") == "gs://b/fmjax/runs/x/checkpoints"
  assert checkpoint.run_directory("/abs/x", "gs://b") == "gs://b/abs/x/checkpoints"
  with pytest.raises(config.ConfigError, match="leaves the current directory"):
    checkpoint.run_directory("../x", "gs://b")


def test_saved_configs_without_a_new_field_still_resume():
  from fmjax import config
  from fmjax.train import workdir
  old = config.base().to_dict()
  del old["data"]["shards"]
  assert workdir.config_changes(old, config.base().to_dict()) == []
  new = config.base()
  new.data.shards = 2
  assert workdir.config_changes(old, new.to_dict()) == ["data.shards: None -> 2"]


# -- the TPU VM commands --------------------------------------------------------------


def _tpu(*args):
  r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "tpu.py"), "--dry_run",
                      "--zone=us-east5-a", "--repo=https://github.com/example/fmjax.git",
                      "--branch=main", *args], capture_output=True, text=True, cwd=REPO)
  assert r.returncode == 0, r.stderr
  return [shlex.split(line) for line in r.stdout.splitlines()]


@pytest.mark.parametrize("accelerator,version", [("v5p-16", "v2-alpha-tpuv5"),
                                                 ("v4-8", "tpu-ubuntu2204-base")])
def test_tpu_dry_run_prints_well_formed_commands(accelerator, version):
  common = [f"--name=fm-{accelerator}", f"--type={accelerator}", "--bucket=gs://bkt/fmjax"]
  fmjax_args = ["--", "--config=experiments/pretrain_tiny.py", "--workdir=runs/tpu"]
  create, = _tpu(*common, "create")
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert f"--accelerator-type={accelerator}" in create and f"--version={version}" in create
  queued, = _tpu(*common, "--queued", "--spot", "create")
  assert queued[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert {f"--node-id=fm-{accelerator}", f"--runtime-version={version}", "--spot"} <= set(queued)

  scripts = []
  for step in ("copy", "install", "run", "stop"):
    for line in _tpu(*common, step, *fmjax_args):
      assert line[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], line
      assert f"fm-{accelerator}" in line and "--worker=all" in line
      scripts += [a.split("=", 1)[1] for a in line if a.startswith("--command=")]
  for script in scripts:  # each remote script parses as bash
    check = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert check.returncode == 0, (script, check.stderr)
  run = scripts[2]
  assert "fmjax.main --config=experiments/pretrain_tiny.py --workdir=runs/tpu " \
         "--config.checkpoint.root=gs://bkt/fmjax" in run
  assert "gcloud storage rsync -r gs://bkt/fmjax/records/runs/tpu runs/tpu" in run

  logs, = _tpu(*common, "logs")
  assert "--worker=0" in logs and any(a.startswith("--command=tail") for a in logs)
  fetch = _tpu(*common, "fetch", *fmjax_args)
  assert fetch[-1] == ["gcloud", "storage", "rsync", "-r", "gs://bkt/fmjax/records/runs/tpu",
                       "runs/tpu"]
  delete, = _tpu(*common, "delete")
  assert delete[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "delete"] and "--quiet" in delete
  delete_queued, = _tpu(*common, "--queued", "delete")
  assert delete_queued[3:5] == ["queued-resources", "delete"] and "--force" in delete_queued

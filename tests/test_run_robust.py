"""A run under everyday accidents: Ctrl-C, a bad workdir, a full disk, device memory running
out, a source with no documents, a failed start, a longer resume; what it says at start-up;
the bound a kill is held to with asynchronous saves; the profiler, TensorBoard tags and W&B.

The runs are in-process and tiny (2 layers, 6 steps); they share one straight run to
compare against, and a compilation cache.
"""

import errno
import glob
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
import types

import jax
import pytest

from conftest import tiny_config, tree_hash
from fmjax import config as config_lib, main as main_lib, validate
from fmjax.train import checkpoint, loop, metrics, preemption, step as step_lib
from fmjax.train import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 6, 2


def config(data_dir, **train):
  c = tiny_config(vocab_size=512)
  c.data.update(data_dir=data_dir, eval_batches=1)
  c.optimizer.update(warmup_steps=1, decay_steps=2)  # the schedule does not follow train.steps
  c.train.update(dict(dict(steps=STEPS, log_every=1, eval_every=0, sample_tokens=0,
                           progress=False), **train))
  c.checkpoint.update(every=EVERY, keep=3)
  return c


def losses(workdir):
  return [(r["step"], r["loss"], r["grad_norm"], r["lr"])
          for r in metrics.read(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]


def complete_checkpoints(workdir):
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(path) if n.isdigit()) if os.path.isdir(path) else []


def tmp_dirs(workdir):
  return glob.glob(os.path.join(workdir, "checkpoints", "*orbax-checkpoint-tmp*"))


def hook_step(monkeypatch, call, action):
  """The train step runs `action` before its `call`-th call (from 1)."""
  real = step_lib.make_train_step

  def make(s, frozen=None):
    jitted, calls = real(s, frozen), [0]

    def hooked(state, batch):
      calls[0] += 1
      if calls[0] == call:
        action()
      return jitted(state, batch)

    return hooked

  monkeypatch.setattr(step_lib, "make_train_step", make)


def slow_progress_saves(monkeypatch, seconds, fail_step=None):
  """Each checkpoint's progress file is written `seconds` late, in the background; the one
  of `fail_step` fails as on a full disk, after writing part of itself."""
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch
  real = jch.JsonCheckpointHandler._save_fn

  async def save(self, x, directory):
    time.sleep(seconds)
    if fail_step is not None and f"/{fail_step}.orbax-checkpoint-tmp" in str(directory):
      (directory / "partial").write_text("{")
      raise OSError(errno.ENOSPC, "No space left on device", str(directory / "metadata"))
    await real(self, x, directory)

  monkeypatch.setattr(jch.JsonCheckpointHandler, "_save_fn", save)


def one_line_failure(capfd, status, expected):
  """The stderr of a main_lib.train call that returned `status`: its last line."""
  err = capfd.readouterr().err
  last = err.strip().splitlines()[-1]
  assert status == expected, err[-3000:]
  assert last.startswith("fmjax: ") and "Traceback" not in err, err[-3000:]
  return last


@pytest.fixture(scope="module")
def straight(data_dir, tok, tmp_path_factory):
  """6 steps straight through, with saves slowed down; for each recorded step, the
  checkpoints complete at the moment it was recorded."""
  del tok  # built once: the runs load it from data_dir
  workdir = str(tmp_path_factory.mktemp("straight") / "run")
  seen = []
  real_write = metrics.MetricsWriter.write

  def write(self, step, record):
    if "loss" in record:
      seen.append((step, complete_checkpoints(workdir)))
    real_write(self, step, record)

  with pytest.MonkeyPatch.context() as mp:
    slow_progress_saves(mp, 1.0)
    mp.setattr(metrics.MetricsWriter, "write", write)
    loop.run(config(data_dir), workdir)
  assert [s for s, *_ in losses(workdir)] == list(range(1, STEPS + 1))
  return workdir, seen


@pytest.fixture
def trained_copy(straight, tmp_path):
  path = str(tmp_path / "run")
  shutil.copytree(straight[0], path)
  return path


# -- the bound of asynchronous saves -------------------------------------------------


def test_a_recorded_step_has_the_checkpoint_every_steps_before_it_complete(straight):
  _, seen = straight
  assert [step for step, _ in seen] == list(range(1, STEPS + 1))
  for step, complete in seen:
    due = [s for s in range(EVERY, step - EVERY + 1, EVERY)]
    assert set(due) <= set(complete), (step, complete)
  # The saves were slow enough that one was in flight while later steps were recorded.
  assert any(step % EVERY and step - 1 not in complete for step, complete in seen
             if step > EVERY), seen


# -- Ctrl-C ---------------------------------------------------------------------------


def test_ctrl_c_stops_with_a_checkpoint_and_the_resume_is_exact(data_dir, tmp_path, capfd,
                                                                monkeypatch, straight):
  workdir = str(tmp_path / "run")
  before = signal.getsignal(signal.SIGINT)
  with monkeypatch.context() as mp:
    hook_step(mp, 3, lambda: os.kill(os.getpid(), signal.SIGINT))
    result = loop.run(config(data_dir), workdir)
  assert result == {"stopped": "SIGINT", "step": 3}
  assert signal.getsignal(signal.SIGINT) is before
  out, err = capfd.readouterr()
  assert "press Ctrl-C again to abort at once" in err
  assert "stopped at step 3 of 6 (SIGINT): checkpoint 3 saved" in out
  assert complete_checkpoints(workdir)[-1] == 3 and not tmp_dirs(workdir)
  assert not os.path.exists(os.path.join(workdir, "summary.json"))

  loop.run(config(data_dir), workdir)
  assert "resuming from checkpoint 3" in capfd.readouterr().out
  assert losses(workdir) == losses(straight[0])


SECOND_CTRL_C = """
import os, sys, time
from fmjax.train import preemption
with preemption.Stop() as stop:
  print("ready", flush=True)
  while not stop.poll():  # a run between steps: the first Ctrl-C's handler runs here
    time.sleep(0.01)
  print("asked to stop", stop.poll(), flush=True)
  r, w = os.pipe()
  os.read(r, 1)  # now stuck in a system call, as in a step that hangs: only a signal ends it
"""


def test_a_second_ctrl_c_aborts_at_once():
  proc = subprocess.Popen([sys.executable, "-c", SECOND_CTRL_C], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "ready"
  proc.send_signal(signal.SIGINT)
  # The first one only asks the run to stop. (Python runs a handler in the main thread,
  # between bytecodes, whichever thread the kernel gave the signal to: the script polls.)
  ready, _, _ = select.select([proc.stdout], [], [], 120)
  assert ready and proc.stdout.readline().strip() == "asked to stop SIGINT"
  assert proc.poll() is None
  proc.send_signal(signal.SIGINT)  # the default action: the whole process ends at once
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGINT  # 130 in a shell
  assert "stopping after this step with a checkpoint" in err
  assert "Traceback" not in err


def test_sigterm_and_ctrl_c_share_the_stop_request():
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  with preemption.Stop() as stop:
    assert stop.poll() == ""
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.poll() == "SIGTERM"
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


# -- the workdir ----------------------------------------------------------------------


def test_a_workdir_that_is_a_file(data_dir, tmp_path, capfd):
  path = tmp_path / "notes.txt"
  path.write_text("mine")
  status = main_lib.train(config(data_dir), str(path))
  last = one_line_failure(capfd, status, 1)
  assert f"--workdir={path} is an existing file" in last
  assert path.read_text() == "mine"
  status = main_lib.train(config(data_dir), str(path / "run"))
  last = one_line_failure(capfd, status, 1)
  assert f"cannot be created: {path} is a file" in last


def test_a_workdir_that_cannot_be_created(data_dir, capfd):
  status = main_lib.train(config(data_dir), "/sys/fmjax_test_run")
  last = one_line_failure(capfd, status, 1)
  assert "--workdir=/sys/fmjax_test_run cannot be created (" in last


# -- a full disk ----------------------------------------------------------------------


def test_a_full_disk_during_a_save_stops_cleanly_and_loses_nothing(data_dir, tmp_path, capfd,
                                                                   monkeypatch, straight):
  workdir = str(tmp_path / "run")
  with monkeypatch.context() as mp:
    slow_progress_saves(mp, 0.0, fail_step=4)
    status = main_lib.train(config(data_dir), workdir)
  last = one_line_failure(capfd, status, 1)
  assert f"saving checkpoint 4 in {workdir}/checkpoints failed (No space left on device" in last
  assert "the last complete checkpoint is 2; free space" in last
  assert complete_checkpoints(workdir) == [2] and not tmp_dirs(workdir)
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=3) as ckpt:
    assert ckpt.verify(2) is None
  # Free space again: the same command resumes, exactly.
  assert main_lib.train(config(data_dir), workdir) == 0
  assert "resuming from checkpoint 2" in capfd.readouterr().out
  assert losses(workdir) == losses(straight[0])


def test_other_os_errors_name_the_path_and_the_fix():
  full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl")
  assert loop._os_failure(full, "/runs/x") == (
      "No space left on device: /runs/x/metrics.jsonl; free space there, then run the same "
      "command to resume from the last checkpoint")
  denied = PermissionError(errno.EACCES, "Permission denied", "/runs/x/summary.json")
  assert "make it writable (or use another --workdir than /runs/x)" in loop._os_failure(
      denied, "/runs/x")


# -- device memory --------------------------------------------------------------------


def out_of_memory():
  raise jax.errors.JaxRuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes.")


def test_out_of_memory_on_resume_leaves_the_workdir_as_it_was(data_dir, trained_copy, capfd,
                                                              monkeypatch):
  before = tree_hash(trained_copy)
  hook_step(monkeypatch, 1, out_of_memory)
  status = main_lib.train(config(data_dir, steps=8), trained_copy)
  last = one_line_failure(capfd, status, 1)
  assert "out of memory (RESOURCE_EXHAUSTED: Out of memory while trying to allocate" in last
  assert "train.batch_size=8 x data.seq_len=32 on 8 devices; lower train.batch_size" in last
  assert tree_hash(trained_copy) == before


def test_out_of_memory_at_the_start_leaves_no_workdir(data_dir, tmp_path, capfd, monkeypatch):
  workdir = str(tmp_path / "run")
  hook_step(monkeypatch, 1, out_of_memory)
  last = one_line_failure(capfd, main_lib.train(config(data_dir), workdir), 1)
  assert "out of memory" in last
  assert not os.path.exists(workdir)


# -- data -----------------------------------------------------------------------------


def test_a_source_with_no_documents(data_dir, tmp_path, capfd):
  from array_record.python.array_record_module import ArrayRecordWriter
  for split in ("train", "validation"):
    ArrayRecordWriter(str(tmp_path / f"empty-{split}.array_record-00000"), "group_size:1").close()
  cfg = config(data_dir)
  cfg.data.mixture = f"kjv:0.5, notes=arrayrecord({tmp_path}/empty-{{split}}.array_record-*):0.5"
  workdir = str(tmp_path / "run")
  last = one_line_failure(capfd, main_lib.train(cfg, workdir), 1)
  assert ("data.mixture source 'notes' has no documents in its train split (1 file, all "
          "empty); write documents into it") in last
  assert not os.path.exists(workdir)


# -- a failed start, a longer resume --------------------------------------------------


def test_without_a_checkpoint_any_config_may_start(tmp_path):
  old, new = tiny_config().to_dict(), tiny_config()
  new.optimizer.lr = 0.5
  (tmp_path / "config.json").write_text(json.dumps(old))
  workdir_lib.check_config(str(tmp_path), new.to_dict(), has_checkpoint=False)
  with pytest.raises(config_lib.ConfigError, match="optimizer.lr: 0.001 -> 0.5"):
    workdir_lib.check_config(str(tmp_path), new.to_dict(), has_checkpoint=True)


def test_resuming_with_more_steps_keeps_or_explicitly_changes_the_schedule(tmp_path):
  first = tiny_config()
  first.train.steps = 100  # optimizer.decay_steps=0: the schedule spans train.steps
  (tmp_path / "config.json").write_text(json.dumps(first.to_dict()))
  longer = tiny_config()
  longer.train.steps = 200
  with pytest.raises(config_lib.ConfigError,
                     match=r"learning-rate schedule over 100 -> 200 steps .*set "
                           r"optimizer.decay_steps=100 to keep the first run's schedule"):
    workdir_lib.check_config(str(tmp_path), longer.to_dict())
  workdir_lib.check_config(str(tmp_path), longer.to_dict(), allow_change=True)
  longer.optimizer.decay_steps = 100  # the same schedule, trained past its end
  workdir_lib.check_config(str(tmp_path), longer.to_dict())
  stopped_early = tiny_config()
  stopped_early.train.steps = 50
  stopped_early.optimizer.decay_steps = 100
  workdir_lib.check_config(str(tmp_path), stopped_early.to_dict())


def test_a_stretched_schedule_is_refused_and_changes_nothing(data_dir, trained_copy, capfd):
  path = os.path.join(trained_copy, "config.json")
  with open(path) as f:
    saved = json.load(f)
  saved["optimizer"]["decay_steps"] = 0  # the first run followed train.steps=6
  with open(path, "w") as f:
    json.dump(saved, f)
  before = tree_hash(trained_copy)
  cfg = config(data_dir, steps=12)
  cfg.optimizer.decay_steps = 0
  last = one_line_failure(capfd, main_lib.train(cfg, trained_copy), 2)
  assert "learning-rate schedule over 6 -> 12 steps" in last
  assert tree_hash(trained_copy) == before


# -- start-up, profiler, TensorBoard, W&B ---------------------------------------------


class FakeWandb(types.ModuleType):
  """The part of wandb a run uses: init, log, finish."""

  def __init__(self):
    super().__init__("wandb")
    self.inits, self.logged, self.finished = [], [], 0

  def init(self, **kwargs):
    self.inits.append(kwargs)
    return self

  def log(self, data, step):
    self.logged.append((step, dict(data)))

  def finish(self):
    self.finished += 1


def tensorboard_tags(workdir) -> set:
  """The scalar tags in the workdir's TensorBoard event files (TFRecord framing)."""
  from tensorboardX.proto import event_pb2
  tags = set()
  for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
    with open(path, "rb") as f:
      data = f.read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      tags.update(v.tag for v in event_pb2.Event.FromString(data[i + 12:i + 12 + n]).summary.value)
      i += 12 + n + 4
  return tags


def test_startup_profile_tags_and_wandb_after_a_failed_start(data_dir, tmp_path, capfd,
                                                             monkeypatch):
  """A workdir a run left without a checkpoint (its config.json and records) takes a
  corrected config; the run says what it trains, traces step 2, and logs train/ and eval/
  tags to TensorBoard and W&B."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  failed = config(data_dir)
  failed.data.seq_len = 32000
  (workdir / "config.json").write_text(json.dumps(failed.to_dict()))
  (workdir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
  fake = FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  cfg = config(data_dir, steps=3, profile_steps="2:3", wandb_project="fmjax-tests")
  loop.run(cfg, str(workdir))

  err = capfd.readouterr().err
  for line in ["model: 2 layers, d_model 64, GQA, 4 heads, 2 KV heads, vocab 512: 140K "
               "parameters (74K without embeddings)",
               "mesh: data=8 x fsdp=1 x expert=1 x tensor=1 over 8 cpu devices",
               "data: next_token on 'kjv'; 8 x 32 = 256 tokens a step, 3 steps",
               f"workdir: {workdir}",
               f"start: no checkpoint in {workdir}/checkpoints; random parameters"]:
    assert line in err, err
  assert err.index("compiling the train step...") < err.index("compiled the train step in")
  assert err.index("workdir: ") < err.index("compiling the train step...")

  with open(workdir / "config.json") as f:
    assert json.load(f)["data"]["seq_len"] == 32
  assert [r["step"] for r in metrics.read(str(workdir / "metrics.jsonl"))] == [1, 2, 3, 3]

  traces = glob.glob(str(workdir / "profile" / "plugins" / "profile" / "*" / "*"))
  assert any(t.endswith(".xplane.pb") for t in traces), traces
  assert any(t.endswith("perfetto_trace.json.gz") for t in traces), traces

  tags = tensorboard_tags(str(workdir))
  assert {"train/loss", "train/lr", "train/grad_norm", "eval/loss", "eval/accuracy"} <= tags
  assert not any(t.startswith("eval_") or "/" not in t for t in tags), tags

  assert len(fake.inits) == 1 and fake.inits[0]["project"] == "fmjax-tests"
  assert fake.inits[0]["config"]["train"]["steps"] == 3 and fake.finished == 1
  assert [step for step, _ in fake.logged] == [1, 2, 3, 3]
  assert fake.logged[0][1]["train/loss"] == metrics.read(str(workdir / "metrics.jsonl"))[0]["loss"]
  assert "eval/loss" in fake.logged[-1][1]


def test_wandb_missing_names_the_extra(data_dir, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
  workdir = str(tmp_path / "run")
  with pytest.raises(config_lib.ConfigError,
                     match=r"train.wandb_project='p' needs the wandb package, which is not "
                           r"installed: pip install 'fmjax\[wandb\]'"):
    loop.run(config(data_dir, wandb_project="p"), workdir)
  assert not os.path.exists(workdir)


@pytest.mark.parametrize("value", ["10", "3:3", "a:b", "0:2", "5:2", " 1:2:3"])
def test_profile_steps_are_checked(value):
  cfg = config("/nowhere", profile_steps=value)
  with pytest.raises(config_lib.ConfigError, match=r"train.profile_steps=.*like 10:13"):
    validate.validate(cfg, 8)
  validate.validate(config("/nowhere", profile_steps="10:13"), 8)


def test_a_bad_eval_suite_stops_the_run_before_anything_is_written(data_dir, tmp_path, capfd):
  with pytest.raises(config_lib.ConfigError, match=r"train.eval_suite_every=5 needs "
                                                   r"train.eval_suite"):
    validate.validate(config("/nowhere", eval_suite_every=5), 8)
  (tmp_path / "bad.yaml").write_text("- {kind: essay, data: kjv}\n")
  with pytest.raises(config_lib.ConfigError, match=r"train.eval_suite='.*bad.yaml': .*essay"):
    validate.validate(config("/nowhere", eval_suite=str(tmp_path / "bad.yaml")), 8)
  # Prompts that do not fit the context are found when the suite's data is read, before
  # the first step: the 32-token model cannot answer arithmetic prompts.
  (tmp_path / "long.yaml").write_text(
      "- {kind: generation, data: arithmetic, settings: {examples: 2}}\n")
  workdir = str(tmp_path / "run")
  status = main_lib.train(config(data_dir, eval_suite=str(tmp_path / "long.yaml")), workdir)
  last = one_line_failure(capfd, status, 1)
  assert "suite entry arithmetic: a prompt of" in last and "32-token context" in last
  assert not os.path.exists(workdir)

"""Fault tolerance: kills mid-save, corrupt checkpoints, non-finite steps, loss spikes, the lock."""

import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import tiny_config, tree_hash
from fmjax.train import checkpoint, guard, loop, metrics, workdir as workdir_lib
from fmjax.data import tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import fault_drill  # noqa: E402


# -- the guard ------------------------------------------------------------------------


def train_cfg(**kw):
  t = tiny_config().train
  t.update(dict(dict(nonfinite="skip", nonfinite_max_consecutive=3, spike_zscore=6.0,
                     spike_decay=0.9), **kw))
  return t


def record(loss, consecutive=0, total=0):
  return {"loss": loss, "grad_norm": 1.0, "nonfinite_consecutive": consecutive,
          "nonfinite_total": total}


def test_spike_is_flagged_against_the_running_statistics():
  g = guard.Guard(train_cfg())
  rng = np.random.default_rng(0)
  losses = 3.0 + 0.01 * rng.standard_normal(40)
  assert not any(g.check(i, record(x)).record for i, x in enumerate(losses))
  # The same z-score from the running mean and variance, computed independently.
  mean, var = losses[0], 0.0
  for x in losses[1:]:
    mean, var = mean + 0.1 * (x - mean), 0.9 * (var + 0.1 * (x - mean) ** 2)
  v = g.check(40, record(3.5))
  assert v.record["loss_spike_z"] == pytest.approx((3.5 - mean) / math.sqrt(var))
  assert v.log and "step 40: loss spike 3.5000" in v.messages[0]
  assert not g.check(41, record(3.0)).record  # a lower loss is never a spike


def test_no_spike_before_the_statistics_warm_up():
  g = guard.Guard(train_cfg())
  for i in range(9):  # decay 0.9: the first 10 records only warm up
    assert not g.check(i, record(3.0 if i < 8 else 30.0)).record


def test_spike_statistics_survive_a_restart():
  a = guard.Guard(train_cfg())
  for i, x in enumerate(np.linspace(5, 3, 30)):
    a.check(i, record(x))
  b = guard.Guard(train_cfg(), json.loads(json.dumps(a.state())))
  assert a.check(30, record(4.0)).record == b.check(30, record(4.0)).record


def test_skip_policy_counts_then_halts_after_k_in_a_row():
  g = guard.Guard(train_cfg(nonfinite="skip"))
  for n in (1, 2):
    v = g.check(n, record(float("nan"), n, n))
    assert not v.restore and v.log and f"({n} in a row, {n} in all)" in v.messages[0]
  with pytest.raises(guard.NonFiniteError, match="nonfinite_max_consecutive=3"):
    g.check(3, record(float("nan"), 3, 3))


def test_halt_policy_stops_at_the_first():
  g = guard.Guard(train_cfg(nonfinite="halt"))
  with pytest.raises(guard.NonFiniteError, match="step 7: non-finite loss.*nonfinite='halt'"):
    g.check(7, record(float("inf"), 1, 1))


def test_restore_policy_goes_back_but_not_twice_in_vain():
  g = guard.Guard(train_cfg(nonfinite="restore", nonfinite_max_consecutive=2))
  assert not g.check(1, record(float("nan"), 1, 1)).restore
  assert g.check(2, record(float("nan"), 2, 2)).restore
  g.restored()
  g.check(3, record(3.0))  # a finite step after the restore: going back may help again
  g.check(4, record(float("nan"), 1, 3))
  assert g.check(5, record(float("nan"), 2, 4)).restore
  g.restored()
  g.check(6, record(float("nan"), 1, 5))
  with pytest.raises(guard.NonFiniteError, match="restoring again would not help"):
    g.check(7, record(float("nan"), 2, 6))


def test_injection_reads_the_environment(monkeypatch):
  monkeypatch.setenv(guard.INJECT_ENV, "3, 5")
  poisoned = guard.injected_nan_batches()
  assert poisoned == {3, 5}
  batch = {"tokens": np.ones((2, 4), np.int32)}
  assert guard.inject(batch, 4, poisoned) is batch
  assert np.isnan(guard.inject(batch, 5, poisoned)["loss_mask"]).all()
  monkeypatch.setenv(guard.INJECT_ENV, "five")
  with pytest.raises(ValueError, match="FMJAX_INJECT_NAN_BATCHES='five'"):
    guard.injected_nan_batches()


# -- checkpoints: digests, corruption, fallback ----------------------------------------


def small_state(step):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sh = NamedSharding(mesh, P("data"))
  w = jax.random.normal(jax.random.key(step), (64, 256))
  return {"step": jnp.int32(step), "params": {"w": jax.device_put(w, sh),
                                              "b": jnp.full((8,), step, jnp.float32)}}


def abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


@pytest.fixture
def three_checkpoints(tmp_path):
  directory = str(tmp_path / "checkpoints")
  with checkpoint.Checkpointer(directory, keep=3) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, small_state(step), progress={"batches": step})
    ckpt.wait()
    for step in (1, 2, 3):
      assert ckpt.verify(step) is None
      assert os.path.exists(os.path.join(directory, str(step), checkpoint.DIGEST))
  return directory


def array_file(step_dir):
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  return max(files, key=os.path.getsize)


def flip(step_dir):
  path = array_file(step_dir)
  data = bytearray(open(path, "rb").read())
  mid = len(data) // 2
  data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
  open(path, "wb").write(data)
  return os.path.relpath(path, step_dir), "has different bytes than when it was saved"


def truncate(step_dir):
  path = array_file(step_dir)
  size = os.path.getsize(path)
  os.truncate(path, size // 3)
  return os.path.relpath(path, step_dir), f"has {size // 3} bytes, {size} when saved (truncated"


def delete(step_dir):
  os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))
  return "state/manifest.ocdbt", "is missing"


def bad_digest(step_dir):
  with open(os.path.join(step_dir, checkpoint.DIGEST), "w") as f:
    f.write("{")
  return checkpoint.DIGEST, "is unreadable (JSONDecodeError"


@pytest.mark.parametrize("damage", [flip, truncate, delete, bad_digest], ids=lambda f: f.__name__)
def test_corrupt_latest_falls_back_to_the_one_before(three_checkpoints, damage):
  name, problem = damage(os.path.join(three_checkpoints, "3"))
  warnings = []
  target = abstract(small_state(0))
  with checkpoint.Checkpointer(three_checkpoints, keep=3) as ckpt:
    restored = ckpt.restore_latest(target, warn=warnings.append)
    assert restored.step == 2 and restored.progress == {"batches": 2}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.state),
                 jax.device_get(small_state(2)))
    assert f"checkpoint 3 in {three_checkpoints} is unusable: " in warnings[0]
    assert f"{name} {problem}" in warnings[0]
    # The damaged one is kept aside, and its step can be saved again.
    assert ckpt.all_steps() == [1, 2]
    assert os.path.isdir(three_checkpoints + ".corrupt/3")
    ckpt.save(3, small_state(3))
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2, 3] and ckpt.verify(3) is None


def test_orbax_alone_restores_a_flipped_chunk_silently(three_checkpoints):
  """Why checkpoints carry a digest: without it this corruption goes unnoticed."""
  flip(os.path.join(three_checkpoints, "3"))
  with checkpoint.Checkpointer(three_checkpoints, keep=3) as ckpt:
    state = jax.device_get(ckpt.restore(3, abstract(small_state(0))))
    assert ckpt.verify(3) is not None
  assert not np.array_equal(state["params"]["w"], jax.device_get(small_state(3))["params"]["w"])


def test_no_usable_checkpoint_stops_and_changes_nothing(three_checkpoints):
  for step in (1, 2, 3):
    flip(os.path.join(three_checkpoints, str(step)))
  before = tree_hash(os.path.dirname(three_checkpoints))
  with checkpoint.Checkpointer(three_checkpoints, keep=3) as ckpt:
    with pytest.raises(checkpoint.CheckpointError, match=r"tried steps 3, 2, 1"):
      ckpt.restore_latest(abstract(small_state(0)), warn=lambda m: None)
  assert tree_hash(os.path.dirname(three_checkpoints)) == before


def test_checkpoint_without_a_digest_restores_on_orbax_checks(three_checkpoints):
  """A process killed after orbax's commit and before the digest: the save is complete."""
  os.remove(os.path.join(three_checkpoints, "3", checkpoint.DIGEST))
  with checkpoint.Checkpointer(three_checkpoints, keep=3) as ckpt:
    assert ckpt.restore_latest(abstract(small_state(0))).step == 3


def test_restore_waits_for_a_save_in_flight(three_checkpoints):
  with checkpoint.Checkpointer(three_checkpoints, keep=5) as ckpt:
    ckpt.save(4, small_state(4))  # asynchronous: possibly still being written
    restored = ckpt.restore_latest(abstract(small_state(0)), warn=pytest.fail)
    assert restored.step == 4 and ckpt.verify(4) is None


KILLED_SAVER = """
import os, sys, time
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp
from fmjax.train import checkpoint
with checkpoint.Checkpointer(sys.argv[1], keep=3) as ckpt:
  ckpt.save(1, {"w": jnp.ones((1024, 1024)), "v": jnp.ones((8,))})
  ckpt.wait()
  big = {"w": jnp.full((4096, 4096), 2.0), "v": jnp.full((8,), 2.0)}  # 64 MB
  ckpt.save(2, big)
  print("saving", flush=True)
  time.sleep(600)
"""


def test_sigkill_during_an_async_save_leaves_the_last_complete_checkpoint(tmp_path):
  directory = str(tmp_path / "checkpoints")
  proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVER, directory], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE,
                          text=True)
  pattern = os.path.join(directory, "2.orbax-checkpoint-tmp*")
  deadline = time.time() + 300
  while not glob.glob(pattern) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.0005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  # What the kill left: step 1 complete, step 2 only as orbax's temporary directory.
  assert glob.glob(pattern), os.listdir(directory)
  assert not os.path.exists(os.path.join(directory, "2"))
  with checkpoint.Checkpointer(directory, keep=3) as reader:  # a reader removes nothing
    assert reader.all_steps() == [1]
  assert glob.glob(pattern)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32, sharding=one),
            "v": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=one)}
  with checkpoint.Checkpointer(directory, keep=3, cleanup=True) as writer:
    restored = writer.restore_latest(target)
    assert restored.step == 1
    np.testing.assert_array_equal(restored.state["w"], np.ones((1024, 1024)))
  assert not glob.glob(pattern)


# -- the workdir lock -----------------------------------------------------------------

HOLDER = """
import sys, time
from fmjax.train import workdir
with workdir.lock(sys.argv[1]):
  print("locked", flush=True)
  time.sleep(600)
"""


def test_lock_names_its_holder_and_dies_with_it(tmp_path):
  proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == "locked"
  with pytest.raises(workdir_lib.WorkdirLocked, match=f"in use by process {proc.pid},"):
    with workdir_lib.lock(str(tmp_path)):
      pass
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  with workdir_lib.lock(str(tmp_path)):  # a killed holder's lock is gone
    pass
  assert os.listdir(tmp_path) == []  # the lock writes nothing


# -- non-finite steps in the loop -------------------------------------------------------


def test_nonfinite_steps_are_skipped_then_restored_past(data_dir, tmp_path, monkeypatch):
  """Batch 3 poisoned: skipped and counted. Batches 5 and 6: two in a row, so the run goes
  back to checkpoint 4 and skips the batches drawn since it (5 and 6)."""
  c = tiny_config(vocab_size=512)
  c.data.update(data_dir=data_dir, eval_batches=1)
  c.optimizer.update(warmup_steps=1, decay_steps=8)
  c.train.update(steps=8, log_every=1, eval_every=0, sample_tokens=0, progress=False,
                 nonfinite="restore", nonfinite_max_consecutive=2)
  c.checkpoint.update(every=2, keep=5)
  monkeypatch.setenv(guard.INJECT_ENV, "3,5,6")
  workdir = str(tmp_path / "run")
  loop.run(c, workdir)

  records = metrics.read(os.path.join(workdir, "metrics.jsonl"))
  steps = [r for r in records if "loss" in r]
  assert [r["step"] for r in steps] == list(range(1, 9))
  assert math.isnan(steps[2]["loss"]) and steps[2]["nonfinite_consecutive"] == 1
  assert all(math.isfinite(r["loss"]) for r in steps[3:])
  assert steps[-1]["nonfinite_total"] == 1  # the restored state counted only batch 3
  events = [r for r in records if r.get("event")]
  assert events == [{"step": 4, "event": "nonfinite_restore", "skipped_batches": 2,
                     "last_bad_batch": 6}]
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=5) as ckpt:
    assert ckpt.all_steps() == [0, 2, 4, 6, 8]
    from fmjax.nn import sharding
    from fmjax.train import state as state_lib
    s = state_lib.setup(c, sharding.make_mesh(c.mesh))
    for step in ckpt.all_steps():
      state = jax.device_get(ckpt.restore(step, s.abstract_state))
      assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
    final = ckpt.restore_latest(s.abstract_state)
  assert final.progress["batches"] == 10  # 8 steps, 2 batches skipped


# -- the drills, reduced --------------------------------------------------------------


def test_fault_drills_reduced(data_dir, tmp_path):
  """tools/fault_drill.py's drills, one trial each: nothing is lost."""
  tokenizer_lib.load_or_train(data_dir, 512)
  drills = fault_drill.Drills(data_dir, str(tmp_path), seed=0)
  rows = [drills.sigkill_during_save(1), drills.corrupt_latest(["flip"], all_damaged=False)]
  print(fault_drill.table(rows))
  for row in rows:
    assert row.survived == row.trials == 1, row
    assert max(row.recomputed) <= fault_drill.BOUND


def test_the_drill_holds_kills_to_the_bound_of_asynchronous_saves():
  """Recorded step t: every checkpoint of a multiple of EVERY up to t - EVERY is complete."""
  e = fault_drill.EVERY
  assert fault_drill.BOUND == 2 * e - 1
  assert [fault_drill.promised(t) for t in (0, e - 1, e, 2 * e - 1, 2 * e, 3 * e - 1)] == \
      [0, 0, 0, 0, e, e]
  assert max(t - fault_drill.promised(t) for t in range(4 * e)) == fault_drill.BOUND

"""Fault drills: kill, corrupt and poison short training runs, and check that nothing is lost.

  python tools/fault_drill.py [--trials=10] [--data_dir=~/.cache/fmjax] [--out=/tmp/fmjax_drill]
  python tools/fault_drill.py --rl_only [--rl_trials=3]    # the RL drill alone

Every run is the real command line (`python -m fmjax.main`) with this file as
its experiment: a 2-layer decoder trained for STEPS steps with a checkpoint
every EVERY steps, on 8 fake CPU devices. The drills:

- sigkill at random: SIGKILL at `--trials` moments drawn uniformly over the
  training phase of an uninterrupted reference run (first step to exit, checkpoint
  saves included), mapped onto each trial's own progress; then the same command
  again. Survived: it finishes with final parameters bit-identical to the
  reference's, leaves no half-written checkpoint, and resumed within the bound
  below.
- sigkill during save: SIGKILL once a checkpoint's temporary directory appears
  (orbax is writing it), after a random 0-50 ms; then the same command again.
  Survived: as above; and the half-written checkpoint was on disk after the kill
  and is gone after the restart.
- corrupt latest: a copy of the reference run with its final checkpoint damaged
  one way per trial (bytes flipped in an array chunk, an array file truncated, a
  file deleted, the data-iterator state overwritten), run again. Survived: it
  warns naming the damaged file, moves that checkpoint aside, redoes the steps
  from the checkpoint before, and ends bit-identical to the reference. One more trial damages every
  checkpoint: survived if it stops with an error and changes no file.
- injected NaN: FMJAX_INJECT_NAN_BATCHES poisons batches under each policy
  (skip, restore, halt). Survived: skip and restore finish with finite
  parameters and the bad steps counted; halt stops with exit 1 and a message;
  no checkpoint on disk holds a non-finite value. One more trial kills the
  restore run just after its restore: survived if the restart ends with the
  same parameters as the uninterrupted restore run.
- RL (`--rl_trials`): SIGKILL at random moments of a GRPO run (this file with
  the argument `rl`: rollouts of 2 prompts x 4 samples a step on addition,
  rewards from the verifier), then the same command again. Survived: final
  parameters bit-identical to an uninterrupted GRPO run's (the prompt
  iterator's position and optimizer state are checkpointed; the rollout key is
  derived from the batch number the checkpoint keeps), within the same bound.

Steps recomputed: steps a killed or corrupted run had logged beyond the
checkpoint its restart resumed from (for restore: the steps thrown away).

The bound a kill is held to is what fmjax.train.loop promises with
asynchronous saves: before it records step t, every checkpoint of a multiple
of EVERY up to t - EVERY is complete (a save still in flight that long is
waited for). So after a kill with step t the last one recorded, the restart
resumes from step `promised(t)` or later, and recomputes at most
BOUND = 2 * EVERY - 1 steps: a save may still be in flight for up to EVERY - 1
steps past the next checkpoint's.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import glob
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 16, 4
BOUND = 2 * EVERY - 1  # the most steps a kill may cost


def promised(logged: int) -> int:
  """The oldest checkpoint a restart may resume from once step `logged` was recorded."""
  return max(logged - EVERY, 0) // EVERY * EVERY


def get_config(arg=None):
  """The drill's run, as an experiment file: small enough to start and step in seconds.
  `rl`: the same model trained by GRPO from random parameters (the RL drill)."""
  from fmjax import config

  c = config.base()
  c.model.update(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
  c.data.update(seq_len=32, eval_batches=1)
  c.optimizer.update(lr=3e-3, warmup_steps=2, decay_steps=STEPS)  # steps=N is a prefix of STEPS
  c.mesh.update(data=-1, fsdp=1, tensor=1, cpu_devices=8)
  c.train.update(steps=STEPS, batch_size=8, log_every=1, eval_every=0, sample_tokens=0,
                 progress=False)
  c.checkpoint.update(every=EVERY, keep=3)
  if arg == "rl":
    c.objective.name = "grpo"
    c.objective.tasks = "addition"
    c.objective.rl.update(group_size=4, max_new_tokens=8, eval_prompts=8)
    c.data.seq_len = 48  # prompts of the 512-token vocabulary run to 31 tokens
    c.optimizer.warmup_steps = 0
  return c


@dataclasses.dataclass
class Row:
  drill: str
  trials: int = 0
  survived: int = 0
  recomputed: list = dataclasses.field(default_factory=list)
  notes: list = dataclasses.field(default_factory=list)

  def add(self, ok: bool, recomputed: int | None = None, note: str = ""):
    self.trials += 1
    self.survived += bool(ok)
    if recomputed is not None:
      self.recomputed.append(recomputed)
    if note:
      self.notes.append(note)


class Drills:
  """Runs the drills in `out`, on the corpus and tokenizer cached in `data_dir`."""

  def __init__(self, data_dir: str, out: str, seed: int = 0, log=print, arg: str = ""):
    self.data_dir, self.out, self.log = os.path.abspath(data_dir), os.path.abspath(out), log
    self.arg = arg  # the experiment's argument: "rl" for the RL drill
    self.rng = random.Random(seed)
    self._reference = None
    os.makedirs(self.out, exist_ok=True)

  # -- running -----------------------------------------------------------------

  def command(self, workdir, *flags):
    config = os.path.abspath(__file__) + (f":{self.arg}" if self.arg else "")
    return [sys.executable, "-m", "fmjax.main", f"--config={config}",
            f"--workdir={workdir}", f"--config.data.data_dir={self.data_dir}", *flags]

  def start(self, workdir, *flags, env=None):
    proc = subprocess.Popen(self.command(workdir, *flags), cwd=REPO, env=self._env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    atexit.register(lambda: proc.poll() is None and proc.kill())  # if the drill itself stops
    return proc

  def train(self, workdir, *flags, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(self.command(workdir, *flags), cwd=REPO, env=self._env(env),
                          capture_output=True, text=True, timeout=900)

  def _env(self, extra):
    env = dict(os.environ, PYTHONPATH=REPO, **(extra or {}))
    env.pop("XLA_FLAGS", None)  # the experiment sets its 8 devices itself
    return env

  def fresh(self, name) -> str:
    path = os.path.join(self.out, name)
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(path + ".corrupt", ignore_errors=True)
    return path

  def reference(self):
    """(final parameters, record times) of an uninterrupted run; times from process start."""
    if self._reference is None:
      workdir = self.fresh("reference")
      started = time.perf_counter()
      proc = self.start(workdir)
      times = {}
      while proc.poll() is None:
        for r in _records(workdir):
          times.setdefault(r["step"], time.perf_counter() - started)
        time.sleep(0.02)
      end = time.perf_counter() - started
      out, err = proc.communicate()
      assert proc.returncode == 0, err[-3000:]
      self._reference = (final_params(workdir), sorted(times.items()), end)
    return self._reference

  def finish(self, workdir, **kw) -> tuple[bool, int, subprocess.CompletedProcess]:
    """Runs the command to the end again: (params equal the reference's, resumed step, result)."""
    r = self.train(workdir, **kw)
    resumed = re.search(r"resuming from checkpoint (\d+)", r.stdout)
    ok = r.returncode == 0 and _equal(final_params(workdir), self.reference()[0])
    if r.returncode:
      self.log(f"  restart failed: {r.stderr.strip().splitlines()[-1:]}")
    return ok, int(resumed.group(1)) if resumed else 0, r

  # -- drills ------------------------------------------------------------------

  def sigkill_at_random(self, trials: int) -> Row:
    row = Row("SIGKILL at a random moment" + (" of a GRPO run" if self.arg == "rl" else ""))
    _, times, end = self.reference()
    first = times[0][1]
    for i in range(trials):
      for attempt in range(5):  # a moment after the trial's own run ended is drawn again
        moment = self.rng.uniform(first, end)
        # The same moment in progress terms: after the last record seen by then, plus the rest.
        step, at = max(((s, t) for s, t in times if t <= moment), default=(0, first))
        workdir = self.fresh(f"kill_random_{i}")
        proc = self.start(workdir)
        while proc.poll() is None and _last_step(workdir) < step:
          time.sleep(0.005)
        time.sleep(moment - at)
        killed = proc.poll() is None
        proc.kill()
        proc.communicate()
        if killed:
          break
        self.log(f"  kill {i}: the run had ended before the moment; drawing another")
      logged, tmp = _last_step(workdir), _tmp_dirs(workdir)
      ok, resumed, _ = self.finish(workdir)
      recomputed = max(logged - resumed, 0)
      within = resumed >= promised(logged)
      ok = ok and within and not _tmp_dirs(workdir)
      self.log(f"  kill {i}: {moment:.1f} s into the reference's {end:.1f} s, after step "
               f"{logged}, {len(tmp)} half-written checkpoint(s) left; resumed from {resumed} "
               f"(promised: {promised(logged)} or later), recomputed {recomputed}; "
               f"{'ok' if ok else 'FAILED'}")
      row.add(ok, recomputed)
    return row

  def sigkill_during_save(self, trials: int) -> Row:
    row = Row("SIGKILL during a checkpoint save")
    for i in range(trials):
      target = EVERY * (2 + i % (STEPS // EVERY - 1))  # 8, 12, 16 (the final save), ...
      workdir = self.fresh(f"kill_save_{i}")
      proc = self.start(workdir)
      pattern = os.path.join(workdir, "checkpoints", f"{target}.orbax-checkpoint-tmp*")
      while proc.poll() is None and not glob.glob(pattern):
        time.sleep(0.0005)
      time.sleep(self.rng.uniform(0, 0.05))
      proc.kill()
      proc.communicate()
      logged, tmp = _last_step(workdir), _tmp_dirs(workdir)
      written = sum(len(files) for d in tmp for _, _, files in os.walk(d))
      ok, resumed, _ = self.finish(workdir)
      recomputed = max(logged - resumed, 0)
      ok = ok and bool(tmp) and not _tmp_dirs(workdir) and resumed >= promised(logged)
      self.log(f"  kill during save of {target}: at step {logged}, {written} files of the "
               f"half-written checkpoint on disk; resumed from {resumed} (promised: "
               f"{promised(logged)} or later), recomputed {recomputed}; "
               f"{'ok' if ok else 'FAILED'}")
      row.add(ok, recomputed)
    return row

  def corrupt_latest(self, kinds=None, all_damaged=True) -> Row:
    """Damages the reference run's final checkpoint; running the command again redoes
    the last EVERY steps from the one before."""
    row = Row("corrupted latest checkpoint")
    self.reference()
    base = os.path.join(self.out, "reference")
    for kind in kinds or CORRUPTIONS:
      workdir = self.fresh(f"corrupt_{kind}")
      shutil.copytree(base, workdir)
      damaged = CORRUPTIONS[kind](os.path.join(workdir, "checkpoints", str(STEPS)))
      ok, resumed, result = self.finish(workdir)
      named = os.path.basename(damaged) in result.stderr
      moved = os.path.isdir(os.path.join(workdir, "checkpoints.corrupt", str(STEPS)))
      ok = ok and named and moved and resumed == STEPS - EVERY
      warning = [line for line in result.stderr.splitlines() if "unusable" in line]
      self.log(f"  {kind}: {warning[:1]}; resumed from {resumed}; {'ok' if ok else 'FAILED'}")
      row.add(ok, STEPS - resumed)
    if not all_damaged:
      return row
    # Every checkpoint damaged: the run must stop, and change nothing.
    workdir = self.fresh("corrupt_all")
    shutil.copytree(base, workdir)
    for step in (STEPS - 2 * EVERY, STEPS - EVERY, STEPS):
      CORRUPTIONS["flip"](os.path.join(workdir, "checkpoints", str(step)))
    before = tree_digest(workdir)
    r = self.train(workdir)
    last = (r.stderr.strip().splitlines() or [""])[-1]
    ok = r.returncode == 1 and "no usable checkpoint" in last and tree_digest(workdir) == before
    self.log(f"  every checkpoint damaged: exit {r.returncode}, {last!r}, workdir "
             f"{'unchanged' if tree_digest(workdir) == before else 'CHANGED'}")
    row.add(ok, note="all damaged: refused")
    return row

  def nan_injected(self, policies=("skip", "restore", "halt"), kill_after_restore=True) -> Row:
    row = Row("injected NaN")
    for policy in policies:
      workdir = self.fresh(f"nan_{policy}")
      bad = [6, 7] if policy == "restore" else [6]
      r = self.train(workdir, f"--config.train.nonfinite={policy}",
                     "--config.train.nonfinite_max_consecutive=2",
                     env={"FMJAX_INJECT_NAN_BATCHES": ",".join(map(str, bad))})
      records = _records(workdir)
      finite = all_checkpoints_finite(workdir)
      recomputed = None
      if policy == "halt":
        ok = r.returncode == 1 and "non-finite" in r.stderr and finite
      else:
        counted = max((x.get("nonfinite_total", 0) for x in records), default=0)
        restores = [x for x in records if x.get("event") == "nonfinite_restore"]
        ok = r.returncode == 0 and finite and final_params_finite(workdir)
        if policy == "skip":
          ok = ok and counted == len(bad)
        else:
          ok = ok and len(restores) == 1 and restores[0]["skipped_batches"] == 3
          recomputed = bad[-1] - restores[0]["step"] if restores else None
      self.log(f"  {policy}: exit {r.returncode}, checkpoints finite: {finite}; "
               f"{'ok' if ok else 'FAILED: ' + r.stderr[-500:]}")
      row.add(ok, recomputed)
      if policy == "restore" and kill_after_restore:
        row.add(*self._kill_after_restore(workdir, bad))
    return row

  def _kill_after_restore(self, uninterrupted, bad):
    """The restore run again, killed after its restore; the restart must end the same."""
    workdir = self.fresh("nan_restore_killed")
    flags = ["--config.train.nonfinite=restore", "--config.train.nonfinite_max_consecutive=2"]
    env = {"FMJAX_INJECT_NAN_BATCHES": ",".join(map(str, bad))}
    proc = self.start(workdir, *flags, env=env)
    def restored():
      return [x["step"] for x in _records(workdir) if x.get("event")]
    while proc.poll() is None and not (restored() and _last_step(workdir) > restored()[0]):
      time.sleep(0.005)
    proc.kill()
    proc.communicate()
    logged = _last_step(workdir)
    r = self.train(workdir, *flags, env=env)
    resumed = re.search(r"resuming from checkpoint (\d+)", r.stdout)
    resumed = int(resumed.group(1)) if resumed else 0
    ok = r.returncode == 0 and _equal(final_params(workdir), final_params(uninterrupted))
    self.log(f"  restore, killed after the restore at step {logged}: resumed from {resumed}; "
             f"final parameters {'equal' if ok else 'DIFFERENT'} to the uninterrupted run's")
    return ok, max(logged - resumed, 0)


# -- damage ------------------------------------------------------------------------


def _largest_array_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
           if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def _flip(step_dir):
  path = _largest_array_file(step_dir)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    data = f.read(16)
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes(b ^ 0xFF for b in data))
  return path


def _truncate(step_dir):
  path = _largest_array_file(step_dir)
  os.truncate(path, os.path.getsize(path) // 2)
  return path


def _delete(step_dir):
  path = os.path.join(step_dir, "state", "_METADATA")
  os.remove(path)
  return path


def _data_state(step_dir):
  path = glob.glob(os.path.join(step_dir, "data", "*.json"))[0]
  with open(path, "w") as f:
    f.write('{"garbage": ')
  return path


CORRUPTIONS = {"flip": _flip, "truncate": _truncate, "delete": _delete,
               "data_state": _data_state}


# -- reading runs -------------------------------------------------------------------


def _records(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  try:
    with open(path) as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    return []
  out = []
  for line in lines:
    try:
      out.append(json.loads(line))
    except ValueError:  # a line being written
      pass
  return out


def _last_step(workdir) -> int:
  return max((r["step"] for r in _records(workdir) if "loss" in r), default=0)


def _tmp_dirs(workdir):
  return glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*"))


def tree_digest(path) -> str:
  """A hash of every file's path and bytes under `path`."""
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for name in sorted(files):
      file = os.path.join(root, name)
      h.update(os.path.relpath(file, path).encode())
      with open(file, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


def _setup():
  from fmjax.nn import sharding
  from fmjax.train import state as state_lib
  cfg = get_config()
  return state_lib.setup(cfg, sharding.make_mesh(cfg.mesh))


def _load(workdir, step):
  import jax
  from fmjax.train import checkpoint
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=99) as ckpt:
    return jax.device_get(ckpt.restore(step, _setup().abstract_state))


def final_params(workdir):
  import jax
  from fmjax.train import checkpoint
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=99) as ckpt:
    step = ckpt.latest_step()
  if step != STEPS:
    return None
  return jax.device_get(_load(workdir, step)["params"])


def final_params_finite(workdir) -> bool:
  import numpy as np
  import jax
  params = final_params(workdir)
  return params is not None and all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def all_checkpoints_finite(workdir) -> bool:
  import numpy as np
  import jax
  from fmjax.train import checkpoint
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=99) as ckpt:
    steps = ckpt.all_steps()
  return all(np.isfinite(x).all() for s in steps for x in jax.tree.leaves(_load(workdir, s))
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def _equal(a, b) -> bool:
  import numpy as np
  import jax
  if a is None or b is None:
    return False
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def table(rows) -> str:
  lines = ["| drill | trials | survived | steps recomputed |", "| --- | --- | --- | --- |"]
  for r in rows:
    rec = (f"{sum(r.recomputed)} in all (max {max(r.recomputed)}, per trial "
           f"{', '.join(map(str, r.recomputed))})" if r.recomputed else "-")
    lines.append(f"| {r.drill} | {r.trials} | {r.survived} | {rec} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--trials", type=int, default=10, help="random SIGKILL trials")
  parser.add_argument("--save_trials", type=int, default=3, help="SIGKILL-during-save trials")
  parser.add_argument("--data_dir", default="~/.cache/fmjax")
  parser.add_argument("--out", default="/tmp/fmjax_drill")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--rl_trials", type=int, default=3, help="random SIGKILL trials of GRPO")
  parser.add_argument("--rl_only", action="store_true", help="run the RL drill alone")
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  sys.path.insert(0, REPO)
  started = time.time()
  d = Drills(os.path.expanduser(args.data_dir), args.out, seed=args.seed,
             log=lambda m: print(m, flush=True))
  rows = []
  rl_drills = Drills(os.path.expanduser(args.data_dir), os.path.join(args.out, "rl"),
                     seed=args.seed, log=d.log, arg="rl")
  drills = [("reference", None),
            ("sigkill at random", lambda: d.sigkill_at_random(args.trials)),
            ("sigkill during save", lambda: d.sigkill_during_save(args.save_trials)),
            ("corrupt latest", d.corrupt_latest),
            ("injected nan", d.nan_injected),
            ("rl: sigkill at random", lambda: rl_drills.sigkill_at_random(args.rl_trials))]
  for name, drill in drills[-1:] if args.rl_only else drills:
    print(f"{name}:", flush=True)
    if drill is None:
      d.reference()
      continue
    rows.append(drill())
  print()
  print(table(rows))
  print(f"\n{STEPS} steps, a checkpoint every {EVERY} (a kill may cost up to {BOUND}); wall "
        f"time {time.time() - started:.0f} s")
  return 0 if all(r.survived == r.trials for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())

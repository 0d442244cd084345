"""Checkpoints: train state, data-iterator position and run progress, saved together.

An orbax CheckpointManager writes each step asynchronously into a temporary
directory and renames it when complete, so a process killed mid-save leaves
no half checkpoint under a step's name; the trainer that opens the directory
next (`cleanup=True`, under the workdir lock) removes the leftover. It keeps the last
`checkpoint.keep` steps. A restore takes its target shardings from the caller,
so a run can resume on a mesh of a different shape.

Orbax does not notice every corruption: a flipped byte inside an array chunk
restores silently as a wrong value. So once a save has completed, a digest of
its files (size and SHA-256 of each) is written beside them, and
`restore_latest` checks it before restoring. A checkpoint that fails the
check, or whose restore fails, is moved to `<directory>.corrupt/` with a
warning that names the problem, and the one before it is tried. If none is
usable, it raises CheckpointError: a run never starts from scratch over
checkpoints it could not read.

A state with a non-finite value is never written (NonFiniteCheckpoint).

A save that fails (a full disk, say), in the call or later in the background,
raises CheckpointSaveError, one line naming the step, the path and the fix,
once its half-written temporary directory has been removed: the checkpoints
already complete are left as they were. orbax's own error logs of such a
failure are dropped, since the exception reports it.

Asynchronous saves: at most one is in flight (a save waits for the one
before). `poll` completes a save that has finished in the background (its
digest, or its error) without waiting; `wait_through(step)` waits for a save
of `step` or earlier. The loop calls the second before it records step
s + checkpoint.every, so the checkpoint of step s is complete by then
(fmjax.train.loop: a kill loses at most 2 * every - 1 steps).

The directory may be a URL (gs://bucket/run/checkpoints; see checkpoint.root
and `run_directory`), which every host of a pod can reach: orbax reads and
writes it through tensorstore and etils.epath (which needs gcsfs for gs://).
Digests are kept only for local directories: hashing a remote checkpoint would
read it all back, and the object store checksums what it stores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import threading

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from fmjax import config as config_lib
from fmjax.errors import Failure
from fmjax.hf import files as hf
from fmjax.train import records

DIGEST = "fmjax_digest.json"


class CheckpointError(RuntimeError):
  """The workdir has checkpoints, and none of them can be restored."""


class NonFiniteCheckpoint(RuntimeError):
  """A state with NaN or Inf values was about to be checkpointed."""


class CheckpointSaveError(Failure):
  """A checkpoint could not be written; what it had half-written is removed."""


class _QuietOrbaxErrors(logging.Filter):
  """Drops orbax's error logs (with tracebacks): every failure they report is raised too."""

  def filter(self, record):
    return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


@dataclasses.dataclass
class Restored:
  step: int
  state: dict
  progress: dict  # what the loop saved beside the state (empty if nothing)


class Checkpointer:

  def __init__(self, directory, keep: int, async_save: bool = True, cleanup: bool = False,
               save_gb_in_flight: int | None = None):
    """`cleanup` removes temporary directories of interrupted saves: only for the one
    process that writes checkpoints here (a reader would delete a running save).
    `save_gb_in_flight` (at least the largest array, in GB of 1e9 bytes) bounds the
    host copies a save makes of the state (orbax copies all of it at once
    otherwise): for states as large as the host's memory."""
    self.directory = absolute(directory)  # orbax requires absolute paths
    self.remote = is_url(self.directory)
    self._bounded = save_gb_in_flight is not None
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=cleanup),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(
            save_concurrent_gb=save_gb_in_flight,
            save_device_host_concurrent_gb=save_gb_in_flight)} if self._bounded else None,
    )
    self._undigested = None  # the step whose save may still be running
    self._failed = False  # a save failed: close() waits for nothing more
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _QuietOrbaxErrors) for f in absl_logger.filters):
      absl_logger.addFilter(_QuietOrbaxErrors())

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      self.close()
      return
    with contextlib.suppress(Exception):  # the exception on its way out is the one to report
      self.close()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_iterator=None, progress: dict | None = None,
           force: bool = False) -> bool:
    if not _all_finite(state):
      raise NonFiniteCheckpoint(f"the state at step {step} has NaN or Inf values; "
                                "it was not checkpointed")
    self._write_pending_digest()  # orbax finishes the previous save before starting one
    items = {"state": (ocp.args.PyTreeSave if self._bounded else ocp.args.StandardSave)(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if progress is not None:
      items["progress"] = ocp.args.JsonSave(progress)
    with self._writing(step):
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      self._undigested = step
      if not self.manager.is_saving_in_progress():
        self._write_pending_digest()
    return saved

  def restore(self, step: int, abstract_state, data_iterator=None):
    """State restored onto the shardings in `abstract_state`; the iterator in place."""
    return self._restore(step, abstract_state, data_iterator).state

  def _restore(self, step, abstract_state, data_iterator) -> Restored:
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    has_progress = (epath.Path(self._path(step)) / "progress").is_dir()
    if has_progress:
      items["progress"] = ocp.args.JsonRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return Restored(step, out["state"], dict(out["progress"]) if has_progress else {})

  def restore_latest(self, abstract_state, data_iterator=None, warn=print) -> Restored | None:
    """The newest checkpoint that passes its digest and restores; None if there are none.

    Raises ConfigError if the checkpoints hold arrays of other shapes than
    `abstract_state` (a changed model), CheckpointError if none is usable.
    """
    self.wait()  # a save still being written is not a damaged checkpoint
    bad = []
    for step in reversed(self.all_steps()):
      problem = self.verify(step) or self._check_shapes(step, abstract_state)
      if problem is None:
        try:
          restored = self._restore(step, abstract_state, data_iterator)
        except Exception as e:  # orbax, tensorstore and grain raise many kinds
          if "RESOURCE_EXHAUSTED" in str(e):  # the devices are full: not a damaged checkpoint
            raise
          problem = f"restoring it failed: {type(e).__name__}: {_first_line(e)}"
      if problem is None:
        for b in bad:
          self._quarantine(b)
        if bad:
          self.manager.reload()
          warn(f"resuming from checkpoint {step}; the newer ones were moved to "
               f"{self.directory}.corrupt/")
        return restored
      warn(f"warning: checkpoint {step} in {self.directory} is unusable: {problem}")
      bad.append(step)
    if bad:
      raise CheckpointError(
          f"no usable checkpoint in {self.directory} (tried steps "
          f"{', '.join(map(str, bad))}; see the warnings above); nothing was changed. To "
          "start from scratch, move that directory away")
    return None

  def verify(self, step: int) -> str | None:
    """What is wrong with checkpoint `step`'s files, per its digest; None if nothing.

    A checkpoint without a digest (one written before digests, or whose
    process was killed between the save and its digest) passes: orbax's own
    checks at restore are all it gets.
    """
    if self.remote:
      return None
    path = self._path(step)
    try:
      with open(os.path.join(path, DIGEST)) as f:
        expected = json.load(f)["files"]
    except FileNotFoundError:
      return None
    except (OSError, ValueError, KeyError) as e:
      return f"its digest {DIGEST} is unreadable ({type(e).__name__}: {_first_line(e)})"
    for name, (size, sha) in sorted(expected.items()):
      file = os.path.join(path, name)
      if not os.path.isfile(file):
        return f"{name} is missing"
      actual = os.path.getsize(file)
      if actual != size:
        return f"{name} has {actual} bytes, {size} when saved (truncated or overwritten)"
      if _sha256(file) != sha:
        return f"{name} has different bytes than when it was saved (corrupted)"
    return None

  def _check_shapes(self, step, abstract_state) -> str | None:
    """Raises ConfigError if the saved arrays' names or shapes differ from `abstract_state`'s."""
    try:
      saved_shapes = _shapes(_saved_tree(self.directory, step))
    except Exception as e:
      return f"its metadata is unreadable ({type(e).__name__}: {_first_line(e)})"
    wanted = _shapes(abstract_state)
    for name in sorted(set(saved_shapes) | set(wanted), key=lambda n: (n[:7] != "params/", n)):
      if saved_shapes.get(name) != wanted.get(name):
        have, need = saved_shapes.get(name, "no array"), wanted.get(name, "no array")
        raise config_lib.ConfigError(
            f"checkpoint {step} in {self.directory} has shape {have} for {name} but the "
            f"config needs {need}: the model or optimizer changed, so the run cannot resume "
            "from these checkpoints; use a new --workdir")
    return None

  def _quarantine(self, step):
    target = epath.Path(self.directory + ".corrupt") / str(step)
    target.rmtree(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    epath.Path(self._path(step)).rename(target)

  def _path(self, step) -> str:
    return os.path.join(self.directory, str(step))

  def _write_pending_digest(self):
    if self._undigested is None:
      return
    step = self._undigested
    with self._writing(step):
      self.manager.wait_until_finished()
      self._undigested = None
      path = self._path(step)
      if self.remote or jax.process_index() != 0 or not os.path.isdir(path):
        return
      files = {rel: [os.path.getsize(f), _sha256(f)]
               for root, _, names in os.walk(path)
               for f in (os.path.join(root, n) for n in names)
               if (rel := os.path.relpath(f, path)) != DIGEST}
      records.write_json(os.path.join(path, DIGEST), {"files": files}, indent=0)

  @contextlib.contextmanager
  def _writing(self, step: int):
    """Turns a failure to save `step` into CheckpointSaveError, once what it left is removed."""
    try:
      yield
    except Exception as e:
      self._undigested, self._failed = None, True
      self._settle()
      self._remove_partial(step)
      raise CheckpointSaveError(self._failure(step, e)) from e

  def _settle(self):
    """Waits for the other writers of a failed save: orbax reports the first failure while
    they still write, and what they write must be removed too. They are the threads of
    orbax's commit futures (orbax's own Thread class); a minute each at most."""
    for t in threading.enumerate():
      if t is not threading.current_thread() and type(t).__module__.startswith("orbax"):
        t.join(timeout=60)

  def _remove_partial(self, step: int):
    """Removes the temporary directory of a failed save of `step` (and a half-written digest)."""
    directory = epath.Path(self.directory)
    for tmp in directory.glob(f"{step}.orbax-checkpoint-tmp*"):
      if tmp.is_dir():
        tmp.rmtree(missing_ok=True)
      else:
        tmp.unlink(missing_ok=True)
    digest_tmp = directory / str(step) / (DIGEST + ".tmp")
    if digest_tmp.exists():
      digest_tmp.unlink(missing_ok=True)

  def _failure(self, step: int, e: Exception) -> str:
    """The one-line message of a failed save: what failed, what is left, and the fix."""
    if isinstance(e, OSError) and e.strerror:
      why = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    else:
      why = f"{type(e).__name__}: {_first_line(e)}"
    complete = sorted(int(p.name) for p in epath.Path(self.directory).iterdir()
                      if p.name.isdigit()) if epath.Path(self.directory).is_dir() else []
    last = (f"the last complete checkpoint is {complete[-1]}" if complete else
            "there is no complete checkpoint")
    code = getattr(e, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e):
      fix = (f"free space under {self.directory} (or set checkpoint.root elsewhere), then run "
             "the same command to resume")
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
      fix = f"make {self.directory} writable, then run the same command to resume"
    else:
      fix = "once the cause is fixed, run the same command to resume"
    return (f"saving checkpoint {step} in {self.directory} failed ({why}); its half-written "
            f"files were removed and {last}; {fix}")

  def poll(self):
    """Completes a save that has finished in the background: its digest, or its error."""
    if self._undigested is not None and not self.manager.is_saving_in_progress():
      self._write_pending_digest()

  def wait_through(self, step: int):
    """Waits for the save in flight if it is of `step` or an earlier step."""
    if self._undigested is not None and self._undigested <= step:
      self._write_pending_digest()

  def wait(self):
    self._write_pending_digest()
    self.manager.wait_until_finished()

  def close(self):
    if self._failed:  # the failure was raised already; orbax would raise it again
      with contextlib.suppress(Exception):
        self.manager.close()
      return
    self.wait()
    self.manager.close()


def latest_checkpoint(path: str) -> tuple[str, int]:
  """(checkpoints directory, latest step) of a workdir or of its checkpoints/ directory.

  Raises FileNotFoundError naming the path if there is no checkpoint.
  """
  path = absolute(path)
  for directory in (os.path.join(path, "checkpoints"), path):
    if epath.Path(directory).is_dir():
      manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
      step = manager.latest_step()
      manager.close()
      if step is not None:
        return directory, step
  raise FileNotFoundError(f"no checkpoint in {path} or {os.path.join(path, 'checkpoints')}")


def saved_param_keys(path: str) -> set[str]:
  """The top-level parameter entries ("embed", "layers", "lora", ...) of the latest
  checkpoint under `path` (FileNotFoundError if there is none)."""
  return set(_saved_tree(*latest_checkpoint(path))["params"])


def _saved_tree(directory: str, step: int):
  """The metadata of checkpoint `step`'s arrays (shapes and dtypes), as the state's tree."""
  path = epath.Path(directory) / str(step) / "state"
  return ocp.StandardCheckpointHandler().metadata(path).tree


def check_init_from(path: str, m) -> None:
  """Raises a one-line ValueError or FileNotFoundError if `path` cannot start model `m`.

  `path` is an fmjax workdir (or its checkpoints/ directory), or a Hugging Face
  directory (config.json and safetensors weights; see fmjax/hf/files.py), which
  must hold the model `m` describes.
  """
  if hf.is_hf_dir(path):
    hf.check(path, m)
  else:
    latest_checkpoint(path)


def restore_params(path: str, abstract_params, m=None, step: int | None = None):
  """The parameters of checkpoint `step` (default: the latest) under `path`, onto
  `abstract_params`' shardings.

  Only the parameters are read (not the optimizer state or the data position),
  so the checkpoint may come from a run with another optimizer or mesh; the
  parameter shapes must match. A Hugging Face directory is read with
  fmjax.hf.files (model config `m` needed).
  """
  if hf.is_hf_dir(path):
    return hf.load_params(os.path.expanduser(path), m, abstract_params)
  directory, latest = latest_checkpoint(path)
  target = {"params": abstract_params}
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False)) as m:
    restored = m.restore(latest if step is None else step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))
  return restored["state"]["params"]


@jax.jit
def _finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def run_directory(workdir: str, root: str = "") -> str:
  """Where the checkpoints of the run in `workdir` live: <workdir>/checkpoints, or under `root`.

  With a root (a local path or a URL such as gs://bucket/fmjax), the workdir's
  path is repeated under it: runs/x -> gs://bucket/fmjax/runs/x/checkpoints; an
  absolute workdir loses its leading '/'. So each run of a sweep gets its own.
  """
  if not root:
    return os.path.join(workdir, "checkpoints")
  rel = os.path.normpath(os.path.expanduser(workdir)).lstrip("/")
  if rel == ".." or rel.startswith("../"):
    raise config_lib.ConfigError(f"--workdir={workdir} leaves the current directory, so it has "
                                 f"no place under checkpoint.root={root}; give it absolute")
  return f"{root.rstrip('/')}/{rel}/checkpoints"


def is_url(path: str) -> bool:
  return "://" in path


def absolute(path: str) -> str:
  """orbax needs absolute paths: a local one made absolute, a URL (gs://...) as it is."""
  return path if is_url(path) else os.path.abspath(os.path.expanduser(path))


def _all_finite(tree) -> bool:
  leaves = jax.tree.leaves(tree)
  if all(isinstance(x, (np.ndarray, np.generic)) for x in leaves):  # on the host: no copies
    return all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.inexact))
  return bool(jax.device_get(_finite(tree)))


def _shapes(tree) -> dict[str, tuple]:
  """'params/layers/wq' -> shape, for arrays or their metadata (namedtuples as dicts)."""
  return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return (text.splitlines() or [""])[0][:300]

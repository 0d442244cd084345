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

The directory may be a URL (gs://bucket/run/checkpoints; see checkpoint.root
and `run_directory`), which every host of a pod can reach: orbax reads and
writes it through tensorstore and etils.epath (which needs gcsfs for gs://).
Digests are kept only for local directories: hashing a remote checkpoint would
read it all back, and the object store checksums what it stores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from fmjax import config as config_lib
from fmjax.hf import files as hf
from fmjax.train import records

DIGEST = "fmjax_digest.json"


class CheckpointError(RuntimeError):
  """The workdir has checkpoints, and none of them can be restored."""


class NonFiniteCheckpoint(RuntimeError):
  """A state with NaN or Inf values was about to be checkpointed."""


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

  def __enter__(self):
    return self

  def __exit__(self, *exc):
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
    self.manager.wait_until_finished()
    step, self._undigested = self._undigested, None
    path = self._path(step)
    if self.remote or jax.process_index() != 0 or not os.path.isdir(path):
      return
    files = {rel: [os.path.getsize(f), _sha256(f)]
             for root, _, names in os.walk(path) for f in (os.path.join(root, n) for n in names)
             if (rel := os.path.relpath(f, path)) != DIGEST}
    records.write_json(os.path.join(path, DIGEST), {"files": files}, indent=0)

  def wait(self):
    self._write_pending_digest()
    self.manager.wait_until_finished()

  def close(self):
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

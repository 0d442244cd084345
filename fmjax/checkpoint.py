"""Checkpoints: train state and data-iterator position, saved together.

An orbax CheckpointManager writes each step asynchronously and keeps the last
`checkpoint.keep`. A restore takes its target shardings from the caller, so a
run can resume on a mesh of a different shape.
"""

from __future__ import annotations

import os

import grain
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory, keep: int, async_save: bool = True):
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),  # orbax requires absolute paths
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator=None, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state, data_iterator=None):
    """State restored onto the shardings in `abstract_state`; the iterator in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def latest_checkpoint(path: str) -> tuple[str, int]:
  """(checkpoints directory, latest step) of a workdir or of its checkpoints/ directory.

  Raises FileNotFoundError naming the path if there is no checkpoint.
  """
  path = os.path.abspath(os.path.expanduser(path))
  for directory in (os.path.join(path, "checkpoints"), path):
    if os.path.isdir(directory):
      manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
      step = manager.latest_step()
      manager.close()
      if step is not None:
        return directory, step
  raise FileNotFoundError(f"no checkpoint in {path} or {os.path.join(path, 'checkpoints')}")


def restore_params(path: str, abstract_params):
  """The parameters of the latest checkpoint under `path`, onto `abstract_params`' shardings.

  Only the parameters are read (not the optimizer state or the data position),
  so the checkpoint may come from a run with another optimizer or mesh; the
  parameter shapes must match.
  """
  directory, step = latest_checkpoint(path)
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
  target = {"params": abstract_params}
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True)))
  manager.close()
  return restored["state"]["params"]

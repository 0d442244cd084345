"""Train an experiment file.

  python -m fmjax.main --config=experiments/pretrain_tiny.py[:arg] --workdir=DIR \\
      [--config.train.steps=N ...] [--print_config]

Re-running the same command on the same workdir resumes from its latest
checkpoint. The config is checked before anything is compiled or written: a bad
field stops the run with a one-line error and leaves the workdir untouched.
`--print_config` (or `--dry_run`) prints the resolved config, its parameters
per module, FLOPs per token and memory per device, and exits without training
or writing anything. Exit statuses: fmjax/errors.py (0 done, 1 a failure at
run time, 2 bad command line or config). SIGTERM, or the end of --max_runtime,
stops the run after its current step with a checkpoint and exit status 0; the
same command resumes it.

Several processes (one per host) run the same command; see fmjax.runtime.distributed
for --coordinator_address, --num_processes and --process_id, and
fmjax.launch_local for several processes on one machine.
"""

from __future__ import annotations

import math
import sys

from absl import flags

from fmjax import errors
from fmjax.errors import ConfigError
from fmjax.runtime import cli
from fmjax.runtime.cli import UsageError
from fmjax.train.workdir import RESUMABLE_CHANGES, config_changes  # noqa: F401  (part of the CLI's API)

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and records.")
_MAX_RUNTIME = flags.DEFINE_string(
    "max_runtime", None, "Wall-clock budget (90m, 2h, 1h30m, 3600): when it runs out the run "
    "saves a checkpoint and exits 0, as on SIGTERM. Sets train.max_runtime.")
_PROFILE_STEPS = flags.DEFINE_string(
    "profile_steps", None, "Steps to trace with jax.profiler, e.g. 10:13 (steps 10, 11, 12), "
    "into WORKDIR/profile for TensorBoard or Perfetto. Sets train.profile_steps.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir whose saved config differs in fields "
    "that change the run's results.")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the resolved config, the parameters per module (total and "
    "active), FLOPs per token and memory per device, then exit: nothing is trained or "
    "written, and --workdir is not needed.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "The same as --print_config.")


def parse_flags(argv):
  """(config, workdir) from the command line, or a one-line UsageError."""
  cli.parse_flags(argv, __doc__)
  if not _WORKDIR.value and not (_PRINT_CONFIG.value or _DRY_RUN.value):
    raise UsageError("--workdir is required, e.g. --workdir=runs/my_run")
  cfg = cli.load_config()
  if _MAX_RUNTIME.value is not None:
    cfg.train.max_runtime = _MAX_RUNTIME.value
  if _PROFILE_STEPS.value is not None:
    cfg.train.profile_steps = _PROFILE_STEPS.value
  return cfg, _WORKDIR.value


def main(argv=None) -> int:
  return errors.run(_main, argv)


def _main(argv) -> int:
  argv = list(sys.argv if argv is None else argv)
  cfg, workdir = parse_flags(argv)
  n_devices = cli.start_jax(cfg)  # jax starts here: fake CPU devices and XLA flags are set first
  if _PRINT_CONFIG.value or _DRY_RUN.value:
    from fmjax import validate  # as in train: the command restarts itself before heavy imports
    print(describe(validate.resolve(cfg, n_devices)))
    return errors.OK
  return train(cfg, workdir, _ALLOW_CONFIG_CHANGE.value)


def train(cfg, workdir: str, allow_config_change: bool = False) -> int:
  """Resolves, validates and trains `cfg`; returns the exit status, printing a one-line
  error if not 0."""
  # Imported here, not at the top: the command restarts itself (host_malloc.reexec)
  # before anything heavy is imported.
  import jax

  from fmjax import validate
  from fmjax.train import loop

  try:
    cfg = validate.resolve(cfg, jax.device_count())
    loop.run(cfg, workdir, allow_config_change=allow_config_change)
  except ConfigError as e:  # raised before anything in the workdir is written
    return errors.report(f"config error: {e}", errors.USAGE)
  except loop.RUN_ERRORS as e:
    return errors.report(f"error: {e}", errors.FAILURE)
  return errors.OK


# -- --print_config ---------------------------------------------------------------------

MODULES = ("embedding", "attention", "MLP", "experts (routed)", "experts (shared)", "router",
           "norms", "unembedding", "multi-token prediction", "LoRA adapters", "objective head")


def module_of(name: str, axes) -> str:
  """The row of the parameter table that parameter `name` (dotted) belongs to."""
  top, leaf = name.split(".")[0], name.split(".")[-1]
  if top in ("embed", "unembed"):
    return "embedding" if top == "embed" else "unembedding"
  if top in ("mtp", "lora", "head"):
    return {"mtp": "multi-token prediction", "lora": "LoRA adapters", "head": "objective head"}[top]
  if leaf.endswith("norm"):
    return "norms"
  if leaf in ("w_gate", "w_up", "w_down"):
    return "experts (routed)" if "expert" in axes else "MLP"
  if leaf.startswith("shared_"):
    return "experts (shared)"
  if leaf.startswith("router"):
    return "router"
  return "attention"


def parameter_table(cfg) -> dict[str, tuple[int, int]]:
  """{module: (parameters, active parameters)} of `cfg`'s declarations, in MODULES order.

  Active counts what one token uses: a routed-experts weight counts its
  experts_per_token of n_routed_experts; everything else counts whole.
  """
  # Imported here, not at the top, as in train: the command restarts itself first.
  from fmjax.nn.params import leaves_with_names
  from fmjax.posttrain import plan

  rows = {}
  moe = cfg.model.moe
  for name, p in leaves_with_names(plan.param_decls(cfg)):
    module, n = module_of(name, p.axes), math.prod(p.shape)
    active = n * moe.experts_per_token // moe.n_routed_experts if module == "experts (routed)" \
        else n
    total, act = rows.get(module, (0, 0))
    rows[module] = (total + n, act + active)
  return {m: rows[m] for m in MODULES if m in rows}


def _trained_count(cfg) -> int:
  # Imported here, not at the top, as in train: the command restarts itself first.
  from fmjax.nn.params import count
  from fmjax.posttrain import plan

  decls = plan.param_decls(cfg)
  return count({k: v for k, v in decls.items() if plan.is_trained(cfg, k)})


def _bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024 or unit == "TiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024


def memory_estimate(cfg):
  """({what: bytes per device} of the parameters, optimizer state, frozen reference (DPO)
  and one batch, the mesh), from the declarations and the config's shardings; nothing is
  allocated."""
  # Imported here, not at the top, as in train: the command restarts itself first.
  import jax

  from fmjax.nn import sharding as sharding_lib
  from fmjax.train import benchmark, state as state_lib

  s = state_lib.setup(cfg, sharding_lib.make_mesh(cfg.mesh))
  state = s.abstract_state
  out = {"parameters": benchmark.bytes_per_device(state["params"]),
         "optimizer state": benchmark.bytes_per_device(state["opt_state"])}
  if s.frozen_shardings:
    reference = {k: v for k, v in state["params"].items() if k in s.frozen_shardings["reference"]}
    out["frozen reference"] = benchmark.bytes_per_device(reference)
  batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len), jax.numpy.int32,
                               sharding=s.batch_sharding)
  out["one batch (tokens, segments, positions)"] = 3 * benchmark.bytes_per_device([batch])
  return out, s.mesh


def describe(cfg) -> str:
  """What --print_config prints for the resolved `cfg`."""
  # Imported here, not at the top, as in train: the command restarts itself first.
  from fmjax.nn import cost
  from fmjax.scaling import sizing

  lines = ["# resolved config", str(cfg).rstrip(), "", "# parameters",
           f"{'module':<24}{'parameters':>16}{'active':>16}"]
  table = parameter_table(cfg)
  for module, (total, active) in table.items():
    lines.append(f"{module:<24}{total:>16,}{active:>16,}")
  total = sum(t for t, _ in table.values())
  active = sum(a for _, a in table.values())
  lines.append(f"{'total':<24}{total:>16,}{active:>16,}")
  trained = _trained_count(cfg)
  if trained != total:
    lines.append(f"trained by the optimizer: {trained:,} (the rest are frozen)")
  m, seq_len = cfg.model, cfg.data.seq_len
  fpt = cost.flops_per_token(m, seq_len, attention="causal")
  tokens = cfg.train.steps * sizing.tokens_per_step(cfg)
  lines += ["", "# compute",
            f"FLOPs per token (training, causal attention): {fpt:.4g}",
            f"FLOPs per token (training, full attention square): "
            f"{cost.flops_per_token(m, seq_len):.4g}",
            f"tokens per step: {sizing.tokens_per_step(cfg):,}; steps: {cfg.train.steps:,}; "
            f"tokens: {tokens:,}; training FLOPs: {tokens * fpt:.4g}"]
  memory, mesh = memory_estimate(cfg)
  lines += ["", f"# memory per device ({mesh.devices.size} devices, mesh "
            + " x ".join(f"{a}={n}" for a, n in mesh.shape.items()) + ")"]
  lines += [f"{k:<40}{_bytes(v):>12}" for k, v in memory.items()]
  lines += [f"{'total (before activations)':<40}{_bytes(sum(memory.values())):>12}",
            "activations and temporaries are not included: `python -m fmjax.bench "
            "--config=... --steps=0` compiles the step and reports its peak"]
  return "\n".join(lines)


if __name__ == "__main__":
  from fmjax.runtime import host_malloc
  host_malloc.reexec()
  sys.exit(main())

"""One fmjax experiment on a Cloud TPU VM or pod slice, through `gcloud compute tpus`.

  python tools/tpu.py --name=fm1 --zone=us-east5-a --type=v5p-16 --bucket=gs://my-bucket/fmjax \
      [--spot] [--queued] [--dry_run] COMMAND [-- fmjax.main arguments]

COMMAND is one of
  create   create the VM (or, with --queued, queue a request for it; --spot for spot capacity)
  copy     put the code on every worker: `git clone`/`git pull` of --repo at --branch, or,
           with --copy=scp, a `git archive` of this checkout
  install  a virtualenv with fmjax and jax[tpu] on every worker
  run      the same `python -m fmjax.main ARGS` on every worker (--worker=all), detached,
           logging to ~/fmjax-<name>.log; checkpoints under --bucket (checkpoint.root), and
           the workdir's records (metrics, summary, plots) copied to and from
           <bucket>/records/<workdir> by worker 0, so a restarted VM resumes both
  logs     stream worker 0's log (--worker=all for all of them)
  stop     SIGTERM to the run on every worker: it saves a checkpoint and exits 0
  fetch    copy the workdir's records from the bucket to this machine
  delete   delete the VM (or the queued request and its VM)
  status   describe the VM or the queued request

--dry_run prints the commands instead of running them. jax finds the slice's
workers on its own (fmjax.runtime.distributed), so every worker runs the same command.
`run` passes --module's arguments after `--`: e.g.
  python tools/tpu.py ... run -- --config=experiments/pretrain_tiny.py --workdir=runs/x
and for a sweep, --module=fmjax.sweep with the sweep's arguments.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The TPU software version for each generation (cloud.google.com/tpu/docs/runtimes).
RUNTIME = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
           "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
CODE = "~/fmjax"  # where the code lives on each worker
METADATA = ("curl -s -H 'Metadata-Flavor: Google' http://metadata.google.internal/"
            "computeMetadata/v1/instance/attributes/agent-worker-number")


def runtime_version(accelerator: str) -> str:
  generation = accelerator.rsplit("-", 1)[0]
  if generation not in RUNTIME:
    raise SystemExit(f"tools/tpu.py: no default --version for --type={accelerator}; "
                     f"known: {', '.join(RUNTIME)}; pass --version")
  return RUNTIME[generation]


class Tpu:

  def __init__(self, a):
    self.a = a
    self.where = [f"--zone={a.zone}"] + ([f"--project={a.project}"] if a.project else [])

  def _vm(self, verb, *args):
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, self.a.name, *self.where, *args]

  def ssh(self, command: str, worker: str = "all"):
    return self._vm("ssh", f"--worker={worker}", f"--command={command}")

  def create(self):
    a = self.a
    version = a.version or runtime_version(a.type)
    if a.queued:
      return [["gcloud", "compute", "tpus", "queued-resources", "create", a.name,
               f"--node-id={a.name}", *self.where, f"--accelerator-type={a.type}",
               f"--runtime-version={version}", *(["--spot"] if a.spot else [])]]
    return [self._vm("create", f"--accelerator-type={a.type}", f"--version={version}",
                     *(["--spot"] if a.spot else []))]

  def copy(self):
    a = self.a
    if a.copy == "scp":
      tarball = f"/tmp/fmjax-{a.name}.tar.gz"
      return [["git", "-C", REPO, "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"],
              ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{a.name}:/tmp/",
               *self.where, "--worker=all"],
              self.ssh(f"mkdir -p {CODE} && tar -xzf /tmp/{os.path.basename(tarball)} -C {CODE}")]
    return [self.ssh(f"if [ -d {CODE}/.git ]; then git -C {CODE} fetch -q origin && "
                     f"git -C {CODE} checkout -q {shlex.quote(a.branch)} && "
                     f"git -C {CODE} pull -q --ff-only; "
                     f"else git clone -q --branch {shlex.quote(a.branch)} "
                     f"{shlex.quote(a.repo)} {CODE}; fi")]

  def install(self):
    return [self.ssh(f"cd {CODE} && python3 -m venv .venv && .venv/bin/pip install -q -U pip && "
                     ".venv/bin/pip install -q -e '.[tpu]'")]

  def run(self, args):
    a = self.a
    workdir = _flag(args, "workdir")
    if a.bucket:
      args = [*args, f"--config.checkpoint.root={a.bucket}"]
    python = shlex.join([".venv/bin/python", "-m", a.module, *args])
    log, pid = f"~/fmjax-{a.name}.log", f"~/fmjax-{a.name}.pid"
    lines = ["set -u", f"cd {CODE}", f"worker=$({METADATA} || echo 0)"]
    sync = ""
    if a.bucket and workdir:
      records = f"{a.bucket.rstrip('/')}/records/{workdir.strip('/')}"
      q_records, q_workdir = shlex.quote(records), shlex.quote(workdir)
      # Every worker starts from the saved records, so all of them see the same
      # finished runs (a sweep skips them); only worker 0 writes records.
      lines += [f"mkdir -p {q_workdir}",
                f"gcloud storage rsync -r {q_records} {q_workdir} >/dev/null 2>&1 || true"]
      sync = f"gcloud storage rsync -r {q_workdir} {q_records} >/dev/null 2>&1"
    # Detached, so a dropped ssh connection does not stop it; `trap true TERM` lets the
    # shell outlive a SIGTERM to copy the records one last time after fmjax has saved.
    job = ["trap true TERM"]
    if sync:
      job.append(f'if [ "$worker" = 0 ]; then (while sleep 60; do {sync}; done) & syncer=$!; fi')
    job += [f"{python}", "rc=$?"]
    if sync:
      job.append(f'if [ "$worker" = 0 ]; then kill $syncer 2>/dev/null; {sync}; fi')
    job.append("exit $rc")
    script = "; ".join(job)
    lines.append(f"export worker; setsid nohup bash -c {shlex.quote(script)} > {log} 2>&1 "
                 f"< /dev/null & echo $! > {pid}")
    lines.append(f"echo \"worker $worker: started, log {log}\"")
    return [self.ssh("; ".join(lines))]

  def logs(self):
    return [self.ssh(f"tail -n +1 -F ~/fmjax-{self.a.name}.log", worker=self.a.worker)]

  def stop(self):
    pid = f"~/fmjax-{self.a.name}.pid"
    # The job's session: fmjax and its shell; fmjax saves, then the shell copies the records.
    return [self.ssh(f"kill -TERM -- -$(cat {pid})")]

  def fetch(self, args):
    workdir = _flag(args, "workdir")
    if not (self.a.bucket and workdir):
      raise SystemExit("tools/tpu.py fetch needs --bucket and the run's --workdir after --")
    records = f"{self.a.bucket.rstrip('/')}/records/{workdir.strip('/')}"
    return [["mkdir", "-p", workdir], ["gcloud", "storage", "rsync", "-r", records, workdir]]

  def delete(self):
    if self.a.queued:
      return [["gcloud", "compute", "tpus", "queued-resources", "delete", self.a.name,
               *self.where, "--force", "--quiet"]]
    return [self._vm("delete", "--quiet")]

  def status(self):
    if self.a.queued:
      return [["gcloud", "compute", "tpus", "queued-resources", "describe", self.a.name,
               *self.where]]
    return [self._vm("describe")]


def _flag(args, name):
  for arg in args:
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
  return None


def _default_repo():
  try:
    return subprocess.run(["git", "-C", REPO, "remote", "get-url", "origin"], check=True,
                          capture_output=True, text=True).stdout.strip()
  except (subprocess.CalledProcessError, FileNotFoundError):
    return ""


def _default_branch():
  try:
    return subprocess.run(["git", "-C", REPO, "rev-parse", "--abbrev-ref", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
  except (subprocess.CalledProcessError, FileNotFoundError):
    return "main"


COMMANDS = ("create", "copy", "install", "run", "logs", "stop", "fetch", "delete", "status")


def commands(argv) -> list[list[str]]:
  """The command lines for `argv` (this tool's arguments)."""
  ours, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
      else (argv, [])
  p = argparse.ArgumentParser(prog="python tools/tpu.py", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n", 2)[2])
  p.add_argument("command", choices=COMMANDS)
  p.add_argument("--name", required=True, help="the TPU VM's (and queued request's) name")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", default="")
  p.add_argument("--type", default="v5p-16", help="accelerator type, e.g. v5p-16, v4-8")
  p.add_argument("--version", default="", help="TPU software version (default: per type)")
  p.add_argument("--spot", action="store_true", help="spot capacity (can be preempted)")
  p.add_argument("--queued", action="store_true", help="a queued-resources request")
  p.add_argument("--bucket", default="", help="gs:// root for checkpoints and records")
  p.add_argument("--copy", choices=("git", "scp"), default="git")
  p.add_argument("--repo", default=None, help="git URL to clone (default: this checkout's "
                 "origin)")
  p.add_argument("--branch", default=None, help="branch to check out (default: this one's)")
  p.add_argument("--module", default="fmjax.main", help="what `run` starts on every worker")
  p.add_argument("--worker", default="0", help="`logs` from this worker (or all)")
  p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  a = p.parse_args(ours)
  if a.bucket and not a.bucket.startswith("gs://"):
    p.error(f"--bucket={a.bucket} must be a gs:// URL")
  a.repo = a.repo if a.repo is not None else _default_repo()
  a.branch = a.branch or _default_branch()
  if a.command == "copy" and a.copy == "git" and not a.repo:
    p.error("copy: this checkout has no origin remote; pass --repo or use --copy=scp")
  if a.command == "run" and not rest:
    p.error("run: give fmjax's arguments after --, e.g. -- --config=FILE --workdir=DIR")
  tpu = Tpu(a)
  make = getattr(tpu, a.command)
  return (make(rest) if a.command in ("run", "fetch") else make()), a.dry_run


def _fetched_nothing(line) -> str | None:
  """After `fetch`'s rsync (`line`): why nothing came, if the workdir holds no file."""
  records, workdir = line[-2], line[-1]
  if any(files for _, _, files in os.walk(workdir)):
    return None
  return (f"fmjax: nothing came from {records}: it holds no records yet (worker 0 copies "
          f"them every minute while the run lasts), or --workdir={workdir} is not the run's")


def main(argv=None) -> int:
  lines, dry_run = commands(sys.argv[1:] if argv is None else argv)
  for line in lines:
    print(shlex.join(line), flush=True)
    if not dry_run:
      result = subprocess.run(line)
      if result.returncode:
        return result.returncode
  if not dry_run and lines and lines[-1][:3] == ["gcloud", "storage", "rsync"]:  # fetch
    if problem := _fetched_nothing(lines[-1]):
      print(problem, file=sys.stderr)
      return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())

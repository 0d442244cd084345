"""Huge pages for malloc: which environments get the tunable, and the restart itself."""

import os
import subprocess
import sys

import pytest

from fmjax.runtime import host_malloc


def test_tunable_is_added_once_and_kept_beside_others():
  assert host_malloc.tunables_with_hugepages({}) == "glibc.malloc.hugetlb=1"
  assert host_malloc.tunables_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == \
      "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  # A value the user chose, any value, is theirs; so is opting out.
  assert host_malloc.tunables_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
  assert host_malloc.tunables_with_hugepages({"FMJAX_HUGEPAGES": "0"}) is None


def test_thp_mode_reads_the_bracketed_word(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert host_malloc.thp_mode(str(path)) == "madvise"
  assert host_malloc.thp_mode(str(tmp_path / "missing")) == "never"


def test_no_restart_without_transparent_huge_pages(monkeypatch):
  monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("must not restart"))
  host_malloc.reexec(argv=["python"], environ={}, thp="never")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_the_process_restarts_once_with_the_tunable():
  code = ("import os; from fmjax.runtime import host_malloc; print('start', flush=True); "
          "host_malloc.reexec(thp='madvise'); print(os.environ['GLIBC_TUNABLES'])")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FMJAX_HUGEPAGES")}
  env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(host_malloc.__file__))))  # the directory holding fmjax/
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=60, check=True).stdout.split()
  assert out == ["start", "start", "glibc.malloc.hugetlb=1"]

"""Run folders (downloaded forget sets: personal data) never outlive the process that made them for long."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from worker.runs import remove_stale_run_folders, run_folder_prefix


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def make(parent, name: str):
    folder = parent / name
    (folder / "sources").mkdir(parents=True)
    (folder / "sources" / "face.jpg").write_bytes(b"personal data")
    return folder


def test_a_dead_process_run_folder_on_this_host_is_removed_and_nothing_else(tmp_path):
    host = socket.gethostname()
    dead = make(tmp_path, f"lethe-run-{host}-{dead_pid()}-abc123_x")
    mine = make(tmp_path, f"{run_folder_prefix()}q9w8e7r6")  # this process: alive
    other_host = make(tmp_path, f"lethe-run-some-other-host-{dead_pid()}-zz11yy22")  # its PIDs are not ours to judge
    unrelated = [make(tmp_path, "lethe-run-abcd1234"), make(tmp_path, "lethe-api-load-x")]

    assert remove_stale_run_folders(tmp_path) == [dead]

    assert not dead.exists()
    assert all(f.exists() for f in [mine, other_host, *unrelated])


def test_run_folders_are_named_by_host_and_process():
    assert run_folder_prefix() == f"lethe-run-{socket.gethostname()}-{os.getpid()}-"

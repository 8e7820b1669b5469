"""Run folders (downloaded forget sets: personal data) never outlive the run that made them for long."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from worker.run_folders import RUN_LOCK, make_run_folder, remove_stale_run_folders, run_folder_prefix


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def make(parent, name: str, lock: bool = True):
    folder = parent / name
    (folder / "sources").mkdir(parents=True)
    (folder / "sources" / "face.jpg").write_bytes(b"personal data")
    if lock:
        (folder / RUN_LOCK).touch()  # a lock file nobody holds: its run died
    return folder


def test_folders_no_live_run_holds_on_this_host_are_removed_and_nothing_else(tmp_path):
    host = socket.gethostname()
    dead_run = make(tmp_path, f"lethe-run-{host}-{dead_pid()}-abc123_x")
    # A restarted container reuses PIDs: this process is alive, but holds no lock on the folder.
    reused_pid = make(tmp_path, f"lethe-run-{host}-{os.getpid()}-reused01")
    unlocked_dead = make(tmp_path, f"lethe-run-{host}-{dead_pid()}-old00001", lock=False)
    unlocked_alive = make(tmp_path, f"{run_folder_prefix()}q9w8e7r6", lock=False)  # just made, not locked yet
    other_host = make(tmp_path, f"lethe-run-some-other-host-{dead_pid()}-zz11yy22")  # not ours to judge
    absurd_pid = make(tmp_path, f"lethe-run-{host}-99999999999999999999-zz", lock=False)
    unrelated = [make(tmp_path, "lethe-run-abcd1234"), make(tmp_path, "lethe-api-load-x")]

    assert sorted(remove_stale_run_folders(tmp_path)) == sorted([dead_run, reused_pid, unlocked_dead])

    assert all(f.exists() for f in [unlocked_alive, other_host, absurd_pid, *unrelated])


def test_a_live_run_s_folder_is_kept_even_when_another_process_space_shares_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    folder, lock = make_run_folder()
    try:
        # Seen from a process that cannot see the owner's PID (another container), it is still held.
        monkeypatch.setattr("worker.run_folders.process_alive", lambda pid: False)
        assert remove_stale_run_folders(tmp_path) == [] and folder.exists()
    finally:
        os.close(lock)
    assert remove_stale_run_folders(tmp_path) == [folder]


def test_run_folders_are_named_by_host_and_process():
    assert run_folder_prefix() == f"lethe-run-{socket.gethostname()}-{os.getpid()}-"

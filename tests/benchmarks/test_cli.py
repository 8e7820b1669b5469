"""benchmarks/cli.py: a benchmark refuses a bad argument before it runs, never truncates its figures,
and cleans up when stopped."""

from __future__ import annotations

import argparse
import os
import signal
import time

import pytest

from benchmarks import request_latency, scale, speed, throughput
from benchmarks.cli import count, database_url, entry_point, output_path, seconds, writable_folder, write_json


@pytest.mark.parametrize(("parse", "text"), [(count(1), "0"), (count(0), "-1"), (count(1), "two"),
                                             (seconds, "0"), (seconds, "-1"), (seconds, "nan"), (seconds, "inf"),
                                             (database_url, "notaurl")])
def test_a_bad_value_is_refused_by_its_type(parse, text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse(text)


def test_good_values_pass_their_types():
    assert count(0)("0") == 0 and seconds("0.5") == 0.5
    assert database_url("postgresql+psycopg://postgres@127.0.0.1:1/postgres").endswith("/postgres")


def test_an_output_path_is_a_file_in_a_folder_this_process_can_write(tmp_path):
    assert output_path(str(tmp_path / "new" / "figures.json")) == tmp_path / "new" / "figures.json"
    assert (tmp_path / "new").is_dir()
    for bad in (str(tmp_path), "/proc/figures.json", "/proc/lethe/figures.json"):
        with pytest.raises(argparse.ArgumentTypeError):
            output_path(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="cannot create"):
        writable_folder("/proc/lethe-cache")


def test_a_failed_write_leaves_the_figures_already_there(tmp_path):
    out = tmp_path / "figures.json"
    out.write_text('{"kept": true}\n')
    with pytest.raises(TypeError):
        write_json(out, {"figure": object()})
    assert out.read_text() == '{"kept": true}\n' and list(tmp_path.iterdir()) == [out]
    write_json(out, {"figure": 1})
    assert out.read_text() == '{\n  "figure": 1\n}\n'


def test_sigterm_unwinds_the_run_like_ctrl_c(capsys):
    cleaned = []

    @entry_point("bench")
    def main() -> int:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            return 0
        finally:
            cleaned.append("stopped what it started")

    assert main() == 130 and cleaned == ["stopped what it started"]
    assert capsys.readouterr().err == "bench: interrupted; what it started was cleaned up\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the run's, not the process's


REFUSED = [
    (request_latency, ["--backends", ","], "--backends takes"),
    (request_latency, ["--forget-images", "-1"], "argument --forget-images"),
    (request_latency, ["--eval-per-class", "0"], "argument --eval-per-class"),
    (request_latency, ["--poll-seconds", "-1"], "argument --poll-seconds"),
    (request_latency, ["--threads", "-2"], "argument --threads"),
    (request_latency, ["--postgres", "notaurl"], "is not a database URL"),
    (speed, ["--forget-images", "0"], "argument --forget-images"),
    (speed, ["--threads", "-1"], "argument --threads"),
    (speed, ["--tuned-from", "/nonexistent"], "no such folder"),
    (scale, ["--samples", "0"], "argument --samples"),
    (scale, ["--postgres", "notaurl"], "is not a database URL"),
    (throughput, ["--cache", "/proc/lethe-cache"], "argument --cache"),
    (throughput, ["--workers", "1", "0"], "argument --workers"),
    (throughput, ["--timeout", "-5"], "argument --timeout"),
]


@pytest.mark.parametrize(("script", "argv", "message"), REFUSED,
                         ids=[f"{s.__name__.split('.')[-1]} {' '.join(a)}" for s, a, _ in REFUSED])
def test_a_bad_argument_is_refused_before_the_run_and_the_figures_stay(script, argv, message, tmp_path, capsys):
    out = tmp_path / "figures.json"
    out.write_text("earlier figures\n")
    with pytest.raises(SystemExit) as stopped:
        script.main([*argv, "--out", str(out)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert out.read_text() == "earlier figures\n"


@pytest.mark.parametrize("script", [request_latency, speed, scale, throughput])
def test_an_output_nobody_can_write_is_refused_before_the_run(script, capsys):
    with pytest.raises(SystemExit) as stopped:
        script.main(["--out", "/proc/figures.json"])
    assert stopped.value.code == 2 and "argument --out" in capsys.readouterr().err

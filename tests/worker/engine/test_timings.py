"""Timings: each phase's own seconds (nested phases apart), its count, in the order phases started."""

import time

import pytest

from worker.engine.timings import Timings


def test_nested_phases_are_named_by_their_path_and_their_seconds_are_not_counted_twice():
    timings = Timings()
    with timings.phase("run"):
        time.sleep(0.02)
        for _ in range(3):
            with timings.phase("step"):
                time.sleep(0.01)
    found = timings.to_dict()
    assert list(found) == ["run", "run / step"]
    assert found["run / step"]["count"] == 3 and found["run"]["count"] == 1
    assert found["run / step"]["seconds"] == pytest.approx(0.03, abs=0.02)
    assert found["run"]["seconds"] == pytest.approx(0.02, abs=0.015)  # its own time, without the steps'
    assert timings.total_seconds == pytest.approx(0.05, abs=0.03)


def test_a_phase_that_raises_is_still_counted_and_the_next_phase_is_not_nested_in_it():
    timings = Timings()
    with pytest.raises(ValueError):
        with timings.phase("fetch"):
            raise ValueError("unreachable store")
    with timings.phase("settle"):
        pass
    assert list(timings.to_dict()) == ["fetch", "settle"]
    assert timings.to_dict()["fetch"]["count"] == 1


def test_the_same_name_under_two_parents_is_two_phases():
    timings = Timings()
    for parent in ("check", "run"):
        with timings.phase(parent), timings.phase("step"):
            pass
    assert list(timings.to_dict()) == ["check", "check / step", "run", "run / step"]

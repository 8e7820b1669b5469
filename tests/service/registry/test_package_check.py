"""An uploaded package is checked in a child process with a time and memory limit: a hostile card is a
422 in bounded time, and the API answers other calls meanwhile."""

from __future__ import annotations

import json
import threading
import time

import pytest
from PIL import Image


from service.registry.package_check import ChecksBusy, PackageLimits, PackageRejected, _in_child, check_package, check_sets
from worker.engine.images import ReadLimits
from tests.service.registry.test_registry_api import assert_problem, card_with, post_model
from tests.service_fixtures import request_body

LIMITS = PackageLimits(max_parameters=10**9, seconds=60, memory_bytes=4 * 1024**3)


def test_a_card_of_100000_nested_arrays_is_a_422_not_a_recursion_error(client, admin, digits_model):
    card = b"[" * 100_000 + b"]" * 100_000
    problem = assert_problem(post_model(client, admin, card=card, package=digits_model), 422, "invalid_model_package")
    assert "nested too deeply" in problem["detail"]


def test_a_card_asking_for_more_parameters_than_allowed_is_refused_before_anything_is_allocated(
        client, admin, digits_model):
    card = card_with(digits_model, kwargs__embed_dim=100_000, kwargs__num_heads=4)
    started = time.monotonic()
    problem = assert_problem(post_model(client, admin, card=card, package=digits_model), 422, "invalid_model_package")
    assert "LETHE_MAX_MODEL_PARAMETERS" in problem["detail"] and "parameters" in problem["detail"]
    assert time.monotonic() - started < 30  # counted on the meta device: 4 blocks of 10^10 weights, no memory


def test_a_card_of_100000_blocks_is_refused_as_soon_as_its_network_outgrows_the_weights(client, admin,
                                                                                      digits_model):
    # Building 100,000 blocks takes minutes even on the meta device (it ran 11 minutes in the API once):
    # the build stops once it has more parameter tensors than the weights file could fill.
    card = card_with(digits_model, kwargs__depth=100_000)
    started = time.monotonic()
    problem = assert_problem(post_model(client, admin, card=card, package=digits_model), 422, "invalid_model_package")
    assert "more parameter tensors than" in problem["detail"]
    assert time.monotonic() - started < 30


def test_a_card_larger_than_1_mib_is_refused_whole_not_cut(client, admin, digits_model):
    card = json.loads(card_with(digits_model))
    card["padding"] = "x" * (1 << 20)
    problem = assert_problem(post_model(client, admin, card=json.dumps(card).encode(), package=digits_model), 422,
                             "invalid_model_package")
    assert "larger than 1048576 bytes" in problem["detail"]


def test_a_check_that_runs_past_its_time_is_stopped_and_refused(digits_model):
    card = card_with(digits_model)
    with pytest.raises(PackageRejected, match="LETHE_PACKAGE_CHECK_SECONDS"):
        check_package(card, digits_model / "model.safetensors", PackageLimits(10**9, seconds=0.01, memory_bytes=4 << 30))


def test_a_check_that_needs_more_memory_than_allowed_is_refused(digits_model, tmp_path):
    for i in range(3):  # 49 MP each, under the per-image limit: 147 MB decoded, from a few KB of PNG
        (tmp_path / "val" / "3").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (7000, 7000), (i, 0, 0)).save(tmp_path / "val" / "3" / f"{i}.png")
    card = json.loads(card_with(digits_model))
    with pytest.raises(PackageRejected, match="LETHE_PACKAGE_CHECK_MEMORY_BYTES"):
        check_sets(card, {"eval_set": tmp_path / "val"}, PackageLimits(10**9, seconds=120, memory_bytes=256 << 20),
                   ReadLimits())


def test_more_checks_at_once_than_allowed_are_turned_away_not_queued():
    limits = PackageLimits(10**9, seconds=30, memory_bytes=1 << 30, at_once=1)
    busy = threading.Thread(target=_in_child, args=(time.sleep, (3,), limits))
    busy.start()
    time.sleep(1.0)
    try:
        with pytest.raises(ChecksBusy, match="LETHE_PACKAGE_CHECKS_AT_ONCE"):
            _in_child(time.sleep, (0,), limits)
    finally:
        busy.join()
    assert _in_child(time.sleep, (0,), limits) is None  # the turn came back


def test_the_api_answers_other_calls_while_a_slow_package_is_checked(client, backend, admin, digits, digits_model):
    assert post_model(client, admin, package=digits_model).status_code == 201
    slow_set = digits.root / f"big-photos-{backend.name}" / "3"  # seconds to decode, and a class short
    slow_set.mkdir(parents=True, exist_ok=True)
    for i in range(10):  # long enough that three calls beside it finish first on a loaded CI machine
        Image.new("RGB", (7000, 7000), (i, 0, 0)).save(slow_set / f"{i}.png")
    slow = {}

    def upload_a_slow_package() -> None:
        slow["response"] = post_model(client, admin, name="slow", eval_set=f"file://{slow_set.parent}",
                                      package=digits_model)
        slow["finished"] = time.monotonic()

    upload = threading.Thread(target=upload_a_slow_package)
    upload.start()
    time.sleep(1.0)  # the check is under way
    statuses = [client.post("/deletion-requests", headers=admin,
                            json=request_body(digits, f"meanwhile-{i}")).status_code for i in range(3)]
    answered = time.monotonic()
    upload.join(120)
    assert statuses == [202, 202, 202]
    assert answered < slow["finished"]  # they did not wait behind the check
    assert_problem(slow["response"], 422, "invalid_input")

"""A model's evaluation and anchor sets: checked at registration as a run would read them, replaced
with PATCH /models/{name} (checked the same way, audited), shown by GET /models/{name}."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.service.registry.test_registry_api import assert_nothing_registered, assert_problem
from tests.service_fixtures import make_key, register_digits


def relabelled_copy(digits, name: str, label: str):
    """The validation split with every image under one folder the model has no class for."""
    folder = digits.root / name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(digits.val / "3", folder / label)
    return folder


def test_an_eval_set_labelled_with_classes_the_model_does_not_have_is_refused_at_registration(
        client, admin, backend, digits, digits_model):
    folder = relabelled_copy(digits, f"wrong-labels-{backend.name}", "cat")
    problem = assert_problem(register_digits(client, admin, digits_model, eval_set=f"file://{folder}"), 422,
                             "invalid_input")
    assert problem["detail"].startswith("eval_set: ") and "cat" in problem["detail"]
    assert_nothing_registered(backend)


def test_a_set_linking_outside_the_data_roots_is_refused_without_saying_where_it_leads(
        client, admin, backend, digits, digits_model, tmp_path):
    secret = tmp_path / "elsewhere" / "secret-folder-name"
    shutil.copytree(digits.val, secret)
    link = digits.root / f"link-out-{backend.name}"
    if link.is_symlink():
        link.unlink()
    os.symlink(secret, link)
    problem = assert_problem(register_digits(client, admin, digits_model, eval_set=f"file://{link}"), 422,
                             "outside_data_roots")
    assert "secret-folder-name" not in problem["detail"] and str(tmp_path) not in problem["detail"]
    assert_nothing_registered(backend)


def test_patch_replaces_the_eval_set_and_the_change_is_audited(client, admin, backend, digits, digits_model):
    assert register_digits(client, admin, digits_model).status_code == 201
    response = client.patch("/models/digits", headers=admin, json={"eval_set": f"file://{digits.val}"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["eval_set"] == f"file://{digits.val}" and body["anchor_set"] is None and body["current_version"] == 1
    (event,) = body["events"]
    assert event["event"] == "eval_set_replaced" and event["actor"].startswith("api-key:")
    assert event["detail"] == {"from": None, "to": f"file://{digits.val}"}
    assert client.get("/models/digits", headers=admin).json() == body

    removed = client.patch("/models/digits", headers=admin, json={"eval_set": None}).json()
    assert removed["eval_set"] is None and removed["events"][-1]["event"] == "eval_set_removed"


@pytest.mark.parametrize(("body", "code"), [({}, "invalid_input"), ({"eval_set": "file:///etc"}, "outside_data_roots"),
                                            ({"eval_set": "wrong-labels"}, "invalid_input"),
                                            ({"eval_set": "missing"}, "invalid_input"),
                                            ({"evaluation": "file:///x"}, "invalid_input")],
                         ids=["nothing to change", "outside the roots", "wrong labels", "missing", "unknown field"])
def test_patch_refuses_a_set_a_run_could_not_use_and_changes_nothing(client, admin, backend, digits, digits_model,
                                                                      body, code):
    assert register_digits(client, admin, digits_model, eval_set=f"file://{digits.val}").status_code == 201
    if body.get("eval_set") == "wrong-labels":
        body = {"eval_set": f"file://{relabelled_copy(digits, f'patch-labels-{backend.name}', 'cat')}"}
    elif body.get("eval_set") == "missing":
        body = {"eval_set": f"file://{digits.root / 'no-such-folder'}"}
    assert_problem(client.patch("/models/digits", headers=admin, json=body), 422, code)
    model = client.get("/models/digits", headers=admin).json()
    assert model["eval_set"] == f"file://{digits.val}" and model["events"] == []


def test_patch_needs_models_write_and_an_existing_model(client, admin, backend, digits, digits_model):
    assert register_digits(client, admin, digits_model).status_code == 201
    reader = make_key(backend.settings, "models:read")
    assert_problem(client.patch("/models/digits", headers=reader, json={"eval_set": None}), 403, "forbidden")
    assert_problem(client.patch("/models/nope", headers=admin, json={"eval_set": None}), 404, "not_found")
    assert client.get("/models/current", headers=reader).status_code == 200  # still the current version's route


def test_an_eval_set_without_every_class_of_the_model_is_refused(client, admin, backend, digits, digits_model):
    # A run scores the class it forgets on the evaluation set: one without that class fails the request.
    one_class = digits.root / f"only-threes-{backend.name}"
    shutil.rmtree(one_class, ignore_errors=True)
    shutil.copytree(digits.val / "3", one_class / "3")
    problem = assert_problem(register_digits(client, admin, digits_model, eval_set=f"file://{one_class}"), 422,
                             "invalid_input")
    assert problem["detail"] == ("eval_set: holds no images of 9 of the model's 10 classes: a request to forget "
                                 "one of them would fail")
    assert_nothing_registered(backend)

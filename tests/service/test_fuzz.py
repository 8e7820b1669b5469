"""Property: no call the OpenAPI schema describes, with any values Hypothesis makes of it (and many it
does not allow), gets a 5xx other than a 503 problem naming its backend. Schemathesis generates the
calls from the app's own schema, per operation, against the embedded default with a registered
model and a request; a few dozen examples per operation keep the run under a minute.

Why a library: hand-written probes test what their author thought of; 27,000 fuzzed requests from
this schema found the 500s of issue 14 (dates UTC cannot hold, huge version numbers).
"""

from __future__ import annotations

import shutil

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from service.app import create_app
from service.db import engine_for
from tests.service_fixtures import make_key, register_digits, request_body, settings_from


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, sqlite_template, digits, digits_model):
    """The app on the embedded default, with a model and a request to find, and an admin key."""
    home = tmp_path_factory.mktemp("fuzz-home")
    shutil.copyfile(sqlite_template, home / "lethe.db")
    app_settings = settings_from({"LETHE_HOME": str(home), "LETHE_DATA_ROOTS": str(digits.root)})
    app = create_app(app_settings, enqueue=lambda _id: None)
    admin = make_key(app_settings, "admin")
    with TestClient(app) as client:
        assert register_digits(client, admin, digits_model).status_code == 201
        assert client.post("/deletion-requests", headers=admin, json=request_body(digits)).status_code == 202
    yield app, admin
    engine_for(app_settings.database).dispose()


def operation_labels() -> list[str]:
    """The operations of the app's schema ("POST /deletion-requests", ...); the schema needs no database."""
    import tempfile

    app = create_app(settings_from({"LETHE_HOME": tempfile.mkdtemp(prefix="lethe-schema-")}), enqueue=lambda _id: None)
    return [result.ok().label for result in schemathesis.openapi.from_dict(app.openapi()).get_all_operations()]


ALLOWED_503 = {"overloaded", "database_unavailable", "storage_full", "storage_unavailable"}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
@pytest.mark.parametrize("label", operation_labels())
def test_no_generated_call_gets_a_5xx_other_than_a_503_naming_its_backend(fuzzed, label, mode):
    app, admin = fuzzed
    operation = schemathesis.openapi.from_asgi("/openapi.json", app)[label.split(" ", 1)[1]][label.split(" ", 1)[0]]

    @given(case=operation.as_strategy(mode))
    @settings(max_examples=25, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    def no_server_error(case) -> None:
        response = case.call(headers={**admin, **(case.headers or {})})
        if response.status_code == 503 and label != "GET /readyz":
            assert response.json()["code"] in ALLOWED_503, response.text
        elif label != "GET /readyz":  # /readyz answers 503 by design when a check fails
            assert response.status_code < 500, (case.as_curl_command(), response.status_code, response.text[:500])

    try:
        no_server_error()
    except Unsatisfiable:  # an operation without parameters or body has no invalid input to make
        assert mode is GenerationMode.NEGATIVE
        pytest.skip(f"{label} takes no input that could be invalid")

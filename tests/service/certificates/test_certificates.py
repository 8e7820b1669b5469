"""A completed request's signed certificate: verifiable offline with the published keys, stating
the request's own figures with the set each was measured on; altered or forged ones fail; keys
rotate without breaking what was signed before (embedded default and Postgres, a real run)."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
import rfc8785
from joserfc import jws
from joserfc.jwk import OKPKey
from sqlalchemy import select, update

from service.certificates.signing import ALGORITHM, TYPE, SigningKeys
from service.certificates.verify import CertificateInvalid, check_answer, keys_by_kid, load_token, verify
from service.cli import main
from service.db import session_scope
from service.deletion_requests import audit_chain
from service.deletion_requests.models import DeletionRequest, RequestStatus as S
from service.registry.models import ModelVersion, RegisteredModel
from service.registry.service import dispose_superseded
from service.registry.storage import artifact_store
from tests.service_fixtures import make_key, register_digits, request_body
from worker.engine.images import set_digest
from worker.runs.pipeline import process_model


@pytest.fixture
def completed(backend, client, admin, digits, digits_model) -> str:
    """A request forgotten by a real run, on a model registered with an evaluation set."""
    assert register_digits(client, admin, digits_model, eval_set=f"file://{digits.test}").status_code == 201
    request_id = client.post("/deletion-requests", headers=admin, json=request_body(digits)).json()["id"]
    with session_scope(backend.settings.database) as session:
        model_id = session.scalar(select(RegisteredModel.id))
    process_model(backend.settings, model_id, "w1")
    with session_scope(backend.settings.database) as session:
        row = session.get(DeletionRequest, request_id)
        assert row.status == S.PROPAGATED, row.error  # no consumers: at once
    return request_id


def published_keys(client) -> dict:
    response = client.get("/.well-known/jwks.json")
    assert response.status_code == 200 and response.headers["content-type"] == "application/jwk-set+json"
    return keys_by_kid(response.text)


def test_a_completed_request_has_a_certificate_that_verifies_with_the_published_keys(
        backend, client, admin, completed, digits):
    response = client.get(f"/deletion-requests/{completed}/certificate", headers=admin)
    assert response.status_code == 200
    body = response.json()
    said = verify(body["token"], published_keys(client)).statements
    assert said == body["statements"] and body["jwks_uri"].endswith("/.well-known/jwks.json")
    assert (said["sub"], said["request"]["id"], said["request"]["external_id"]) == (completed, completed, "subject-1")
    assert said["model"] == "digits" and said["forgotten_class"] == "3"
    # The requester checks that their photos were the ones used.
    files = [hashlib.sha256(f.read_bytes()).hexdigest() for f in digits.train_class("3").iterdir()]
    assert said["forget_set"] == {**said["forget_set"], "images": len(files), "sha256": set_digest(files)}
    with session_scope(backend.settings.database) as session:
        versions = {v.version: v.sha256 for v in session.scalars(select(ModelVersion))}
        assert said["audit_chain"]["head_sha256"] == audit_chain.head(session, completed)
    assert said["versions"]["made_from"] == {"version": 1, "sha256": versions[1]}
    assert said["versions"]["forgotten_in"] == {"version": 2, "sha256": versions[2]}
    assert said["versions"]["every_earlier_copy_deleted"] is False
    evidence = said["evidence"]
    assert evidence["forget_set"]["accuracy_before"] > 50 and evidence["forget_set"]["accuracy_after"] <= 1.0
    # The class's head row was reset (the service's default): the gate's figures are the trained network's.
    reset = evidence["head_row_reset"]
    assert reset["forget_set_accuracy_before_reset"] <= 1.0 and reset["evaluation_class_accuracy_before_reset"] >= 0
    # Judged on the audit half; the selection half only chose the checkpoint.
    assert evidence["evaluation"]["half"] == "audit" and evidence["checkpoint_selection"]["half"] == "selection"
    assert evidence["checkpoint_selection"]["step"] >= 1 and evidence["checkpoint_selection"]["selected_by"] == "stop rule"
    assert 0 < evidence["evaluation"]["class_images"] < evidence["evaluation"]["images"]  # the figure's resolution
    assert evidence["evaluation"]["images"] + evidence["checkpoint_selection"]["images"] == sum(
        1 for _ in digits.test.rglob("*.png"))
    assert evidence["generalisation_check"]["held_back"] > 0 and said["gate"]["passed"] is True
    assert said["gate"]["thresholds"]["forget_set_accuracy_max"] == 1.0
    # What the new version still knows of the class, next to its parent, with each measure's inputs.
    residual = evidence["residual_knowledge"]
    assert set(residual) == {"probe", "mia", "relearn"}
    assert all(m["measured_on"] == "the audit half of the model's evaluation set" for m in residual.values())
    assert residual["probe"]["images"] == residual["mia"]["unseen_images"] == residual["relearn"]["images_scored"]
    assert residual["mia"]["forget_images"] == len(files) and residual["relearn"]["k"] == 10
    assert residual["relearn"]["before"] > 80  # the parent still knew the class


def test_the_same_records_give_the_same_certificate_and_a_change_gives_a_new_one(backend, client, admin, completed):
    first = client.get(f"/deletion-requests/{completed}/certificate", headers=admin).json()
    assert client.get(f"/deletion-requests/{completed}/certificate", headers=admin).json()["id"] == first["id"]
    with session_scope(backend.settings.database) as session:  # the superseded version's weights are deleted
        session.execute(update(ModelVersion).where(ModelVersion.version == 1).values(superseded_at=ModelVersion.created_at))
        dispose_superseded(session=session, store=artifact_store(backend.settings), retention_hours=0)
    later = client.get(f"/deletion-requests/{completed}/certificate", headers=admin).json()
    assert later["id"] != first["id"]
    assert later["statements"]["versions"]["every_earlier_copy_deleted"] is True
    assert later["statements"]["versions"]["earlier_holding_the_class"][0]["weights_deleted_at"] is not None
    keys = published_keys(client)
    assert verify(first["token"], keys).statements["versions"]["every_earlier_copy_deleted"] is False  # still valid


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)  # HTTP behaviour, the same on either backend
def test_the_jws_alone_on_accept_application_jose(client, admin, completed):
    response = client.get(f"/deletion-requests/{completed}/certificate",
                          headers={**admin, "Accept": "application/jose"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/jose"
    assert verify(response.text, published_keys(client)).statements["sub"] == completed


def test_only_a_completed_request_has_a_certificate(client, admin, digits, digits_model):
    assert register_digits(client, admin, digits_model).status_code == 201
    request_id = client.post("/deletion-requests", headers=admin, json=request_body(digits)).json()["id"]
    response = client.get(f"/deletion-requests/{request_id}/certificate", headers=admin)
    assert response.status_code == 409 and response.json()["code"] == "not_certifiable"
    missing = client.get("/deletion-requests/00000000-0000-0000-0000-000000000000/certificate", headers=admin)
    assert missing.status_code == 404


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)  # HTTP behaviour, the same on either backend
def test_a_certificate_needs_the_requests_read_scope(backend, client, completed):
    assert client.get(f"/deletion-requests/{completed}/certificate").status_code == 401
    writer_of_models = make_key(backend.settings, "models:read")
    assert client.get(f"/deletion-requests/{completed}/certificate", headers=writer_of_models).status_code == 403
    reader = make_key(backend.settings, "requests:read")
    assert client.get(f"/deletion-requests/{completed}/certificate", headers=reader).status_code == 200


def test_rotating_the_key_keeps_old_certificates_verifiable_and_signs_new_ones_with_the_new_key(
        backend, client, admin, completed):
    old = client.get(f"/deletion-requests/{completed}/certificate", headers=admin).json()
    folder = backend.settings.signing_keys
    retired, new = SigningKeys(folder).rotate()
    assert retired == old["kid"] != new
    assert not (folder / f"{retired}.private.pem").exists()  # it can sign nothing more
    keys = published_keys(client)
    assert set(keys) == {retired, new}
    assert verify(old["token"], keys).kid == retired
    with session_scope(backend.settings.database) as session:  # new statements: signed with the new key
        session.execute(update(DeletionRequest).where(DeletionRequest.id == completed).values(extended_days=1))
    assert client.get(f"/deletion-requests/{completed}/certificate", headers=admin).json()["kid"] == new


def test_two_calls_issuing_at_once_keep_one_certificate(backend, client, admin, completed, monkeypatch):
    """The loser of the race finds the statements already signed (unique per request and content)."""
    from service.certificates import service

    first = client.get(f"/deletion-requests/{completed}/certificate", headers=admin).json()
    real = service._issued
    calls = []

    def not_yet_seen(session, request_id, content):  # as if the other call committed just after our look
        calls.append(1)
        return None if len(calls) == 1 else real(session, request_id, content)

    monkeypatch.setattr(service, "_issued", not_yet_seen)
    again = client.get(f"/deletion-requests/{completed}/certificate", headers=admin).json()
    assert again["id"] == first["id"] and len(calls) == 2
    with session_scope(backend.settings.database) as session:
        assert len(service.history(session, completed)) == 1


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)  # HTTP behaviour, the same on either backend
def test_lethe_certificate_verify_says_valid_or_invalid_in_one_line(client, admin, completed, tmp_path, capsys):
    body = client.get(f"/deletion-requests/{completed}/certificate", headers=admin).text
    (tmp_path / "certificate.json").write_text(body)
    (tmp_path / "keys.json").write_text(client.get("/.well-known/jwks.json").text)
    assert main(["certificate", "verify", str(tmp_path / "certificate.json"), "--key", str(tmp_path / "keys.json")]) == 0
    assert capsys.readouterr().out.startswith(f"valid: request {completed}")
    token = json.loads(body)["token"]
    (tmp_path / "altered.jws").write_text(altered(token, lambda s: {**s, "forgotten_class": "5"}))
    assert main(["certificate", "verify", str(tmp_path / "altered.jws"), "--key", str(tmp_path / "keys.json")]) == 1
    assert capsys.readouterr().out.startswith("invalid: the signature does not match")
    assert main(["certificate", "verify", str(tmp_path / "missing.jws"), "--key", str(tmp_path / "keys.json")]) == 2
    edited = {**json.loads(body), "statements": {**json.loads(body)["statements"], "model": "someone-else"}}
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    assert main(["certificate", "verify", str(tmp_path / "edited.json"), "--key", str(tmp_path / "keys.json")]) == 1
    assert "statements differ" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # which keys to trust is the caller's to say, never the certificate's
        main(["certificate", "verify", str(tmp_path / "certificate.json")])


# --- offline verification, no service -------------------------------------------------------------

def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def altered(token: str, change) -> str:
    """The token with its payload changed and its signature kept."""
    header, payload, signature = token.split(".")
    statements = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return ".".join([header, b64(rfc8785.dumps(change(statements))), signature])


@pytest.fixture
def signed(tmp_path) -> tuple[str, dict]:
    keys = SigningKeys(tmp_path / "keys")
    _kid, token = keys.sign({"type": "lethe.deletion-certificate/v1", "sub": "r1", "forgotten_class": "3"})
    return token, keys_by_kid(json.dumps(keys.jwks()))


def test_a_changed_statement_breaks_the_signature(signed):
    token, keys = signed
    assert verify(token, keys).statements["forgotten_class"] == "3"
    with pytest.raises(CertificateInvalid, match="signature does not match"):
        verify(altered(token, lambda s: {**s, "forgotten_class": "5"}), keys)


def test_a_certificate_signed_by_another_key_is_refused(signed, tmp_path):
    _token, keys = signed
    _kid, forged = SigningKeys(tmp_path / "forger").sign({"type": "lethe.deletion-certificate/v1", "sub": "r1"})
    with pytest.raises(CertificateInvalid, match="not in the key set"):
        verify(forged, keys)


def signed_by(key: OKPKey, kid: str) -> str:
    """A certificate for request r2 signed with ``key``, its header naming ``kid``."""
    return jws.serialize_compact({"alg": ALGORITHM, "kid": kid, "typ": TYPE},
                                 rfc8785.dumps({"type": "lethe.deletion-certificate/v1", "sub": "r2"}), key,
                                 algorithms=[ALGORITHM])


def test_a_forger_who_reuses_the_published_kid_with_their_own_key_is_refused(signed):
    token, keys = signed
    kid = next(iter(keys))
    forged = signed_by(OKPKey.generate_key("Ed25519"), kid)
    with pytest.raises(CertificateInvalid, match="signature does not match"):
        verify(forged, keys)


def test_a_key_set_cannot_lend_a_forgers_key_the_issuers_kid(signed):
    token, keys = signed
    kid = next(iter(keys))
    forger = OKPKey.generate_key("Ed25519")
    borrowed = {kid: {**forger.as_dict(private=False), "kid": kid}}
    forged = signed_by(forger, kid)
    with pytest.raises(CertificateInvalid, match="thumbprint"):
        verify(forged, borrowed)


def test_statements_shown_beside_the_token_must_be_the_signed_ones(signed):
    token, keys = signed
    verified = verify(token, keys)
    check_answer({"token": token, "statements": verified.statements, "kid": verified.kid}, verified)
    with pytest.raises(CertificateInvalid, match="statements differ"):
        check_answer({"token": token, "statements": {**verified.statements, "forgotten_class": "5"}}, verified)
    with pytest.raises(CertificateInvalid, match="kid differs"):
        check_answer({"token": token, "kid": "bogus"}, verified)


@pytest.mark.parametrize("payload", [b'{"sub":NaN,"type":"lethe.deletion-certificate/v1"}',
                                     b'{"sub":123456789012345678901,"type":"lethe.deletion-certificate/v1"}'])
def test_a_payload_json_cannot_canonicalise_is_invalid_not_an_error(tmp_path, payload):
    keys = SigningKeys(tmp_path / "keys")
    kid, key = keys.active()
    token = jws.serialize_compact({"alg": ALGORITHM, "kid": kid, "typ": TYPE}, payload, key, algorithms=[ALGORITHM])
    with pytest.raises(CertificateInvalid, match="canonical"):
        verify(token, keys_by_kid(json.dumps(keys.jwks())))


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)  # HTTP behaviour, the same on either backend
def test_a_missing_key_folder_is_503_and_no_new_key_is_made_while_certificates_exist(backend, client, admin,
                                                                                      completed):
    import shutil as sh

    first = client.get(f"/deletion-requests/{completed}/certificate", headers=admin)
    sh.rmtree(backend.settings.signing_keys)
    assert client.get(f"/deletion-requests/{completed}/certificate", headers=admin).json()["id"] == first.json()["id"]
    with session_scope(backend.settings.database) as session:  # new statements: a new certificate is needed
        session.execute(update(DeletionRequest).where(DeletionRequest.id == completed).values(extended_days=2))
    refused = client.get(f"/deletion-requests/{completed}/certificate", headers=admin)
    assert refused.status_code == 503 and refused.json()["code"] == "signing_unavailable"
    assert not (backend.settings.signing_keys / "active").exists()


def test_a_payload_that_is_not_canonical_json_or_not_a_certificate_is_refused(tmp_path):
    keys = SigningKeys(tmp_path / "keys")
    kid, key = keys.active()
    published = keys_by_kid(json.dumps(keys.jwks()))

    def sign(payload: bytes) -> str:
        return jws.serialize_compact({"alg": ALGORITHM, "kid": kid, "typ": TYPE}, payload, key, algorithms=[ALGORITHM])

    with pytest.raises(CertificateInvalid, match="canonical"):
        verify(sign(b'{"sub": "r1", "type": "lethe.deletion-certificate/v1"}'), published)
    with pytest.raises(CertificateInvalid, match="not a deletion certificate"):
        verify(sign(rfc8785.dumps({"type": "something else"})), published)
    with pytest.raises(CertificateInvalid, match="not a compact JWS"):
        verify("not.a.jws", published)
    none_alg = ".".join([b64(b'{"alg":"none","kid":"%s","typ":"%s"}' % (kid.encode(), TYPE.encode())),
                         b64(rfc8785.dumps({"type": "lethe.deletion-certificate/v1"})), ""])
    with pytest.raises(CertificateInvalid, match="not a Lethe certificate"):
        verify(none_alg, published)


def test_the_first_signature_makes_one_key_kept_private_to_its_owner(tmp_path):
    folder = tmp_path / "keys"
    keys = SigningKeys(folder)
    first, _ = keys.active()
    assert keys.active()[0] == first and [k["kid"] for k in keys.jwks()["keys"]] == [first]
    assert (folder / f"{first}.private.pem").stat().st_mode & 0o077 == 0
    assert "d" not in keys.jwks()["keys"][0]  # the published half has no private part


def test_a_key_file_or_certificate_file_that_cannot_be_read_is_a_clear_error():
    with pytest.raises(CertificateInvalid, match="JWK"):
        keys_by_kid("not json")
    with pytest.raises(CertificateInvalid, match="token"):
        load_token('{"no": "token"}')

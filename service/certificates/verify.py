"""Checking a certificate offline: its signature against a published key set, nothing else needed
(no database, no settings). What ``lethe certificate verify`` runs, and what a third party can
reproduce with any JOSE library: a compact JWS, alg "Ed25519", kid = the key's RFC 7638 thumbprint,
payload = the statements as RFC 8785 canonical JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import rfc8785
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import OKPKey

from service.certificates.signing import ALGORITHM, TYPE

STATEMENTS_TYPE = "lethe.deletion-certificate/v1"


class CertificateInvalid(ValueError):
    """The certificate is not what it claims: its message says why, in one line."""


@dataclass(frozen=True)
class Verified:
    kid: str
    statements: dict[str, Any]


def load_token(text: str) -> str:
    """The compact JWS from a file's text: the JWS itself, or the API's JSON answer holding it."""
    return load_certificate(text)[0]


def load_certificate(text: str) -> tuple[str, dict[str, Any] | None]:
    """(the compact JWS, the API's JSON answer around it or None) from a file's text."""
    text = text.strip()
    if text.startswith("{"):
        try:
            answer = json.loads(text)
            token = answer.get("token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str):
            raise CertificateInvalid("a JSON file must hold the certificate as \"token\" (the API's answer)")
        return token.strip(), answer
    return text, None


def check_answer(answer: dict[str, Any] | None, verified: Verified) -> None:
    """The API's JSON answer shows the statements decoded beside the token: they must be the very
    ones signed, or a reader would trust what the signature does not cover."""
    if answer is None:
        return
    if "statements" in answer and answer["statements"] != verified.statements:
        raise CertificateInvalid("the answer's statements differ from what the token signed")
    if answer.get("kid", verified.kid) != verified.kid:
        raise CertificateInvalid("the answer's kid differs from the token's")
    if "id" in answer and answer["id"] != verified.statements.get("jti"):
        raise CertificateInvalid("the answer's id differs from the token's jti")


def keys_by_kid(text: str) -> dict[str, dict[str, Any]]:
    """A JWK Set ({"keys": [...]}) or one JWK, by kid."""
    try:
        document = json.loads(text)
        keys = document["keys"] if "keys" in document else [document]
        return {k["kid"]: k for k in keys if isinstance(k, dict) and "kid" in k}
    except (ValueError, TypeError, KeyError):
        raise CertificateInvalid("the key file is not a JWK or a JWK Set") from None


def verify(token: str, keys: dict[str, dict[str, Any]]) -> Verified:
    """The statements of a certificate whose signature holds under one of ``keys``; CertificateInvalid
    otherwise (altered, forged, signed by a key not in the set, or not a Lethe certificate)."""
    try:
        header = jws.extract_compact(token.encode()).protected
    except (JoseError, ValueError, UnicodeError):
        raise CertificateInvalid("not a compact JWS") from None
    if header.get("alg") != ALGORITHM or header.get("typ") != TYPE:
        raise CertificateInvalid(f"not a Lethe certificate (alg {header.get('alg')!r}, typ {header.get('typ')!r})")
    kid = header.get("kid")
    if not isinstance(kid, str) or kid not in keys:
        raise CertificateInvalid(f"signed by key {kid!r}, which is not in the key set given")
    try:
        key = OKPKey.import_key(keys[kid])
    except (JoseError, ValueError, TypeError, KeyError):
        raise CertificateInvalid(f"key {kid} in the key set is not an Ed25519 public key") from None
    if key.thumbprint() != kid:  # a key set cannot lend a key the issuer's name: kid is the key's own digest
        raise CertificateInvalid(f"the key set's key named {kid} is another key (its RFC 7638 thumbprint differs)")
    try:
        payload = jws.deserialize_compact(token, key, algorithms=[ALGORITHM]).payload
    except (JoseError, ValueError):
        raise CertificateInvalid(f"the signature does not match (key {kid}): the certificate was altered or forged") from None
    try:
        statements = json.loads(payload)
        canonical = rfc8785.dumps(statements)
    except (ValueError, rfc8785.CanonicalizationError):
        raise CertificateInvalid("the signed payload is not canonical JSON (RFC 8785)") from None
    if canonical != payload:  # one byte form only: what is shown is exactly what was signed
        raise CertificateInvalid("the signed payload is not canonical JSON (RFC 8785)")
    if not isinstance(statements, dict) or statements.get("type") != STATEMENTS_TYPE:
        raise CertificateInvalid("the signed payload is not a deletion certificate")
    return Verified(kid=kid, statements=statements)

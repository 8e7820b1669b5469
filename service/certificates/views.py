"""The certificate of a request, and the keys that verify it (public, at a well-known address)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from pydantic import BaseModel

from service.certificates import service
from service.certificates.signing import SigningKeys
from service.deletion_requests import service as requests
from service.config import Settings
from service.deps import RequestsReader, SessionDep, SettingsDep

JOSE = "application/jose"  # RFC 7515: a compact JWS as the whole body

router = APIRouter(tags=["certificates"])


class CertificatePublic(BaseModel):
    id: str
    issued_at: datetime
    kid: str
    token: str  # the compact JWS: what a verifier checks (lethe certificate verify, or any JOSE library)
    jwks_uri: str
    statements: dict[str, Any]  # the signed payload, decoded (convenience: the token is authoritative)


def issuer(request: Request, settings: Settings) -> str:
    return settings.public_url or str(request.base_url).rstrip("/")


@router.get("/deletion-requests/{request_id}/certificate", response_model=CertificatePublic,
            summary="The signed deletion certificate of a completed request (Accept: application/jose for the JWS alone)",
            responses={200: {"content": {JOSE: {}}}, 409: {"description": "the request is not completed"}})
def get_certificate(request_id: str, request: Request, session: SessionDep, settings: SettingsDep, _key: RequestsReader,
                    accept: Annotated[str | None, Header()] = None):
    row = requests.get_request(session=session, request_id=request_id)
    base = issuer(request, settings)
    issued = service.certificate(session, settings, row, base)
    if accept and JOSE in accept and "json" not in accept:
        return Response(issued.token, media_type=JOSE)
    return CertificatePublic(id=issued.id, issued_at=issued.issued_at, kid=issued.kid, token=issued.token,
                             jwks_uri=f"{base}/.well-known/jwks.json", statements=service.statements_of(issued))


@router.get("/.well-known/jwks.json", summary="The public keys that verify certificates (JWK Set), retired ones too")
def jwks(settings: SettingsDep) -> Response:
    return Response(json.dumps(SigningKeys(settings.signing_keys).jwks()), media_type="application/jwk-set+json",
                    headers={"Cache-Control": "public, max-age=300"})

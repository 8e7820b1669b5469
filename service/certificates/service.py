"""Issuing certificates: one per state of a request's records, signed once and kept."""

from __future__ import annotations

import hashlib
import json
import uuid

import rfc8785
from joserfc import jws
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.certificates.document import statements
from service.certificates.models import Certificate
from service.certificates.signing import SigningKeys
from service.config import Settings
from service.db import session_scope, utcnow
from service.deletion_requests.models import FULFILLED, DeletionRequest
from service.errors import NotCertifiable


def certificate(session: Session, settings: Settings, row: DeletionRequest, issuer: str) -> Certificate:
    """The request's certificate for what its records say now: the one already issued for the same
    statements, or a new one, signed with the active key and kept (in a transaction of its own, so
    that a read-only call can issue it). A later change (an earlier version's weights deleted, more
    events in its trail) gives a new certificate; the earlier ones stay valid for what they said."""
    if row.status not in FULFILLED:
        raise NotCertifiable(f"this request is {row.status}; a certificate is issued once it is completed",
                             current_status=row.status)
    said = statements(session, row, issuer)
    content = hashlib.sha256(rfc8785.dumps(said)).hexdigest()
    issued = _issued(session, row.id, content)
    if issued is not None:
        return issued
    certificate_id, now = str(uuid.uuid4()), utcnow()
    first_ever = session.scalar(select(Certificate.id).limit(1)) is None
    kid, token = SigningKeys(settings.signing_keys).sign({**said, "jti": certificate_id, "iat": int(now.timestamp())},
                                                         may_create=first_ever)
    new = Certificate(id=certificate_id, request_id=row.id, issued_at=now, kid=kid, content_sha256=content, token=token)
    try:
        with session_scope(settings.database) as writer:
            writer.add(new)
    except IntegrityError:  # another call issued the same statements a moment ago: that one is the certificate
        with session_scope(settings.database) as reader:
            return _issued(reader, row.id, content)
    return new


def statements_of(issued: Certificate) -> dict:
    """The statements a certificate signed (decoded from its own token; no check of the signature)."""
    return json.loads(jws.extract_compact(issued.token.encode()).payload)


def history(session: Session, request_id: str) -> list[Certificate]:
    """Every certificate issued for the request, newest first."""
    return list(session.scalars(select(Certificate).where(Certificate.request_id == request_id)
                                .order_by(Certificate.issued_at.desc())))


def _issued(session: Session, request_id: str, content: str) -> Certificate | None:
    return session.scalar(select(Certificate).where(Certificate.request_id == request_id,
                                                    Certificate.content_sha256 == content))

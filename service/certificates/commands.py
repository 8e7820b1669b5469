"""``lethe keys signing ...`` and ``lethe certificate ...``: one line per outcome, exit 1 when a
certificate does not verify, 2 on bad input (as every lethe command)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_commands(commands: argparse._SubParsersAction, key_commands: argparse._SubParsersAction) -> None:
    signing = key_commands.add_parser("signing", help="the keys that sign deletion certificates")
    signing_commands = signing.add_subparsers(dest="signing_command", required=True, metavar="ACTION")
    rotate = signing_commands.add_parser("rotate", help="make a new signing key active; the old one's private half is "
                                                        "deleted, its public half stays published")
    rotate.set_defaults(handler=run_rotate)
    listing = signing_commands.add_parser("list", help="every signing key: kid, active, private half present")
    listing.set_defaults(handler=run_list)

    certificate = commands.add_parser("certificate", help="deletion certificates")
    actions = certificate.add_subparsers(dest="certificate_command", required=True, metavar="ACTION")
    verify = actions.add_parser("verify", help="check a certificate's signature offline; exit 1 when it does not hold")
    verify.add_argument("file", metavar="FILE", help="the certificate: the JWS, or the API's JSON answer")
    trusted = verify.add_mutually_exclusive_group(required=True)
    trusted.add_argument("--key", metavar="URL|FILE",
                         help="the issuer's keys (a JWK Set or one JWK) that you trust, as a file or an https:// URL")
    trusted.add_argument("--issuer", metavar="URL",
                         help="the issuer you trust (https://...): its keys are fetched from URL/.well-known/jwks.json "
                              "and the certificate must name it as its issuer")
    verify.set_defaults(handler=run_verify)
    digest = actions.add_parser("digest", help="the forget-set digest a certificate states, computed from your own "
                                               "images (a folder, archive or manifest)")
    digest.add_argument("source", metavar="SOURCE")
    digest.set_defaults(handler=run_digest)


def run_rotate(args: argparse.Namespace) -> int:
    from service.certificates.signing import SigningKeys
    from service.config import get_settings
    from service.errors import ServiceError

    try:
        retired, new = SigningKeys(get_settings().signing_keys).rotate()
    except ServiceError as exc:
        return _fail(exc.detail)
    print(f"signing key {new} is active" + (f"; {retired} retired (still published, can no longer sign)"
                                            if retired else ""), file=sys.stderr)
    print(new)
    return 0


def run_list(args: argparse.Namespace) -> int:
    from service.certificates.signing import SigningKeys
    from service.config import get_settings
    from service.errors import ServiceError

    try:
        keys = SigningKeys(get_settings().signing_keys).describe()
    except ServiceError as exc:
        return _fail(exc.detail)
    for key in keys:
        print(f"{key['kid']}  {'active' if key['active'] else 'retired'}"
              f"{'' if key['private_key'] or not key['active'] else '  (private key missing)'}")
    if not keys:
        print("no signing key yet: one is made when the first certificate is issued", file=sys.stderr)
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from service.certificates.verify import CertificateInvalid, check_answer, keys_by_kid, load_certificate, verify

    try:
        token, answer = load_certificate(_read(Path(args.file)))
        # The keys come from the caller, never from the certificate itself: its issuer claim is
        # what a forger writes first (with --issuer, it must match the issuer the caller named).
        source = f"{args.issuer.rstrip('/')}/.well-known/jwks.json" if args.issuer else args.key
        keys = keys_by_kid(_fetch(source) if source.startswith(("https://", "http://")) else _read(Path(source)))
        verified = verify(token, keys)
        check_answer(answer, verified)
        if args.issuer and verified.statements.get("iss") != args.issuer.rstrip("/"):
            raise CertificateInvalid(f"issued by {verified.statements.get('iss')!r}, not {args.issuer!r}")
    except CertificateInvalid as exc:
        print(f"invalid: {exc}")
        return 1
    except _Unusable as exc:
        return _fail(str(exc))
    print(f"valid: {_summary(verified.statements)}; signed by {verified.kid} (keys from {source})")
    return 0


def _summary(s: dict) -> str:
    request = s.get("request") if isinstance(s.get("request"), dict) else {}
    versions = s.get("versions") if isinstance(s.get("versions"), dict) else {}
    made_from = versions.get("made_from") if isinstance(versions.get("made_from"), dict) else {}
    forgotten_in = versions.get("forgotten_in") if isinstance(versions.get("forgotten_in"), dict) else {}
    return (f"request {request.get('id')} (external id {request.get('external_id')}), model {s.get('model')} "
            f"version {made_from.get('version', '-')} -> {forgotten_in.get('version')}, completed "
            f"{request.get('completed_at')}")


def run_digest(args: argparse.Namespace) -> int:
    from worker.engine import EngineError
    from worker.engine.images import list_images, set_digest

    import hashlib

    try:
        print(set_digest(hashlib.sha256(entry.read_bytes()).hexdigest() for entry in list_images(args.source)))
    except (EngineError, OSError) as exc:
        return _fail(str(exc))
    return 0


class _Unusable(Exception):
    """The command cannot even check: a file or key set that cannot be read."""


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeError) as exc:
        raise _Unusable(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None


def _fetch(url: str) -> str:
    import httpx

    try:
        response = httpx.get(url, timeout=10, follow_redirects=False)
        response.raise_for_status()
        return response.text
    except httpx.HTTPError as exc:
        raise _Unusable(f"cannot fetch the keys from {url}: {exc}") from None


def _fail(message: str) -> int:
    print(f"lethe: error: {message}", file=sys.stderr)
    return 2

"""Personal data in the product's own records. A class name is often a person's name, and a forget
set's path often names them too: they stay on the request's own row (its owner needs them) until it
is redacted, and never reach the audit trail, the logs or metrics labels.

- ``scrub``: a text (an error, an event's detail) with the given forget-set references and class
  names replaced by placeholders. A class name is scrubbed when it could be a name (it holds a
  letter): "3" in "3.5 %" is a digit, not a person.
- ``commitment``: what stays of a redacted request's class and forget set, a salted sha256 whose
  salt (``subject_nonce``) the request's certificates carry: the requester, holding a certificate,
  can show it was them; the database alone cannot tell which person it was.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, urlparse

FORGET_SET = "<forget set>"
CLASS = "<class>"
REDACTED = "redacted"


def scrub(text: str, *, classes: Iterable[str] = (), uris: Iterable[str] = (), folders: Iterable[str] = ()) -> str:
    """``text`` without the given forget-set references (as URIs and as the paths they name, with
    whatever follows them up to a space or quote: the files inside, whose names often name the
    person), any path under ``folders`` (where a run downloads its sets), and class names — in any
    letter case, with ``-``, ``_``, ``.`` or a space between their parts, inside file names too."""
    forms = {form.rstrip("/") for uri in uris if uri for form in _forms(uri)}
    for form in sorted(forms | {str(f).rstrip("/") for f in folders}, key=len, reverse=True):  # the longest first
        text = re.sub(re.escape(form) + r"(/[^\s'\"]*[^\s'\":;,.)])?", FORGET_SET, text)
    for name in sorted({c for c in classes if c and any(ch.isalpha() for ch in c)}, key=len, reverse=True):
        parts = [re.escape(part) for part in re.split(r"[-_. ]+", name) if part]
        text = re.sub(r"(?<![A-Za-z0-9])" + r"[-_. ]+".join(parts) + r"(?![A-Za-z])", CLASS, text, flags=re.IGNORECASE)
    return text


def rekey(detail: Any, name: str) -> Any:
    """``detail`` with every key equal to ``name`` (a class, digits included) renamed ``<class>``: how
    a redacted request's figures keyed by its class stay readable."""
    if isinstance(detail, dict):
        return {(CLASS if k == name else k): rekey(v, name) for k, v in detail.items()}
    if isinstance(detail, list):
        return [rekey(v, name) for v in detail]
    return detail


def scrub_detail(detail: Any, **named: Iterable[str]) -> Any:
    """An event's detail (JSON) with every string scrubbed, keys included."""
    if isinstance(detail, str):
        return scrub(detail, **named)
    if isinstance(detail, dict):
        return {scrub(str(k), **named): scrub_detail(v, **named) for k, v in detail.items()}
    if isinstance(detail, list):
        return [scrub_detail(v, **named) for v in detail]
    return detail


def commitment(nonce: str, forget_class: str, forget_uri: str) -> str:
    """sha256 over the nonce, the class and the forget set's URI, each followed by a newline."""
    return hashlib.sha256(f"{nonce}\n{forget_class}\n{forget_uri}\n".encode()).hexdigest()


def _forms(uri: str) -> set[str]:
    """The ways a reference shows up in messages: the URI, and for file:// URIs the path it names."""
    forms = {uri}
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        forms |= {parsed.path, unquote(parsed.path)}
    return {f for f in forms if len(f) > 1}

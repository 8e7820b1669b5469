"""Where a webhook may be sent (SSRF): a host the operator listed in LETHE_WEBHOOK_ALLOWED_HOSTS,
resolved to addresses that are public, or private/loopback only when that address (or the host
itself) is listed. Checked at registration and again at every delivery, which then connects to the
very address it checked (a name that resolves elsewhere a moment later cannot redirect it)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from service.errors import InvalidInput


class TargetRefused(InvalidInput):
    code, title = "webhook_target_refused", "Webhook target not allowed"


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str
    host: str
    port: int
    address: str  # the checked address the delivery connects to


def check_target(url: str, allowed: list[str]) -> Target:
    """The target of ``url`` once allowed; TargetRefused saying why otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise TargetRefused("a webhook URL is https://host/... (or http:// for a host listed in "
                            "LETHE_WEBHOOK_ALLOWED_HOSTS)")
    if parts.username or parts.password:
        raise TargetRefused("a webhook URL carries no credentials; the signature authenticates the sender")
    host = parts.hostname.lower().rstrip(".")
    if not _listed(host, allowed):
        raise TargetRefused(f"{host} is not in LETHE_WEBHOOK_ALLOWED_HOSTS")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise TargetRefused("the webhook URL's port is not a number in 1-65535") from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise TargetRefused(f"{host} does not resolve ({exc})") from None
    addresses = sorted({info[4][0] for info in infos})
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not ip.is_global and address not in allowed and host not in allowed:
            raise TargetRefused(f"{host} resolves to {address}, a private, loopback or reserved address; list "
                                "it in LETHE_WEBHOOK_ALLOWED_HOSTS to allow it")
    return Target(url=url, scheme=parts.scheme, host=host, port=port, address=addresses[0])


def _listed(host: str, allowed: list[str]) -> bool:
    return any(host == entry or (entry.startswith("*.") and host.endswith(entry[1:])) for entry in allowed)

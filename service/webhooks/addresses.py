"""Where a webhook may go: the URL checks and the SSRF defences, at submit and before each delivery.

A webhook makes our servers send a request to a URL a user chose. Unchecked, that is a server-side
request forgery (SSRF) primitive: a job could make the deployment POST to its own Redis, to an
admin port on localhost, or read a cloud metadata endpoint (169.254.169.254) from inside the
network. The rules (OWASP's SSRF prevention cheat sheet, as Replicate and Svix apply them):

- the scheme is https; http only for a host in `webhook_allowed_hosts`; no credentials in the URL;
- the host is resolved (`socket.getaddrinfo`, IPv4 and IPv6) and *every* address it resolves to
  must be public: refused are private (RFC 1918, unique-local fc00::/7), loopback, link-local
  (169.254.0.0/16 — the AWS/GCP/Azure metadata address 169.254.169.254 — and fe80::/10), shared
  (100.64.0.0/10, where Alibaba's metadata 100.100.100.200 lives), unspecified, multicast,
  reserved and documentation addresses (`ipaddress`'s `is_global`, plus multicast, which it counts
  as global). An IPv6 address that carries an IPv4 one (IPv4-mapped ::ffff:a.b.c.d, NAT64
  64:ff9b::/96, 6to4 2002::/16) is judged by the IPv4 address too. One bad address refuses the
  URL: a name with a private and a public address would otherwise reach the private one by chance;
- an allowlisted host (name, IP, or IP inside an allowlisted network) may use http and any
  address; an address inside an allowlisted network is accepted for any host;
- the check runs at submit (a refused URL is a 422: nothing is queued) and again before each
  delivery attempt, because DNS may answer differently later (rebinding: public at submit, then
  127.0.0.1). The delivery then connects to the address it has just checked (`Destination`), never
  resolving the name again, and sends the name as Host and as TLS SNI (the certificate is checked
  against the name). Redirects are never followed (`service.webhooks.delivery`).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[..., list[tuple[Any, ...]]]  # socket.getaddrinfo's signature

NAT64 = ipaddress.ip_network("64:ff9b::/96")
DEFAULT_PORTS = {"http": 80, "https": 443}


class WebhookRefused(ValueError):
    """A webhook URL that may not be used: `code` is the API error code, the message says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Destination:
    """A checked webhook URL: where to connect (`addresses`, every one allowed) and what to send
    as Host/SNI (`host`) and request target (`target`)."""

    url: str
    scheme: str
    host: str  # lower-case name or IP literal, without brackets
    port: int
    target: str  # path and query
    addresses: tuple[str, ...]

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    def url_for(self, address: str) -> str:
        """The URL with the host replaced by one of its checked addresses (what httpx connects
        to); the Host header and SNI still name `host`."""
        literal = f"[{address}]" if ":" in address else address
        return f"{self.scheme}://{literal}:{self.port}{self.target}"


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (IPv4-mapped, NAT64, 6to4), else None."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public(address: IPAddress) -> bool:
    """Whether an address is a public unicast one (see the module docstring for what is not)."""
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        return False  # a zone index only exists for link-local use
    inner = embedded_ipv4(address)
    if inner is not None:
        return is_public(inner)  # the IPv4 address it reaches decides
    return address.is_global and not (
        address.is_multicast
        or address.is_unspecified
        or address.is_reserved
        or address.is_loopback
        or address.is_link_local
    )


class AddressPolicy:
    """The webhook URL rules of one deployment (`allowed`: its `webhook_allowed_hosts`)."""

    def __init__(self, allowed: Iterable[str] = (), resolver: Resolver = socket.getaddrinfo):
        self.hosts: set[str] = set()
        self.networks: list[IPNetwork] = []
        for entry in (e.strip().lower().rstrip(".") for e in allowed):
            if not entry:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self.hosts.add(entry)
        self.resolver = resolver

    @classmethod
    def parse(cls, allowed: str, resolver: Resolver = socket.getaddrinfo) -> AddressPolicy:
        return cls(allowed.split(","), resolver)

    def _in_networks(self, address: IPAddress) -> bool:
        return any(address.version == n.version and address in n for n in self.networks)

    def host_allowed(self, host: str) -> bool:
        """Whether the URL's host itself is allowlisted (by name, or an IP literal in a listed
        network)."""
        if host in self.hosts:
            return True
        literal = _ip(host)
        return literal is not None and self._in_networks(literal)

    def parse_url(self, url: str) -> tuple[str, str, int, str]:
        """Scheme, host, port and request target of `url`, after the checks that need no DNS."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise WebhookRefused(
                "invalid_webhook", f"webhook is not a valid URL: {url!r}"
            ) from None
        scheme = parts.scheme.lower()
        host = (parts.hostname or "").rstrip(".")
        if scheme not in DEFAULT_PORTS or not host:
            raise WebhookRefused(
                "invalid_webhook", "webhook must be an absolute https:// URL with a host"
            )
        if parts.username is not None or parts.password is not None:
            raise WebhookRefused(
                "invalid_webhook", "webhook must not carry credentials (user:password@)"
            )
        if any(c.isspace() or ord(c) < 0x20 for c in url):
            raise WebhookRefused("invalid_webhook", "webhook must not contain spaces or controls")
        if scheme == "http" and not self.host_allowed(host):
            raise WebhookRefused(
                "insecure_webhook",
                f"webhook must use https (http only for the deployment's allowlisted hosts; "
                f"{host!r} is not one)",
            )
        target = parts.path or "/"
        if parts.query:
            target += f"?{parts.query}"
        return scheme, host, port or DEFAULT_PORTS[scheme], target

    def resolve(self, url: str) -> Destination:
        """The checked destination of `url`; `WebhookRefused` (its code and reason) otherwise.
        Resolves the host (blocking: call it off the event loop)."""
        scheme, host, port, target = self.parse_url(url)
        literal = _ip(host)
        if literal is not None:
            found = [literal]
        else:
            try:
                infos = self.resolver(host, port, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError):
                raise WebhookRefused(
                    "webhook_unresolvable", f"webhook host {host!r} does not resolve"
                ) from None
            found = list(dict.fromkeys(a for a in (_ip(str(i[4][0])) for i in infos) if a))
            if not found:
                raise WebhookRefused(
                    "webhook_unresolvable", f"webhook host {host!r} has no address"
                )
        if not self.host_allowed(host):
            for address in found:
                if not (is_public(address) or self._in_networks(address)):
                    raise WebhookRefused(
                        "webhook_address_refused",
                        f"webhook host {host!r} resolves to {address}, a private, loopback, "
                        "link-local, metadata or otherwise non-public address",
                    )
        return Destination(url, scheme, host, port, target, tuple(str(a) for a in found))


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None

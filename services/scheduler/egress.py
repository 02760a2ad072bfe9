"""Where the scheduler may send a tenant's webhooks: the guard against server-side
request forgery (SSRF).

A webhook's URL is chosen by a tenant, and the scheduler calls it from inside the
site's network. Unguarded, a tenant could make the scheduler POST to the broker's
management API, the database, a cloud metadata service (169.254.169.254) or any host
of the hospital's network, and learn from the outcome whether it answered. So a
target must be `https://` on a host whose addresses are all global unicast (`refusal`
is the rule), unless the operator allow-listed the host name or its network for
receivers inside the site (`webhook_allowed_hosts`); an allow-listed host may be
reached over `http://` too.

The rule is applied twice, both times by `Guard`: when a webhook is registered (the
URL and every address its host has then: a 422 with the reason), and when it is
delivered, to the very addresses the connection may use (`GuardedResolver` filters
what DNS answers the HTTP client), because a name that resolved to a public address
at registration may resolve to an internal one later (DNS rebinding).
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated

from aiohttp.abc import AbstractResolver, ResolveResult
from pydantic import AfterValidator
from yarl import URL

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: NAT64 prefixes (RFC 6052, RFC 8215): their last 32 bits are an IPv4 address.
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")


class TargetRefused(OSError):
    """A webhook may not be sent there; `reason` says why, for the tenant.

    An `OSError`, so that raised by the resolver under the HTTP client it ends that
    connection attempt the way an unreachable host would."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EACCES, reason)
        self.reason = reason


def refusal(address: Address) -> str | None:
    """Why a webhook may not go to `address`, or None when it may: only global unicast
    addresses may be targets. The one place of this rule."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.teredo is not None:
            return f"{address} is a Teredo tunnel address"
        embedded = address.ipv4_mapped or address.sixtofour or _nat64(address)
        if embedded is not None:  # what the packets reach is the IPv4 address inside
            inner = refusal(embedded)
            return f"{address} embeds {inner}" if inner else None
    kinds = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
    )
    for kind, is_kind in kinds:
        if is_kind:
            return f"{address} is a {kind} address"
    if not address.is_global:  # shared (100.64/10), benchmarking, documentation, ...
        return f"{address} is not a global unicast address"
    return None


def _nat64(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if any(address in prefix for prefix in _NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def allowed_entry(entry: str) -> str:
    """One entry of `webhook_allowed_hosts`: a host name, an address or a network
    (CIDR); normalized, or ValueError."""
    value = entry.strip().lower().rstrip(".")
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        pass
    if len(value) > 253 or not _HOST_NAME.match(value):
        raise ValueError(f"{entry!r} is neither a host name nor an address or network")
    return value


#: A setting's entry, checked when the settings are read.
AllowedHost = Annotated[str, AfterValidator(allowed_entry)]


@dataclass(frozen=True)
class AllowList:
    """The operator's exceptions to `refusal`: receivers inside the site."""

    names: frozenset[str] = frozenset()
    networks: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        names, networks = set(), []
        for entry in map(allowed_entry, entries):
            try:
                networks.append(ipaddress.ip_network(entry))
            except ValueError:
                names.add(entry)
        return cls(frozenset(names), tuple(networks))

    def names_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.names

    def covers(self, address: Address) -> bool:
        return any(address in network for network in self.networks)


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class Guard:
    """Applies the rule to a URL (at registration) and to the addresses a delivery
    connects to (`resolver()`), with the operator's allow-list."""

    def __init__(self, allowed: AllowList, dns: AbstractResolver) -> None:
        self.allowed = allowed
        self.dns = dns

    def verdict(self, host: str, address: Address) -> str | None:
        """Why `host` may not be reached at `address`, or None when it may."""
        if self.allowed.names_host(host) or self.allowed.covers(address):
            return None
        return refusal(address)

    def check_url(self, url: str) -> URL:
        """The URL, if its form may be a target; `TargetRefused` otherwise. Names are
        not resolved here: see `check` and `resolver`."""
        if any(c.isspace() or not c.isprintable() for c in url):
            raise TargetRefused("a webhook URL has no spaces or control characters")
        try:
            parsed = URL(url)
        except ValueError as exc:
            raise TargetRefused(f"not a URL: {exc}") from None
        host = parsed.raw_host
        if parsed.scheme not in ("https", "http") or not host:
            raise TargetRefused("a webhook URL is https://host/...")
        if parsed.user is not None or parsed.password is not None:
            raise TargetRefused("a webhook URL carries no credentials: deliveries are signed")
        literal = _literal(host)
        internal = self.allowed.names_host(host) or (
            literal is not None and self.allowed.covers(literal)
        )
        if parsed.scheme == "http" and not internal:
            raise TargetRefused("a webhook URL is https:// (http:// only to allow-listed hosts)")
        if literal is not None and (reason := self.verdict(host, literal)):
            raise TargetRefused(reason)
        return parsed

    async def check(self, url: str) -> URL:
        """At registration: the URL's form and every address its host has now.

        A name that does not resolve (yet: a receiver being set up, a typo) is let
        through: there is nothing to refuse, and its addresses are checked at every
        delivery, as every name's are; a failed delivery says why."""
        parsed = self.check_url(url)
        host = parsed.raw_host
        assert host is not None and parsed.port is not None  # check_url made sure
        if _literal(host) is not None:
            return parsed
        try:
            found = await self.dns.resolve(host, parsed.port, socket.AF_UNSPEC)
        except OSError:
            return parsed
        for result in found:
            if reason := self.verdict(host, ipaddress.ip_address(result["host"])):
                raise TargetRefused(f"{host} resolves to {reason}")
        return parsed

    def resolver(self) -> GuardedResolver:
        """A resolver for the HTTP client of deliveries."""
        return GuardedResolver(self)


class GuardedResolver(AbstractResolver):
    """DNS for deliveries: only the addresses the rule permits reach the connector, so
    the address a delivery connects to is one that was checked. (aiohttp asks no
    resolver for a literal address: `Guard.check_url` checks those.)"""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self.guard.dns.resolve(host, port, family)
        permitted, reasons = [], []
        for result in found:
            reason = self.guard.verdict(host, ipaddress.ip_address(result["host"]))
            if reason is None:
                permitted.append(result)
            else:
                reasons.append(reason)
        if not permitted:
            raise TargetRefused(f"{host} resolves to {reasons[0] if reasons else 'nothing'}")
        return permitted

    async def close(self) -> None:
        """Nothing to close: the guard's resolver serves registrations too."""

"""The SSRF rule: which addresses a webhook may reach, and how the guard applies it at
registration and to what DNS answers at delivery."""

from __future__ import annotations

import ipaddress
import re
import socket

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from services.scheduler.egress import AllowList, Guard, TargetRefused, allowed_entry, refusal


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.251", "multicast"),
        ("224.0.1.1", "multicast"),
        ("ff0e::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "not a global unicast"),  # carrier-grade NAT
        ("203.0.113.80", "private"),  # documentation (TEST-NET-3)
        ("::ffff:10.0.0.1", "embeds 10.0.0.1 is a private"),
        ("2002:c0a8:0101::1", "embeds 192.168.1.1 is a private"),  # 6to4
        ("64:ff9b::7f00:1", "embeds 127.0.0.1 is a loopback"),  # NAT64
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
    ],
)
def test_addresses_that_are_not_global_unicast_are_refused(address: str, kind: str) -> None:
    reason = refusal(ipaddress.ip_address(address))
    assert reason is not None and kind in reason


@pytest.mark.parametrize(
    "address", ["93.184.215.14", "2606:4700::1", "::ffff:93.184.215.14", "64:ff9b::5db8:d70e"]
)
def test_global_unicast_addresses_are_fair_targets(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


def test_allow_list_entries_are_names_addresses_or_networks() -> None:
    assert allowed_entry(" Hooks.Lab.Internal. ") == "hooks.lab.internal"
    assert allowed_entry("10.20.0.0/16") == "10.20.0.0/16"
    assert allowed_entry("127.0.0.1") == "127.0.0.1/32"
    for bad in ("hooks lab", "https://hooks.lab", "10.0.0.0/33", ""):
        with pytest.raises(ValueError):
            allowed_entry(bad)


class FakeDns(AbstractResolver):
    """What DNS says, per name."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host not in self.answers:
            raise OSError(f"{host} is unknown")
        return [
            {"hostname": host, "host": address, "port": port, "family": family, "proto": 0,
             "flags": 0}
            for address in self.answers[host]
        ]  # fmt: skip

    async def close(self) -> None:
        pass


DNS = FakeDns(
    {
        "public.example": ["93.184.215.14"],
        "mixed.example": ["93.184.215.14", "10.0.0.7"],
        "internal.example": ["10.0.0.7"],
        "hooks.lab": ["10.9.9.9"],
    }
)


def guard(*allowed: str) -> Guard:
    return Guard(AllowList.parse(allowed), DNS)


async def test_registration_needs_every_address_of_the_name_to_pass() -> None:
    await guard().check("https://public.example/hook")
    await guard().check("https://unknown.example/")  # checked when it resolves, at delivery
    for url, reason in [
        ("https://mixed.example/", "10.0.0.7 is a private address"),
        ("https://internal.example/", "10.0.0.7 is a private address"),
        ("http://public.example/", "https://"),
    ]:
        with pytest.raises(TargetRefused, match=re.escape(reason)):
            await guard().check(url)


async def test_the_allow_list_admits_its_names_and_networks_over_http_too() -> None:
    await guard("hooks.lab").check("http://hooks.lab:8080/medhive")
    await guard("10.0.0.0/8").check("http://10.1.2.3/medhive")
    await guard("10.0.0.0/8").check("https://internal.example/")
    with pytest.raises(TargetRefused, match="allow-listed"):  # the name is not listed
        await guard("10.0.0.0/8").check("http://internal.example/")


async def test_at_delivery_only_permitted_addresses_reach_the_connector() -> None:
    resolver = guard().resolver()
    permitted = await resolver.resolve("mixed.example", 443)
    assert [r["host"] for r in permitted] == ["93.184.215.14"]
    with pytest.raises(TargetRefused, match=r"10\.0\.0\.7 is a private address"):
        await resolver.resolve("internal.example", 443)
    allowed = await guard("internal.example").resolver().resolve("internal.example", 443)
    assert [r["host"] for r in allowed] == ["10.0.0.7"]

"""netgw against real dnsmasq and nftables in network namespaces, with stand-in guests
that take their address by DHCP and serve TCP like the VM test guest does."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient

from shared.bus import Bus
from shared.envelope import utcnow
from shared.messages.base import Payload
from shared.messages.net import (
    NetFailed,
    NetForward,
    NetForwarded,
    NetLease,
    NetLeased,
    NetRelease,
    NetReleased,
)
from shared.settings import AmqpSettings, MongoSettings
from tests.fixtures.vmnet import EXTERNAL_IP, VmNet, sh
from tests.helpers import event_tap
from tests.processes import Stack


async def lease(bus: Bus, job_id: str, expires_in_s: float = 3600) -> Payload:
    request = NetLease(
        job_id=job_id,
        attempt=1,
        node_id="node-a",
        expires_at=utcnow() + timedelta(seconds=expires_in_s),
    )
    return await bus.request("net.lease", request, correlation_id=job_id)


async def forward(bus: Bus, job_id: str, port: int, wait_s: float = 10) -> Payload:
    request = NetForward(job_id=job_id, attempt=1, name="ssh", port=port, wait_s=wait_s)
    return await bus.request("net.forward", request, correlation_id=job_id, timeout_s=60)


async def release(bus: Bus, job_id: str) -> Payload:
    request = NetRelease(job_id=job_id, attempt=1)
    return await bus.request("net.release", request, correlation_id=job_id)


async def stored_forwards(mongo_settings: MongoSettings, db_prefix: str) -> list[dict[str, Any]]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        mongo_settings.url.get_secret_value()
    )
    try:
        return await client[f"{db_prefix}netgw"]["forwards"].find().to_list()
    finally:
        await client.close()


def external_port(reply: Payload) -> int:
    assert isinstance(reply, NetForwarded), reply
    host, port = reply.external.split(":")
    assert host == EXTERNAL_IP
    return int(port)


async def test_a_guest_is_reached_through_its_forward_until_release(
    netgw: Stack,
    vmnet: VmNet,
    bus: Bus,
    amqp_settings: AmqpSettings,
    mongo_settings: MongoSettings,
    db_prefix: str,
    udhcpc_script: Any,
) -> None:
    await netgw.start("netgw")
    job = f"job-{uuid.uuid4().hex[:8]}"
    async with event_tap(amqp_settings, ["net.*"]) as tap:
        leased = await lease(bus, job)
        assert isinstance(leased, NetLeased)
        mac, ip = leased.mac, leased.ip
        assert mac.startswith("02:6d:68:")
        assert f"{mac},{ip}" in vmnet.dhcp_hosts()
        assert await lease(bus, job) == leased  # a repeated request

        guest = vmnet.guest(mac)
        assert await asyncio.to_thread(guest.dhcp, udhcpc_script) == ip

        # Nothing listens yet: netgw checks before it forwards, and says so.
        early = await forward(bus, job, 2222, wait_s=0.5)
        assert isinstance(early, NetFailed)
        assert early.retryable is True
        assert f"{ip}:2222" in early.reason
        # The forward stored while the guest was probed is gone again, and had no rule.
        assert await stored_forwards(mongo_settings, db_prefix) == []
        assert vmnet.forward_rules() == []

        guest.serve(2222, "medhive-guest ready")
        port = external_port(await forward(bus, job, 2222))
        assert await asyncio.to_thread(vmnet.connect, EXTERNAL_IP, port) == b"medhive-guest ready\n"
        assert len(vmnet.forward_rules()) == 1
        assert external_port(await forward(bus, job, 2222)) == port  # repeated: same port
        assert len(vmnet.forward_rules()) == 1

        released = await release(bus, job)
        assert isinstance(released, NetReleased)
        assert released.forwards == [f"{EXTERNAL_IP}:{port}"]
        assert await asyncio.to_thread(vmnet.refuses, port)
        assert vmnet.forward_rules() == []
        assert vmnet.dhcp_hosts() == []
        # Each answer was also published for audit.
        for kind in ("net.leased", "net.failed", "net.forwarded", "net.released"):
            await tap.wait_for(lambda m, k=kind: m["type"] == k and m["correlation_id"] == job)


async def test_concurrent_leases_never_share_an_address_and_a_full_pool_says_so(
    netgw: Stack, bus: Bus
) -> None:
    await netgw.start("netgw", MEDHIVE_NETGW_IP_RANGE='["10.77.0.100", "10.77.0.104"]')
    jobs = [f"job-{i}-{uuid.uuid4().hex[:6]}" for i in range(8)]
    replies = await asyncio.gather(*(lease(bus, job) for job in jobs))
    granted = [r for r in replies if isinstance(r, NetLeased)]
    refusals = [r for r in replies if isinstance(r, NetFailed)]
    assert len(granted) == 5
    assert len({r.mac for r in granted}) == 5
    assert len({r.ip for r in granted}) == 5
    assert len(refusals) == 3
    for reply in refusals:
        assert reply.reason == "all 5 guest addresses are leased"
        assert reply.retryable is True
    # A released address is handed out again.
    await release(bus, granted[0].job_id)
    again = await lease(bus, refusals[0].job_id)
    assert isinstance(again, NetLeased)
    assert again.ip == granted[0].ip


async def test_forwarding_without_a_lease_is_refused(netgw: Stack, bus: Bus) -> None:
    await netgw.start("netgw")
    reply = await forward(bus, "job-without-lease", 22, wait_s=0)
    assert isinstance(reply, NetFailed)
    assert reply.retryable is False
    assert "holds no lease" in reply.reason


async def test_a_restart_keeps_live_forwards_and_drops_expired_ones(
    netgw: Stack, vmnet: VmNet, bus: Bus, amqp_settings: AmqpSettings, udhcpc_script: Any
) -> None:
    await netgw.start("netgw", MEDHIVE_NETGW_LEASE_GRACE_S="0", MEDHIVE_NETGW_SWEEP_S="3600")
    live, dying = f"live-{uuid.uuid4().hex[:6]}", f"dying-{uuid.uuid4().hex[:6]}"
    ports = {}
    for job in (live, dying):
        leased = await lease(bus, job)
        assert isinstance(leased, NetLeased)
        guest = vmnet.guest(leased.mac)
        await asyncio.to_thread(guest.dhcp, udhcpc_script)
        guest.serve(2222, f"guest of {job}")
        ports[job] = external_port(await forward(bus, job, 2222))
    assert len(vmnet.forward_rules()) == 2

    netgw.kill("netgw")
    # The forward still works while netgw is down: the kernel forwards, not netgw.
    assert await asyncio.to_thread(vmnet.connect, EXTERNAL_IP, ports[live]) == (
        f"guest of {live}\n".encode()
    )
    # While netgw is down, `dying`'s lease runs out (its job's walltime passed meanwhile).
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(netgw.env["MEDHIVE_MONGO_URL"])
    leases = client[netgw.env["MEDHIVE_NETGW_DATABASE"]]["leases"]
    expired = {"$set": {"expires_at": utcnow() - timedelta(seconds=1)}}
    assert (await leases.update_one({"job_id": dying}, expired)).modified_count == 1
    await client.close()

    async with event_tap(amqp_settings, ["net.released"]) as tap:
        await netgw.restart("netgw")
        await tap.wait_for(lambda m: m["correlation_id"] == dying)
    rules = vmnet.forward_rules()
    assert len(rules) == 1, rules  # the live one, not doubled
    assert f"medhive:{live}:1:ssh" in rules[0]
    assert await asyncio.to_thread(vmnet.connect, EXTERNAL_IP, ports[live]) == (
        f"guest of {live}\n".encode()
    )
    assert await asyncio.to_thread(vmnet.refuses, ports[dying])
    assert len(vmnet.dhcp_hosts()) == 1
    # One DHCP server on the guests' network: the killed netgw's dnsmasq was replaced.
    pids = sh("ip", "netns", "pids", vmnet.gateway_ns).split()
    names = [Path(f"/proc/{pid}/comm").read_text().strip() for pid in pids]
    assert names.count("dnsmasq") == 1


async def test_a_port_taken_behind_its_back_leaves_no_rule_and_the_next_port_is_used(
    netgw: Stack,
    vmnet: VmNet,
    bus: Bus,
    mongo_settings: MongoSettings,
    db_prefix: str,
    udhcpc_script: Any,
) -> None:
    """The rule goes in while the forward is being stored; when storing fails, the rule
    comes out again and the retried request gets the next port."""
    await netgw.start("netgw")
    job = f"job-{uuid.uuid4().hex[:8]}"
    leased = await lease(bus, job)
    assert isinstance(leased, NetLeased)
    guest = vmnet.guest(leased.mac)
    assert await asyncio.to_thread(guest.dhcp, udhcpc_script) == leased.ip
    guest.serve(2222, "medhive-guest ready")
    # The first port of the pool (41000 in this netgw's range), stored by someone else.
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        mongo_settings.url.get_secret_value()
    )
    try:
        await client[f"{db_prefix}netgw"]["forwards"].insert_one(
            {"_id": "medhive:elsewhere:1:ssh", "lease_id": "elsewhere:1", "external_port": 41000}
        )
    finally:
        await client.close()

    port = external_port(await forward(bus, job, 2222))
    assert port == 41001
    (rule,) = vmnet.forward_rules()
    assert "dport 41001" in rule and f"medhive:{job}:1:ssh" in rule
    assert await asyncio.to_thread(vmnet.connect, EXTERNAL_IP, port) == b"medhive-guest ready\n"
    assert await asyncio.to_thread(vmnet.refuses, 41000)

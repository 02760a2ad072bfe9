"""Port forwards as nftables rules in the gateway's own table, `ip medhive_netgw`.

netgw owns that table and nothing else: it never touches other tables. Each forward
is one DNAT rule in `prerouting`, commented with the forward's id so the live ruleset
can be compared with the store. `postrouting` masquerades forwarded connections
towards the guests (a guest then answers through the gateway whatever its routes) and,
when egress is allowed, the guests' own connections out. `forward` refuses
connections the guests open unless egress is allowed.

The nftables binding (libnftables) acts in the namespace of the calling thread, so
every call runs on the namespace's serial thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import nftables
import structlog

from services.netgw.netns import Namespace

log = structlog.get_logger("medhive.netgw.firewall")

TABLE = "medhive_netgw"


def _chain(hook: str, kind: str, priority: str) -> str:
    return f"add chain ip {TABLE} {hook} {{ type {kind} hook {hook} priority {priority}; }}"


class FirewallError(Exception):
    """nftables refused a command."""


@dataclass(frozen=True)
class Rule:
    """A forward as the firewall sees it."""

    forward_id: str
    external_port: int
    guest_ip: str
    guest_port: int


class Firewall:
    """The gateway's nftables table: base chains plus one DNAT rule per forward."""

    def __init__(
        self,
        namespace: Namespace,
        *,
        guest_interface: str,
        guest_network: str,
        external_address: str,
        allow_egress: bool,
    ) -> None:
        self.ns = namespace
        self.guest_interface = guest_interface
        self.guest_network = guest_network
        self.external_address = external_address
        self.allow_egress = allow_egress
        self._nft: nftables.Nftables | None = None

    # -- on the namespace's thread ----------------------------------------------------

    def _run(self, commands: str) -> Any:
        if self._nft is None:
            self._nft = nftables.Nftables()
            self._nft.set_json_output(True)
            self._nft.set_handle_output(True)
        rc, out, err = self._nft.cmd(commands)
        if rc != 0:
            raise FirewallError(err.strip() or f"nft exited {rc}")
        return json.loads(out) if out.strip() else None

    def _base(self) -> None:
        egress = (
            f'iifname "{self.guest_interface}" accept'
            if self.allow_egress
            else f'iifname "{self.guest_interface}" ct state new drop'
        )
        self._run(
            "\n".join(
                [
                    f"add table ip {TABLE}",
                    _chain("prerouting", "nat", "dstnat"),
                    _chain("postrouting", "nat", "srcnat"),
                    _chain("forward", "filter", "filter"),
                    f"flush chain ip {TABLE} postrouting",
                    f"flush chain ip {TABLE} forward",
                    f'add rule ip {TABLE} postrouting oifname "{self.guest_interface}" '
                    "ct status dnat masquerade",
                    *(
                        [
                            f"add rule ip {TABLE} postrouting ip saddr {self.guest_network} "
                            f'oifname != "{self.guest_interface}" masquerade'
                        ]
                        if self.allow_egress
                        else []
                    ),
                    f"add rule ip {TABLE} forward ct state established,related accept",
                    f"add rule ip {TABLE} forward ct status dnat accept",
                    f"add rule ip {TABLE} forward {egress}",
                ]
            )
        )

    def _listed(self) -> list[tuple[int, str]]:
        """(handle, comment) of every rule in `prerouting`."""
        listing = self._run(f"list chain ip {TABLE} prerouting")
        rules = []
        for item in listing["nftables"]:
            rule = item.get("rule")
            if rule is not None:
                rules.append((int(rule["handle"]), str(rule.get("comment", ""))))
        return rules

    def _add(self, rule: Rule) -> None:
        self._run(
            f"add rule ip {TABLE} prerouting ip daddr {self.external_address} "
            f"tcp dport {rule.external_port} dnat to {rule.guest_ip}:{rule.guest_port} "
            f'comment "{rule.forward_id}"'
        )

    def _remove(self, forward_id: str) -> int:
        handles = [h for h, comment in self._listed() if comment == forward_id]
        for handle in handles:
            self._run(f"delete rule ip {TABLE} prerouting handle {handle}")
        return len(handles)

    def _reconcile(self, live: list[Rule]) -> tuple[int, int]:
        """Make `prerouting` hold exactly one rule per live forward."""
        self._base()
        wanted = {rule.forward_id: rule for rule in live}
        seen: set[str] = set()
        removed = 0
        for handle, comment in self._listed():
            if comment not in wanted or comment in seen:
                self._run(f"delete rule ip {TABLE} prerouting handle {handle}")
                removed += 1
            seen.add(comment)
        missing = [rule for fid, rule in wanted.items() if fid not in seen]
        for rule in missing:
            self._add(rule)
        return removed, len(missing)

    # -- from the loop ------------------------------------------------------------

    async def reconcile(self, live: list[Rule]) -> None:
        removed, restored = await self.ns.serial(self._reconcile, live)
        log.info("firewall_reconciled", live=len(live), removed=removed, restored=restored)

    async def add(self, rule: Rule, *, new: bool) -> None:
        """Add the forward's rule; for a forward that is not `new` (a repeated request)
        only if it is missing, so no rule is ever doubled."""

        def add_once() -> None:
            if new or not any(comment == rule.forward_id for _, comment in self._listed()):
                self._add(rule)

        await self.ns.serial(add_once)

    async def remove(self, forward_id: str) -> int:
        return await self.ns.serial(self._remove, forward_id)

    async def rules(self) -> list[str]:
        """The comments of the forward rules in place (for tests and health)."""
        return [comment for _, comment in await self.ns.serial(self._listed)]

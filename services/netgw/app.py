"""Builds the network gateway's app: the shared wiring plus the gateway itself.

Start order: store, data plane reconciled with the store (expired leases swept
first), then the request consumer and the sweeper; shutdown in reverse. dnsmasq stops
with netgw; the nftables rules stay, and the next start reconciles them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from services.netgw.dhcp import Dhcp
from services.netgw.firewall import Firewall
from services.netgw.gateway import Gateway, Sweeper
from services.netgw.handlers import REQUESTS, RequestHandlers
from services.netgw.metrics import PoolCollector
from services.netgw.netns import Namespace
from services.netgw.settings import NetgwSettings
from services.netgw.store import NetStore
from shared.consume import trusted_senders
from shared.metrics import METRICS
from shared.service import BUS, MONGO, create_service_app

GATEWAY = web.AppKey("gateway", Gateway)


def create_app(settings: NetgwSettings) -> web.Application:
    """The gateway's app; it does no I/O until started."""
    app = create_service_app("netgw", settings.amqp, settings.mongo)

    async def gateway(app: web.Application) -> AsyncIterator[None]:
        store = NetStore(app[MONGO][settings.database], settings)
        await store.load()
        namespace = Namespace(settings.netns)
        firewall = Firewall(
            namespace,
            guest_interface=settings.guest_interface,
            guest_network=str(settings.guest_network.network),
            external_address=str(settings.external_address),
            allow_egress=settings.allow_egress,
        )
        gw = Gateway(app[BUS], store, settings, namespace, firewall, Dhcp(settings, namespace))
        await gw.start()
        service_users = settings.amqp.service_users(settings.trusted_users)
        consumer = await app[BUS].consume(
            REQUESTS, RequestHandlers(gw, app[BUS]), authorize=trusted_senders(service_users)
        )
        sweeper = Sweeper(gw, settings.sweep_s)
        await sweeper.start()
        app[GATEWAY] = gw
        app[METRICS].add(PoolCollector(store))
        yield
        await sweeper.stop()
        await consumer.stop()
        await gw.stop()
        namespace.close()

    app.cleanup_ctx.append(gateway)
    return app

"""`python -m services.netgw`: run the network gateway of this host."""

from __future__ import annotations

from aiohttp import web

from services.netgw.app import create_app
from services.netgw.settings import NetgwSettings
from shared.logging import configure_logging


def main() -> None:
    configure_logging()
    settings = NetgwSettings()
    web.run_app(create_app(settings), host=settings.host, port=settings.port, print=None)


if __name__ == "__main__":
    main()

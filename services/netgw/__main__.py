"""`python -m services.netgw`: run the network gateway of this host."""

from __future__ import annotations

from services.netgw.app import create_app
from services.netgw.settings import NetgwSettings
from shared.logging import configure_logging
from shared.server import run_service


def main() -> None:
    configure_logging()
    settings = NetgwSettings()
    run_service(create_app(settings), host=settings.host, port=settings.port)


if __name__ == "__main__":
    main()

"""`python -m services.vmnode`: run the node agent of this host."""

from __future__ import annotations

from aiohttp import web

from services.vmnode.app import create_app
from services.vmnode.settings import NodeSettings
from shared.logging import configure_logging


def main() -> None:
    configure_logging()
    settings = NodeSettings()
    web.run_app(create_app(settings), host=settings.host, port=settings.port, print=None)


if __name__ == "__main__":
    main()

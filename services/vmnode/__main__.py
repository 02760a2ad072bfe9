"""`python -m services.vmnode`: run the node agent of this host."""

from __future__ import annotations

from services.vmnode.app import create_app
from services.vmnode.settings import NodeSettings
from shared.logging import configure_logging
from shared.server import run_service


def main() -> None:
    configure_logging()
    settings = NodeSettings()
    run_service(create_app(settings), host=settings.host, port=settings.port)


if __name__ == "__main__":
    main()

"""`python -m services.audit`: the audit service with settings from the environment."""

from aiohttp import web

from services.audit.app import create_app
from services.audit.settings import AuditSettings
from shared.logging import configure_logging


def main() -> None:
    configure_logging()
    settings = AuditSettings()
    web.run_app(create_app(settings), host=settings.host, port=settings.port, print=None)


if __name__ == "__main__":
    main()

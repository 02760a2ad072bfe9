"""`python -m services.audit`: the audit service with settings from the environment."""

from services.audit.app import create_app
from services.audit.settings import AuditSettings
from shared.logging import configure_logging
from shared.server import run_service


def main() -> None:
    configure_logging()
    settings = AuditSettings()
    run_service(create_app(settings), host=settings.host, port=settings.port)


if __name__ == "__main__":
    main()

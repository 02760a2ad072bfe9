"""`python -m services.datacache`: the datacache with settings from the environment."""

from services.datacache.app import create_app
from services.datacache.settings import DatacacheSettings
from shared.logging import configure_logging
from shared.server import run_service


def main() -> None:
    configure_logging()
    settings = DatacacheSettings()
    run_service(create_app(settings), host=settings.host, port=settings.port)


if __name__ == "__main__":
    main()

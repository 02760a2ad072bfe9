"""`python -m services.datacache`: the datacache with settings from the environment."""

from aiohttp import web

from services.datacache.app import create_app
from services.datacache.settings import DatacacheSettings
from shared.logging import configure_logging


def main() -> None:
    configure_logging()
    settings = DatacacheSettings()
    web.run_app(create_app(settings), host=settings.host, port=settings.port, print=None)


if __name__ == "__main__":
    main()

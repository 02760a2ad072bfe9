"""`python -m services.scheduler`: run the scheduler with settings from the environment."""

from aiohttp import web

from services.scheduler.app import create_app
from services.scheduler.settings import SchedulerSettings
from shared.logging import configure_logging


def main() -> None:
    configure_logging()
    settings = SchedulerSettings()
    web.run_app(create_app(settings), host=settings.host, port=settings.port, print=None)


if __name__ == "__main__":
    main()

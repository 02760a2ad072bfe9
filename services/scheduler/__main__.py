"""`python -m services.scheduler`: run the scheduler with settings from the environment."""

from services.scheduler.app import create_app
from services.scheduler.settings import SchedulerSettings
from shared.logging import configure_logging
from shared.server import run_service


def main() -> None:
    configure_logging()
    settings = SchedulerSettings()
    run_service(create_app(settings), host=settings.host, port=settings.port)


if __name__ == "__main__":
    main()

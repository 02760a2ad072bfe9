# One image for every medhive service; the service is the argument:
#   docker run medhive services.audit
# ENTRYPOINT is `python -m`, so CMD names the module (`services.<name>`); the default
# runs the scheduler. docker-compose.yml builds this once and runs each service from it.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed uid/gid so volume ownership and socket group grants are predictable.
RUN groupadd --system --gid 10001 medhive \
 && useradd --system --uid 10001 --gid medhive --create-home --home-dir /home/medhive \
      --shell /usr/sbin/nologin medhive

WORKDIR /src
# The metadata first, then the packages (the only ones pyproject.toml installs).
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY medhive ./medhive
COPY bench ./bench
# A regular (non-editable) install: the code runs from site-packages, and the source
# tree is removed so nothing in the image shadows what was installed.
RUN pip install . \
 && rm -rf /src

USER medhive
WORKDIR /home/medhive

# scheduler API, audit API, node agent health endpoint
EXPOSE 8080 8081 8083

ENTRYPOINT ["python", "-m"]
CMD ["services.scheduler"]

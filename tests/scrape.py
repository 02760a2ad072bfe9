"""Reading a service's `/metrics` in the tests, parsed as Prometheus parses it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from yarl import URL

from tests.helpers import bearer


class Scrape:
    """One read of `/metrics`."""

    def __init__(self, text: str) -> None:
        families = list(text_string_to_metric_families(text))
        #: Family names (a counter's without its `_total`).
        self.names = {family.name for family in families}
        self.samples: list[Sample] = [sample for family in families for sample in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` that have these labels (0 for none)."""
        return sum(
            sample.value
            for sample in self.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )


async def status_of(url: str | URL, headers: dict[str, str]) -> int:
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as response:
        return response.status


async def scrape(url: str | URL, token: str) -> Scrape:
    """`/metrics` at `url`, read with `token` (of role metrics or operator)."""
    async with aiohttp.ClientSession() as http, http.get(url, headers=bearer(token)) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "text/plain"
        return Scrape(await response.text())


async def scrape_until(
    url: str | URL, token: str, check: Callable[[Scrape], bool], within: float = 10.0
) -> Scrape:
    """Scrape until `check` holds: a count may move just after the event a test waited
    on (a delivery is counted once it is acknowledged)."""
    async with asyncio.timeout(within):
        while not check(scraped := await scrape(url, token)):  # noqa: ASYNC110 - no event
            await asyncio.sleep(0.02)  # the count moves in the service, with nothing to await
    return scraped

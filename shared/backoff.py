"""Doubling waits: the one way medhive waits before it tries something again."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Waits of `first_s`, then twice the last, never more than `most_s`.

    Trying again at once would hammer a peer that is down (a broker restarting, a PACS
    that is busy); waiting long from the first would slow every brief hiccup. Doubling
    from a short first wait to a bound does both."""

    first_s: float
    most_s: float
    _next_s: float | None = field(default=None, init=False, repr=False)

    def next(self) -> float:
        """The wait before the next try (each call is one more try)."""
        wait = self.first_s if self._next_s is None else self._next_s
        self._next_s = min(wait * 2, self.most_s)
        return wait

    def after(self, tries: int) -> float:
        """The wait after `tries` earlier tries, when their count is all that is known
        (a redelivered message carries it, the process that tried may be gone)."""
        return float(min(self.first_s * 2**tries, self.most_s))

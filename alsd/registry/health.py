"""What each registry host has been doing: observed speed, derived limits, fault counters.

The transport (transport.py) feeds every answer into the host's :class:`HostHealth`:
the time to the first byte of the headers and the rate at which bodies arrive, as moving
averages. From them come the two limits that keep a slow or stalled answer from being
waited out:

* :meth:`HostHealth.stall_after_s`: a body that sends no byte for this long is broken off
  and asked again at once (``stall_factor`` times the usual time to first byte, between
  ``stall_min_s`` and ``stall_max_s``);
* :meth:`HostHealth.hedge_after_s`: a blob read that has not finished this long after it
  was sent gets a second, identical request; the first answer wins (``hedge_factor``
  times the usual time for that many bytes, between ``hedge_min_s`` and ``hedge_max_s``).

Until a host has answered a few times the limits are the floors' multiples a fresh link
would have; the ceilings keep a host that was slow once from being trusted to be slow.

It also counts, per host, the retries, hedges, stalls and faults (any failed attempt:
reset, truncation, stall, timeout, 5xx/429) for /status and /metrics, and rate-limits the
info-level log line each of them gets (one per host per ``LOG_INTERVAL_S``, with the
number of similar lines left out).

Concurrency: one event loop; plain attribute updates.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from alsd.config import RegistrySettings

log = logging.getLogger("alsd.registry")

LOG_INTERVAL_S = 5.0
_ALPHA = 0.2  # weight of a new observation in the moving averages
_MIN_RATE_BODY = 64 << 10  # smaller bodies say little about throughput


@dataclass
class HostHealth:
    host: str
    settings: RegistrySettings
    requests: int = 0
    retries: int = 0
    hedges: int = 0
    hedges_won: int = 0  # the second request answered first
    stalls: int = 0
    faults: int = 0
    ttfb_s: float | None = None  # moving average of send -> response headers
    rate_bps: float | None = None  # moving average of body bytes per second
    _last_log: float = 0.0
    _suppressed: int = 0
    _fault_kinds: dict[str, int] = field(default_factory=dict)

    # ------------------------------------------------------------ observations

    def observe_ttfb(self, seconds: float) -> None:
        self.ttfb_s = seconds if self.ttfb_s is None else _ewma(self.ttfb_s, seconds)

    def observe_body(self, nbytes: int, seconds: float) -> None:
        if nbytes < _MIN_RATE_BODY or seconds <= 0:
            return
        rate = nbytes / seconds
        self.rate_bps = rate if self.rate_bps is None else _ewma(self.rate_bps, rate)

    # ------------------------------------------------------------ derived limits

    def stall_after_s(self) -> float:
        s = self.settings
        base = self.ttfb_s if self.ttfb_s is not None else s.stall_min_s / s.stall_factor
        return _clamp(s.stall_factor * base, s.stall_min_s, s.stall_max_s)

    def expected_s(self, nbytes: int) -> float:
        """How long a request for ``nbytes`` usually takes from this host (None-safe)."""
        ttfb = self.ttfb_s if self.ttfb_s is not None else 0.0
        rate = self.rate_bps
        return ttfb + (nbytes / rate if rate else 0.0)

    def hedge_after_s(self, nbytes: int) -> float:
        s = self.settings
        return _clamp(s.hedge_factor * self.expected_s(nbytes), s.hedge_min_s, s.hedge_max_s)

    # ------------------------------------------------------------ counting + logging

    def fault(self, kind: str) -> None:
        self.faults += 1
        self._fault_kinds[kind] = self._fault_kinds.get(kind, 0) + 1

    def note(self, message: str, *args: Any) -> None:
        """Log at info, at most once per LOG_INTERVAL_S for this host."""
        now = time.monotonic()
        if now - self._last_log < LOG_INTERVAL_S:
            self._suppressed += 1
            return
        if self._suppressed:
            message += " (%d similar line(s) left out)"
            args = (*args, self._suppressed)
        self._last_log = now
        self._suppressed = 0
        log.info(message, *args)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "retries": self.retries,
            "hedges": self.hedges,
            "hedges_won": self.hedges_won,
            "stalls": self.stalls,
            "faults": self.faults,
            "faults_by_kind": dict(self._fault_kinds),
            "ttfb_ms": None if self.ttfb_s is None else round(self.ttfb_s * 1000, 1),
            "rate_mb_s": None if self.rate_bps is None else round(self.rate_bps / 1e6, 2),
            "stall_after_s": round(self.stall_after_s(), 2),
        }


def _ewma(old: float, new: float) -> float:
    return (1 - _ALPHA) * old + _ALPHA * new


def _clamp(x: float, lo: float, hi: float) -> float:
    return max(lo, min(hi, x))

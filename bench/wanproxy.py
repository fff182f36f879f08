"""A userspace TCP proxy that emulates a wide-area link: bandwidth cap, latency, byte counts.

The kernel on the machines this project targets has no ``netem`` qdisc, so the link between
podman/alsd and a loopback registry is emulated here, in user space::

    python -m bench.wanproxy --listen 127.0.0.1:5001 --upstream 127.0.0.1:5000 \
        --rate-mbit 100 --rtt-ms 20 --stats-file /tmp/link.json

Model (per direction, shared by every connection, like one physical link):

* bandwidth: a token bucket of ``rate`` bytes/s with a ``burst`` (default 32 KiB); bytes are
  paced *before* they are delayed (serialisation, then propagation). Reservations are
  made without an ``await`` in between, so concurrent connections share the link FIFO.
* latency: every byte is delivered ``rtt/2`` after it left the bucket, in each direction,
  so a request/response costs one RTT. A new connection's first bytes upstream wait one
  extra RTT, standing in for the TCP handshake that loopback does for free.
* counting: bytes in each direction and connections, readable with :meth:`WanProxy.stats`,
  written as JSON to ``--stats-file`` every second and at exit, and printed at exit.

As a module, :class:`WanProxy` runs its own event loop in a daemon thread so that a
synchronous benchmark runner can ``start()``, ``reset()``, read ``stats()`` and ``stop()`` it.

Concurrency: everything but the counters runs on the proxy's event loop. The counters are
plain ints updated on the loop and read from other threads (a torn read is impossible under
the GIL; a read may lag by one chunk).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

READ_SIZE = 16 << 10  # small reads keep the pacing smooth
QUEUE_CHUNKS = 512  # bound of bytes in flight per connection direction (8 MiB)


@dataclass
class LinkStats:
    """Bytes that crossed the link; ``down`` is registry -> client."""

    down_bytes: int = 0
    up_bytes: int = 0
    connections: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class TokenBucket:
    """Paces bytes to ``rate`` bytes/s, allowing ``burst`` bytes at once.

    ``reserve`` computes the departure time of ``n`` bytes synchronously (no await), so
    callers that interleave on one event loop are served in the order they asked.
    """

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._vt = 0.0  # virtual time at which the link has sent everything reserved

    def reserve(self, n: int, now: float) -> float:
        """Seconds to wait before ``n`` bytes may leave (0 if unlimited)."""
        if self.rate <= 0:
            return 0.0
        self._vt = max(self._vt, now) + n / self.rate
        return max(0.0, self._vt - now - self.burst / self.rate)


class WanProxy:
    """Forward ``listen`` -> ``upstream`` through an emulated link."""

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        rate_mbit: float = 100.0,
        rtt_ms: float = 20.0,
        burst_bytes: int = 32 << 10,
        handshake_rtt: bool = True,
    ) -> None:
        self.upstream = upstream
        self.listen = listen
        self.rate_mbit = rate_mbit
        self.rtt_ms = rtt_ms
        self.handshake_rtt = handshake_rtt
        rate = rate_mbit * 1e6 / 8
        self._down = TokenBucket(rate, burst_bytes)
        self._up = TokenBucket(rate, burst_bytes)
        self._stats = LinkStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = listen[1]

    # ---- public, thread-safe -------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{self.listen[0]}:{self.port}"

    def stats(self) -> dict[str, int]:
        return self._stats.as_dict()

    def reset(self) -> None:
        """Zero the counters (between measurements)."""
        self._stats = LinkStats()

    def start(self) -> WanProxy:
        """Start the loop thread; returns once the port is listening."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._start_server())
            except BaseException as exc:  # reported to the caller of start()
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name="wanproxy", daemon=True)
        self._thread.start()
        ready.wait()
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._loop = None
        self._thread = None

    def __enter__(self) -> WanProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- event loop side -----------------------------------------------------------------

    async def _start_server(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.listen[0], self.listen[1])
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t

    async def serve_forever(self) -> None:
        """For the command line: run on the current loop until cancelled."""
        await self._start_server()
        assert self._server is not None
        try:
            await self._server.serve_forever()
        finally:
            await self._shutdown()

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._stats.connections += 1
        loop = asyncio.get_running_loop()
        accepted = loop.time()
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            c_writer.close()
            self._tasks.discard(task)
            return
        one_way = self.rtt_ms / 2000
        not_before = accepted + (self.rtt_ms / 1000 if self.handshake_rtt else 0.0)
        up = asyncio.create_task(
            self._pump(c_reader, u_writer, self._up, one_way, not_before, "up")
        )
        down = asyncio.create_task(self._pump(u_reader, c_writer, self._down, one_way, 0.0, "down"))
        try:
            await asyncio.gather(up, down)
        except (Exception, asyncio.CancelledError):
            # A reset connection or the proxy shutting down: close both ends quietly.
            pass
        finally:
            for t in (up, down):
                t.cancel()
            for w in (c_writer, u_writer):
                w.close()
            self._tasks.discard(task)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        bucket: TokenBucket,
        delay: float,
        not_before: float,
        direction: str,
    ) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    if writer.can_write_eof():
                        with contextlib.suppress(OSError):
                            writer.write_eof()
                    return
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        async def receive() -> None:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    await queue.put((0.0, b""))
                    return
                now = loop.time()
                wait = bucket.reserve(len(data), now)
                if wait > 0:
                    await asyncio.sleep(wait)
                if direction == "down":
                    self._stats.down_bytes += len(data)
                else:
                    self._stats.up_bytes += len(data)
                await queue.put((max(now + wait + delay, not_before + delay), data))

        # Either side failing (a peer reset) ends both: a receiver whose sender died would
        # otherwise block on a full queue for ever. gather() retrieves every exception.
        tasks = (asyncio.create_task(receive()), asyncio.create_task(deliver()))
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()


def _hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host or "127.0.0.1", int(port)


async def _amain(args: argparse.Namespace) -> None:
    proxy = WanProxy(
        _hostport(args.upstream),
        listen=_hostport(args.listen),
        rate_mbit=args.rate_mbit,
        rtt_ms=args.rtt_ms,
        burst_bytes=args.burst_kib << 10,
        handshake_rtt=not args.no_handshake_rtt,
    )
    stats_file: Path | None = args.stats_file

    def dump() -> None:
        if stats_file is not None:
            doc = {**proxy.stats(), "time": time.time()}
            tmp = stats_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc) + "\n")
            tmp.replace(stats_file)

    async def dumper() -> None:
        while True:
            await asyncio.sleep(1.0)
            dump()

    loop = asyncio.get_running_loop()
    server = asyncio.create_task(proxy.serve_forever())
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.cancel)
    loop.add_signal_handler(signal.SIGUSR1, proxy.reset)
    d = asyncio.create_task(dumper())
    while proxy._server is None and not server.done():  # noqa: ASYNC110 (one-off start-up poll)
        await asyncio.sleep(0.01)
    print(
        f"wanproxy: {proxy.address} -> {args.upstream}, {args.rate_mbit} Mbit/s, "
        f"{args.rtt_ms} ms RTT",
        file=sys.stderr,
        flush=True,
    )
    with contextlib.suppress(asyncio.CancelledError):
        await server
    d.cancel()
    dump()
    print(json.dumps(proxy.stats()), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to accept on")
    p.add_argument("--upstream", required=True, help="HOST:PORT of the registry")
    p.add_argument("--rate-mbit", type=float, default=100.0, help="bandwidth, 0 = unlimited")
    p.add_argument("--rtt-ms", type=float, default=20.0, help="added round-trip time")
    p.add_argument("--burst-kib", type=int, default=32, help="token bucket burst")
    p.add_argument("--no-handshake-rtt", action="store_true",
                   help="do not charge one RTT for each new connection")  # fmt: skip
    p.add_argument("--stats-file", type=Path, help="JSON counters, rewritten every second")
    args = p.parse_args(argv)
    asyncio.run(_amain(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

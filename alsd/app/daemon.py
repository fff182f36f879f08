"""Run the layer store: build the parts, mount, serve until a signal, tear down.

Start-up: read the configuration (a mistake is one message and exit status 2), build the
registry client, chunk store, metadata store and engine, prepare the mountpoint (create
it; lazily unmount a dead mount a killed instance left behind, since a mountpoint that
answers ENOTCONN breaks every podman command), mount with pyfuse3 in asyncio mode, start
the control socket, tell systemd READY=1.

Shut-down (SIGTERM/SIGINT): ``pyfuse3.terminate()`` stops taking FUSE requests; those
in flight get ``STOP_GRACE_S`` to finish, then answer EIO; an
AsyncExitStack then tears down in reverse order of construction: control socket,
unmount, engine (cancels fetches; metadata is saved as layers resolve), chunk store
(flushes and marks clean), registry sessions. Exit status 0.

Concurrency: everything runs on one event loop; pyfuse3 runs at most ``[fuse] max_tasks``
handlers at a time (each awaits inline in a worker task, so this bounds in-flight kernel
requests and, through them, the registry fetches they trigger).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from contextlib import AsyncExitStack
from typing import Any

from alsd.app import control, wiring
from alsd.app.mount import mount_options, prepare_mountpoint, pyfuse3_module, set_read_ahead
from alsd.app.service import sd_notify, setup_logging
from alsd.config import Config
from alsd.errors import EXIT_FAILED, EXIT_USAGE, AlsdError, ConfigError

log = logging.getLogger("alsd")

# After SIGTERM/SIGINT, requests still in flight (a read or lookup waiting on a slow or
# silent registry) get this long before they are answered EIO; well below systemd's
# default TimeoutStopSec (90 s), past which a SIGKILL would leave a dead mount.
STOP_GRACE_S = 5.0


def main(cfg: Config) -> int:
    """Run with ``cfg`` until SIGTERM/SIGINT; the process exit status."""
    setup_logging(cfg.log_level)
    try:
        return asyncio.run(run(cfg))
    except ConfigError as exc:  # registries.conf or an auth file, read at start-up
        log.error("%s", exc)
        return EXIT_USAGE
    except (AlsdError, OSError, RuntimeError) as exc:
        log.error("cannot start: %s", exc)
        return EXIT_FAILED


def loop_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The default handler, except for one harmless pyfuse3 race at shutdown.

    pyfuse3.asyncio waits for the FUSE fd with ``loop.add_reader(fd, future.set_result)``;
    ``terminate()`` fails that future, but when the fd was already readable in the same
    loop iteration the queued reader callback still runs and ``set_result`` raises
    InvalidStateError, which asyncio would log as an error with a traceback.
    """
    exc = context.get("exception")
    if isinstance(exc, asyncio.InvalidStateError) and "Future.set_result" in repr(
        context.get("handle")
    ):
        log.debug("ignored at shutdown: %s", context.get("message"))
        return
    loop.default_exception_handler(context)


async def run(cfg: Config) -> int:
    """Mount, serve until SIGTERM/SIGINT, unmount. Raises on start-up failure."""
    pyfuse3 = pyfuse3_module()
    started = time.time()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(loop_exception_handler)

    async with AsyncExitStack() as stack:
        parts = await wiring.open_parts(cfg, stack)
        ops, manager = parts.ops, parts.manager

        prepare_mountpoint(cfg.mountpoint)
        if cfg.fuse.read_ahead_kb:
            kib = cfg.fuse.read_ahead_kb

            def after_init() -> None:
                set_read_ahead(cfg.mountpoint, kib)

            ops.after_init = after_init
        pyfuse3.init(ops, cfg.mountpoint, mount_options())

        def close_fuse() -> None:
            # Unmount even after a failure: a dead mount breaks every podman command.
            log.info("unmounting %s", cfg.mountpoint)
            pyfuse3.close(unmount=True)

        stack.callback(close_fuse)

        await stack.enter_async_context(
            control.serve(
                cfg.control.socket,
                engine=manager,
                ops=ops,
                credentials=parts.credentials.helper,
                started_at=started,
                mountpoint=cfg.mountpoint,
                registry=parts.registry.transport,
            )
        )
        if cfg.control.metrics_address is not None:
            await stack.enter_async_context(
                control.serve_metrics(
                    cfg.control.metrics_address,
                    engine=manager,
                    ops=ops,
                    started_at=started,
                    mountpoint=cfg.mountpoint,
                    registry=parts.registry.transport,
                )
            )

        def on_signal(signum: int) -> None:
            log.info("%s: stopping", signal.Signals(signum).name)
            sd_notify("STOPPING=1")
            pyfuse3.terminate()
            loop.call_later(STOP_GRACE_S, interrupt_requests)

        def interrupt_requests() -> None:
            n = ops.cancel_inflight()
            if n:
                log.warning(
                    "%d request(s) still in flight %gs after the signal: EIO", n, STOP_GRACE_S
                )

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
            stack.callback(loop.remove_signal_handler, sig)

        log.info(
            "serving %s (state %s, control %s)",
            cfg.mountpoint,
            cfg.state_dir,
            cfg.control.socket,
        )
        sd_notify("READY=1")
        await pyfuse3.main(min_tasks=1, max_tasks=cfg.fuse.max_tasks)
    log.info("stopped")
    return 0

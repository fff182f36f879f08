"""Command-line entry point: ``alsd [--config FILE] [run options]`` and subcommands.

``alsd`` with no subcommand runs the daemon: this module parses its flags and the
configuration (a mistake is one message and exit status 2), then hands over to
:mod:`alsd.app.daemon`. Each subcommand lives in alsd/tools; modules are imported lazily
so that ``alsd inspect FILE`` does not need pyfuse3.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from alsd import config
from alsd.config import Config
from alsd.errors import ConfigError

EXIT_CONFIG = 2

SUBCOMMANDS = {
    "inspect": (
        "alsd.tools.inspect",
        "inspect a layer blob (FILE) or an image in a registry (REF)",
    ),
    "convert": ("alsd.tools.convert", "convert an image in a registry to eStargz and push it"),
    "profile": (
        "alsd.tools.profile",
        "show or push (as an OCI artifact) the prefetch profile recorded for an image",
    ),
    "status": ("alsd.tools.status", "show the running daemon's layers and cache use"),
    "auth-helper": ("alsd.tools.status", "hand podman's registry credentials to the daemon"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[args[0]][0])
        rc: int = module.main(args[0], args[1:])
        return rc
    try:
        cfg = load_config(args)
    except ConfigError as exc:
        print(f"alsd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from alsd.app import daemon

    return daemon.main(cfg)


# ------------------------------------------------------------------ the daemon's flags


def build_parser() -> argparse.ArgumentParser:
    settings = "\n".join(
        f"  {key} (default {default!r}): {doc}" for key, default, doc in config.iter_settings()
    )
    subcommands = "\n".join(f"  alsd {name:12} {help_}" for name, (_, help_) in SUBCOMMANDS.items())
    p = argparse.ArgumentParser(
        prog="alsd",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Additional Layer Store daemon: mounts a FUSE filesystem that podman / "
            "containers-storage uses as an additional layer store, serving eStargz and "
            "zstd:chunked layers lazily from their registry.\n\n"
            "storage.conf:  [storage.options]\n"
            '               additionallayerstores = ["<mountpoint>:ref"]\n\n'
            "alsd runs in the foreground (systemd Type=notify) and logs to stderr. "
            "SIGTERM or SIGINT unmount and exit 0. Exit status 2: the configuration is "
            "malformed."
        ),
        epilog=f"subcommands:\n{subcommands}\n\nsettings of the config file:\n{settings}",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help=f"configuration file (default {config.DEFAULT_CONFIG_PATH}; a missing default "
        "file means all defaults, a missing named file is an error)",
    )
    p.add_argument("--mountpoint", metavar="DIR", help="overrides 'mountpoint' of the file")
    p.add_argument("--state-dir", metavar="DIR", help="overrides 'state_dir' of the file")
    p.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="overrides 'log_level' of the file",
    )
    return p


def load_config(argv: Sequence[str]) -> Config:
    """Parse ``argv`` and the configuration file (argparse exits 2 on bad flags)."""
    args = build_parser().parse_args(list(argv))
    cfg = config.load(args.config)
    return config.with_overrides(
        cfg, mountpoint=args.mountpoint, state_dir=args.state_dir, log_level=args.log_level
    )

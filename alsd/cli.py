"""Command-line entry point: ``alsd [--config FILE] [run options]`` and subcommands.

``alsd`` with no subcommand runs the daemon: this module parses its flags and the
configuration (a mistake is one message and exit status 2), then hands over to
:mod:`alsd.app.daemon`. Each subcommand lives in alsd/tools and parses its own
arguments; modules are imported lazily so that ``alsd inspect FILE`` does not need
pyfuse3. Exit statuses of every command: :data:`alsd.errors.EXIT_OK` and its siblings.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from alsd import config
from alsd.config import Config
from alsd.errors import EXIT_USAGE, ConfigError

SUBCOMMANDS = {
    "inspect": (
        "alsd.tools.inspect",
        "can a layer blob (FILE) or an image (REF) be pulled lazily?",
    ),
    "convert": ("alsd.tools.convert", "convert an image in a registry to eStargz and push it"),
    "profile": (
        "alsd.tools.profile",
        "show or push (as an OCI artifact) the prefetch profile recorded for an image",
    ),
    "status": ("alsd.tools.status", "what the running daemon serves, per image and layer"),
    "auth-helper": ("alsd.tools.status", "hand podman's registry credentials to the daemon"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[args[0]][0])
        rc: int = module.main(args[0], args[1:])
        return rc
    if args and not args[0].startswith("-"):
        print(
            f"alsd: unknown command '{args[0]}'; the commands are {', '.join(SUBCOMMANDS)} "
            "(without a command alsd runs the daemon; see alsd --help)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        cfg = load_config(args)
    except ConfigError as exc:
        print(f"alsd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from alsd.app import daemon

    return daemon.main(cfg)


# ------------------------------------------------------------------ the daemon's flags


def build_parser() -> argparse.ArgumentParser:
    """``alsd --help``: the daemon's options, the subcommands with a line each (each parses
    its own arguments, in its own module) and every setting of the configuration file."""
    width = min(shutil.get_terminal_size().columns, 100) - 2
    settings = "\n".join(
        textwrap.fill(
            f"{key} (default {_toml(default)}): {doc}",
            width=width,
            initial_indent="  ",
            subsequent_indent="      ",
            break_on_hyphens=False,
        )
        for key, default, doc in config.iter_settings()
    )
    description = textwrap.fill(
        "Additional Layer Store daemon: mounts a FUSE filesystem that podman and CRI-O "
        "(containers/storage) use as an additional layer store, serving eStargz and "
        "zstd:chunked layers lazily from their registry. Without a command, alsd runs the "
        "daemon in the foreground (systemd Type=notify), logging to stderr; SIGTERM or "
        "SIGINT unmount and exit.",
        width=width,
        break_on_hyphens=False,
    )
    exits = textwrap.fill(
        "Exit status of every command: 0 success; 1 the operation failed (stderr says "
        "why); 2 usage or configuration error. Manual pages: alsd(8), alsd.toml(5).",
        width=width,
    )
    p = argparse.ArgumentParser(
        prog="alsd",
        usage="alsd [--config FILE] [--mountpoint DIR] [--state-dir DIR] [--log-level LEVEL]\n"
        "       alsd COMMAND [options]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"{description}\n\nstorage.conf:  [storage.options]\n"
        '               additionallayerstores = ["<mountpoint>:ref"]',
        epilog=f"settings of the configuration file (alsd.toml(5)):\n{settings}\n\n{exits}",
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
        metavar="LEVEL",
        choices=["debug", "info", "warning", "error"],
        help="overrides 'log_level' of the file: debug, info, warning or error",
    )
    commands = p.add_subparsers(
        title="commands",
        dest="command",
        metavar="COMMAND",
        description="`alsd COMMAND --help` describes each one",
    )
    for name, (_, help_) in SUBCOMMANDS.items():
        # Entries for the listing only: main() hands a command and its arguments to the
        # command's own module before this parser sees them.
        commands.add_parser(name, help=help_, add_help=False)
    return p


def _toml(value: Any) -> str:
    """A default as alsd.toml spells it."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else str(value)


def load_config(argv: Sequence[str]) -> Config:
    """Parse ``argv`` and the configuration file (argparse exits 2 on bad flags)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(list(argv))
    if args.command is not None:
        parser.error(
            f"the command comes first, before its options: alsd {args.command} [options] "
            f"(see alsd {args.command} --help)"
        )
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    cfg = config.load(args.config)
    return config.with_overrides(
        cfg, mountpoint=args.mountpoint, state_dir=args.state_dir, log_level=args.log_level
    )

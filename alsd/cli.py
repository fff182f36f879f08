"""Command-line entry point: ``alsd [--config FILE] [run options]`` and subcommands.

Each subcommand lives in the module that owns its concern; this module only dispatches,
importing lazily so that ``alsd inspect FILE`` does not need pyfuse3.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

SUBCOMMANDS = {
    "inspect": ("alsd.inspect", "inspect a layer blob (FILE) or an image in a registry (REF)"),
    "convert": ("alsd.convert", "convert an image in a registry to eStargz and push it"),
    "status": ("alsd.control", "show the running daemon's layers and cache use"),
    "auth-helper": ("alsd.control", "hand podman's registry credentials to the daemon"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SUBCOMMANDS:
        import importlib

        module = importlib.import_module(SUBCOMMANDS[args[0]][0])
        rc: int = module.main(args[0], args[1:])
        return rc
    from alsd import daemon

    return daemon.main(args)

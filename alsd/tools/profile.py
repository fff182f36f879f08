"""``alsd profile show|push [--config FILE] REF``: the prefetch profile recorded for an image.

``show`` prints the profile the daemon recorded for the image ``REF`` names as JSON: per
layer its digest, the entries (path, first offset, length, in first-read order) and the
compressed bytes of the layer those entries cover.

``push`` attaches it to the image in its registry as an OCI artifact (an image manifest
whose ``subject`` is the image manifest, ``artifactType``
``application/vnd.alsd.prefetch-profile.v1+json``, the profile as its one blob): through
the OCI referrers API where the registry has it, else the referrers tag schema (see
:mod:`alsd.registry.referrers`). Credentials as for ``alsd convert``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from alsd.errors import EXIT_OK, EXIT_USAGE, AlsdError, InvalidReference, exit_status_for

if TYPE_CHECKING:
    from alsd.app.profiles import StoredProfile
    from alsd.config import Config


def _parser(cmd: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"alsd {cmd}", description="show or push the prefetch profile recorded for an image"
    )
    sub = p.add_subparsers(dest="action", required=True)
    for name, help_ in (
        ("show", "print the recorded profile as JSON"),
        ("push", "attach the recorded profile to the image in its registry"),
    ):
        s = sub.add_parser(name, help=help_)
        s.add_argument("ref", metavar="REF", help="image reference as podman used it")
        s.add_argument(
            "--config",
            metavar="FILE",
            help="alsd.toml to take state_dir and the registry settings from "
            "(default /etc/alsd.toml)",
        )
    return p


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


def main(cmd: str, argv: Sequence[str]) -> int:
    args = _parser(cmd).parse_args(list(argv))
    from alsd import config
    from alsd.app.profiles import stored_profile

    try:
        cfg = config.load(args.config)
        stored = stored_profile(cfg, args.ref)
        if args.action == "show":
            print(json.dumps(stored.to_json(), indent=2))
            return EXIT_OK
        pushed = asyncio.run(_push(cfg, stored))
    except AlsdError as exc:
        print(f"alsd {cmd} {args.action}: {_one_line(str(exc))}", file=sys.stderr)
        # A malformed REF is a usage error (2), like a bad alsd.toml; the rest failed (1).
        return EXIT_USAGE if isinstance(exc, InvalidReference) else exit_status_for(exc)
    print(f"{pushed}")
    return EXIT_OK


async def _push(cfg: Config, stored: StoredProfile) -> str:
    from alsd.app.wiring import registry_client
    from alsd.oci.profile import serialize_profile
    from alsd.oci.reference import parse_reference
    from alsd.registry.push import Pusher
    from alsd.registry.referrers import push_profile

    ref = parse_reference(stored.ref)
    img = stored.image
    async with registry_client(cfg, cli_env=os.environ) as client:
        pushed = await push_profile(
            Pusher(client),
            ref,
            subject_media_type=img.manifest.media_type,
            subject_digest=img.digest,
            subject_size=len(img.manifest_bytes),
            profile_blob=serialize_profile(stored.profile),
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
    return f"{ref.name}@{pushed.artifact_digest} ({pushed.via})"

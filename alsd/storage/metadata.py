"""Metadata persistence: the only module that imports msgpack.

Every metadata file is one envelope (see developer-notes/storage.md)::

    MAGIC (8 bytes) | u16 big-endian schema version | msgpack payload | sha256 (32 bytes)

where the checksum covers magic, version and payload, so a flipped version byte is caught
too. msgpack options are fixed here and nowhere else: bytes stay bytes, str stays str,
map keys must be str or bytes, tuples come back as lists, and unpacking is bounded.

Metadata is a cache of what the registry says: anything that does not decode exactly
(corrupt, truncated, wrong checksum, newer schema, an older schema without a migration)
is logged, deleted and reported as missing, and the caller resolves afresh. Files are
written atomically: temp file in the same directory, fsync, ``os.replace``, fsync of the
directory, so a reader sees the old complete file or the new complete file, never a mix.

Concurrency rule: the sync functions do blocking I/O and are safe to call from several
threads at once (every writer has its own temp file; ``os.replace`` is atomic; the last
writer of a key wins). In the event loop, use the ``*_async`` wrappers, which run the sync
functions in a worker thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

# msgpack ships no type information; everything it returns is checked here.
import msgpack

from alsd.errors import StoreError
from alsd.storage.durable import write_durably

log = logging.getLogger(__name__)

MAGIC = b"ALSDMETA"
# Bump when the meaning of stored payloads changes; add a migration from the old version
# to MIGRATIONS, or leave none and old files are discarded (they are only a cache).
SCHEMA_VERSION = 1
# Upper bound of a payload on pack and unpack: a 64 MiB TOC decodes to far less than this.
MAX_PAYLOAD_BYTES = 256 << 20

_HEADER = struct.Struct(">8sH")
_SUM_LEN = hashlib.sha256().digest_size
_SUFFIX = ".meta"
_TMP_PREFIX = ".tmp."
_KIND_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")

Migration = Callable[[Any], Any]
# MIGRATIONS[n] turns a decoded version-n payload into a version-(n+1) payload.
MIGRATIONS: Mapping[int, Migration] = {}


class MetadataError(StoreError):
    """A metadata file or object cannot be encoded, decoded or written."""


# ---------------------------------------------------------------------- encoding


def _packb(obj: Any) -> bytes:
    try:
        data: bytes = msgpack.packb(obj, use_bin_type=True, datetime=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise MetadataError(f"cannot encode metadata: {exc}") from exc
    return data


def _unpackb(payload: bytes) -> Any:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise MetadataError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    unpacker = msgpack.Unpacker(
        None,
        raw=False,
        strict_map_key=True,
        use_list=True,
        max_buffer_size=MAX_PAYLOAD_BYTES,
    )
    try:
        unpacker.feed(payload)
        obj = unpacker.unpack()
    except msgpack.OutOfData as exc:
        raise MetadataError("payload is truncated") from exc
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise MetadataError(f"payload does not decode: {exc}") from exc
    if unpacker.tell() != len(payload):
        raise MetadataError(f"{len(payload) - unpacker.tell()} bytes after the payload")
    return obj


def pack(obj: Any, *, version: int = SCHEMA_VERSION) -> bytes:
    """Encode ``obj`` (None, bool, int, float, str, bytes, list/tuple, dict) into an envelope.

    The payload is decoded once before returning, so an object that could not be loaded
    back (e.g. a dict with int keys, refused by ``strict_map_key``) fails here, at save
    time, and not silently at every later load.
    """
    if not 0 <= version <= 0xFFFF:
        raise ValueError(f"schema version out of range: {version}")
    payload = _packb(obj)
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise MetadataError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    _unpackb(payload)
    head = _HEADER.pack(MAGIC, version)
    return head + payload + hashlib.sha256(head + payload).digest()


def unpack(
    data: bytes,
    *,
    version: int = SCHEMA_VERSION,
    migrations: Mapping[int, Migration] = MIGRATIONS,
) -> Any:
    """Decode an envelope made by :func:`pack`; raise MetadataError unless it is exact.

    A file of an older schema version goes through ``migrations`` step by step; a newer
    version, or an older one with a missing step, is refused.
    """
    if len(data) < _HEADER.size + _SUM_LEN:
        raise MetadataError(f"file is truncated ({len(data)} bytes)")
    magic, file_version = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MetadataError(f"bad magic {magic!r}")
    body, checksum = data[:-_SUM_LEN], data[-_SUM_LEN:]
    if hashlib.sha256(body).digest() != checksum:
        raise MetadataError("checksum mismatch (corrupt or truncated)")
    if file_version > version:
        raise MetadataError(f"schema version {file_version} is newer than ours ({version})")
    obj = _unpackb(body[_HEADER.size :])
    for v in range(file_version, version):
        step = migrations.get(v)
        if step is None:
            raise MetadataError(f"no migration from schema version {v} to {v + 1}")
        try:
            obj = step(obj)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise MetadataError(f"migration from schema version {v} failed: {exc}") from exc
    return obj


# ---------------------------------------------------------------------- atomic files


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably; raise MetadataError on failure.

    A writer killed before the rename leaves only a ``.tmp.*`` file, which readers ignore
    and :meth:`MetadataStore.sweep` removes.
    """
    try:
        write_durably(path, data, mode=0o600, tmp_prefix=_TMP_PREFIX)
    except OSError as exc:
        raise MetadataError(f"cannot write {path}: {exc}") from exc


# ---------------------------------------------------------------------- the store


class MetadataStore:
    """Objects by (kind, key) under ``root``: ``<root>/<kind>/<sha256(key)>.meta``.

    ``kind`` is a short lowercase name ("image", "layer", ...); ``key`` any string (a
    reference, a digest). Each file holds ``{"kind", "key", "obj"}`` so that :meth:`iter`
    can return keys, and so that a file found under the wrong name is not trusted.
    """

    def __init__(
        self,
        root: Path,
        *,
        schema_version: int = SCHEMA_VERSION,
        migrations: Mapping[int, Migration] = MIGRATIONS,
    ) -> None:
        self._root = Path(root)
        self._version = schema_version
        self._migrations = migrations

    @property
    def root(self) -> Path:
        return self._root

    def _kind_dir(self, kind: str) -> Path:
        if not _KIND_RE.fullmatch(kind):
            raise ValueError(f"bad metadata kind {kind!r}")
        return self._root / kind

    def path_for(self, kind: str, key: str) -> Path:
        name = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        return self._kind_dir(kind) / f"{name}{_SUFFIX}"

    # -- sync API (blocking; not from the event loop) ------------------------------

    def save(self, kind: str, key: str, obj: Any) -> None:
        """Store ``obj`` under (kind, key), replacing any previous one atomically."""
        path = self.path_for(kind, key)
        data = pack({"kind": kind, "key": key, "obj": obj}, version=self._version)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MetadataError(f"cannot create {path.parent}: {exc}") from exc
        atomic_write(path, data)

    def load(self, kind: str, key: str) -> Any | None:
        """The stored object, or None if absent or unusable (then logged and deleted)."""
        loaded = self._load_path(self.path_for(kind, key), kind, key)
        return None if loaded is None else loaded[1]

    def _load_path(self, path: Path, kind: str, key: str | None) -> tuple[str, Any] | None:
        """(key, obj) of one file; ``key`` None accepts any key that hashes to the name."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("metadata %s: cannot open: %s", path, exc)
            return None
        st: os.stat_result | None = None
        try:
            st = os.fstat(fd)
            if st.st_size > MAX_PAYLOAD_BYTES + _HEADER.size + _SUM_LEN:
                raise MetadataError(f"file of {st.st_size} bytes is too large")
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
            record = unpack(data, version=self._version, migrations=self._migrations)
            if (
                not isinstance(record, dict)
                or set(record) != {"kind", "key", "obj"}
                or record["kind"] != kind
                or not isinstance(record["key"], str)
                # The key must hash to this file's name (also when key is None, in iter).
                or self.path_for(kind, record["key"]) != path
            ):
                raise MetadataError("record does not belong under this name")
        except (MetadataError, OSError) as exc:
            log.warning("metadata %s (%s %r): discarded: %s", path, kind, key, exc)
            if st is not None:
                self._remove_if_same(path, st.st_dev, st.st_ino)
            return None
        finally:
            os.close(fd)
        return record["key"], record["obj"]

    @staticmethod
    def _remove_if_same(path: Path, dev: int, ino: int) -> None:
        # Do not delete a good file a concurrent save() has just renamed into place.
        try:
            now = os.stat(path)
            if (now.st_dev, now.st_ino) == (dev, ino):
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("metadata %s: cannot remove: %s", path, exc)

    def iter(self, kind: str) -> Iterator[tuple[str, Any]]:
        """Every usable (key, obj) of ``kind``, in no particular order; bad files discarded."""
        d = self._kind_dir(kind)
        try:
            names = sorted(os.listdir(d))
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("metadata %s: cannot list: %s", d, exc)
            return
        for name in names:
            if name.startswith(".") or not name.endswith(_SUFFIX):
                continue
            loaded = self._load_path(d / name, kind, None)
            if loaded is not None:
                yield loaded

    def delete(self, kind: str, key: str) -> bool:
        """Remove (kind, key); True if a file was removed."""
        path = self.path_for(kind, key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise MetadataError(f"cannot remove {path}: {exc}") from exc
        return True

    def sweep(self) -> int:
        """Remove temp files left by writers that died before renaming; call at start."""
        removed = 0
        try:
            kinds = [e for e in os.scandir(self._root) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return 0
        for kd in kinds:
            with os.scandir(kd.path) as it:
                for entry in it:
                    if entry.name.startswith(_TMP_PREFIX):
                        try:
                            os.unlink(entry.path)
                            removed += 1
                        except OSError as exc:
                            log.warning("metadata: cannot remove %s: %s", entry.path, exc)
        return removed

    # -- async wrappers (run the sync API in a worker thread) ---------------------

    async def save_async(self, kind: str, key: str, obj: Any) -> None:
        await asyncio.to_thread(self.save, kind, key, obj)

    async def load_async(self, kind: str, key: str) -> Any | None:
        return await asyncio.to_thread(self.load, kind, key)

    async def list_async(self, kind: str) -> list[tuple[str, Any]]:
        return await asyncio.to_thread(lambda: list(self.iter(kind)))

    async def delete_async(self, kind: str, key: str) -> bool:
        return await asyncio.to_thread(self.delete, kind, key)

    async def sweep_async(self) -> int:
        return await asyncio.to_thread(self.sweep)

"""How a file's page cache is made up: the share of its cached pages in large folios.

Page-cache reads copy folio by folio, so a file cached in 4 KiB pages reads slower than the
same bytes cached in large folios. The benchmark prints this share for the file read
through alsd and for the local copy, so the page-cache ratio comes with its cause.

Reads /proc/self/pagemap and /proc/kpageflags (root only): the file is mapped read-only,
every page touched (a page-cache hit each, no I/O when the file is cached), and each page's
flags looked up.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

PAGE = mmap.PAGESIZE
_PRESENT = 1 << 63
_PFN_MASK = (1 << 55) - 1
_KPF_COMPOUND_HEAD = 1 << 15
_KPF_COMPOUND_TAIL = 1 << 16


def large_folio_share(path: Path) -> float | None:
    """Fraction of ``path``'s resident pages that belong to folios larger than one page.

    None when the kernel does not tell (not root, or no /proc/kpageflags)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return None
        with (
            mmap.mmap(fd, size, prot=mmap.PROT_READ) as m,
            open("/proc/self/pagemap", "rb") as pagemap,
            open("/proc/kpageflags", "rb") as kpageflags,
        ):
            pages = (size + PAGE - 1) // PAGE
            for i in range(pages):
                m[i * PAGE]  # fault the page in (from the page cache)
            start = _mapping_start(path, size)
            if start is None:
                return None
            pagemap.seek(start // PAGE * 8)
            entries = struct.unpack(f"{pages}Q", pagemap.read(pages * 8))
            resident = large = 0
            for e in entries:
                if not e & _PRESENT or not e & _PFN_MASK:
                    continue
                kpageflags.seek((e & _PFN_MASK) * 8)
                (flags,) = struct.unpack("Q", kpageflags.read(8))
                resident += 1
                if flags & (_KPF_COMPOUND_HEAD | _KPF_COMPOUND_TAIL):
                    large += 1
            return large / resident if resident else None
    except OSError:
        return None
    finally:
        os.close(fd)


def _mapping_start(path: Path, size: int) -> int | None:
    """Start address of this process's mapping of ``path`` (the one just made)."""
    want = os.stat(path)
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6:
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if int(fields[4]) == want.st_ino and hi - lo >= size:
                return lo
    return None

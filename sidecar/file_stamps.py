"""When files on disk change: a stamp per path (mtime, size, inode) — the inode catches an atomic rename, which
is how cert-manager and Kubernetes ConfigMaps replace files. A missing file stamps as zeros."""

from __future__ import annotations

import os
from collections.abc import Iterable

Stamp = tuple[int, int, int]


def file_stamps(paths: Iterable[str]) -> tuple[Stamp, ...]:
    stamps = []
    for path in paths:
        try:
            st = os.stat(path)
            stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            stamps.append((0, 0, 0))
    return tuple(stamps)

"""One way to compile numba kernels: cached on disk where possible.

``numba.njit(cache=True)`` raises RuntimeError ("no locator available") when neither the
package folder nor the numba cache folder is writable (read-only installs, containers
without a home); the kernels then compile once per process instead.
"""
from __future__ import annotations

import numba


def njit_cached(**options):
    """Decorator: ``numba.njit(cache=True, **options)``, or without the disk cache where
    no cache folder is writable."""
    def decorate(func):
        try:
            return numba.njit(cache=True, **options)(func)
        except RuntimeError:
            return numba.njit(cache=False, **options)(func)

    return decorate

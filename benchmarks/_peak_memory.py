"""Peak resident memory of one call, for the benchmarks that run each row in a subprocess.

``peak = VmHWM after − RSS before``, with the address space's high-water mark ``VmHWM`` reset
to the current RSS just before the call (``5`` written to ``/proc/self/clear_refs``, Linux ≥
4.0). Not ``ru_maxrss``: it is the larger of that mark and one the reset cannot lower, which
``exec`` carries over from the launching process — after ``subprocess``'s vfork, the parent's
own peak, which can hide every call that needs less than the parent once held.
"""

from __future__ import annotations

import ctypes
import os
import resource


def rss_bytes() -> int:
    """The current resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def high_water_bytes() -> int:
    """``VmHWM`` (what :func:`reset_high_water` lowers); ``ru_maxrss`` where it is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_high_water() -> bool:
    """Trim the C heap, then reset ``VmHWM`` to the current RSS.

    Returns ``False`` where ``/proc/self/clear_refs`` is missing or refuses the reset: the
    measured peak is then only an upper bound.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand memory freed by the setup back
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True

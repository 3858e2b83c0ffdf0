"""Resource limits for a process that parses untrusted files (the HDF5 worker): the
kernel, not Python, stops C code that loops or allocates without end."""

from __future__ import annotations

import contextlib
import os


def _set_soft_limit(kind: int, soft: int) -> None:
    import resource

    _, hard = resource.getrlimit(kind)
    resource.setrlimit(kind, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def renew_cpu(budget: int) -> None:
    """Let this process use ``budget`` more CPU seconds (SIGXCPU kills it after)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    _set_soft_limit(resource.RLIMIT_CPU, int(usage.ru_utime + usage.ru_stime) + 1 + budget)


def vm_size() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def bound_memory(extra: int) -> None:
    """Cap the address space at what the worker has plus ``extra``."""
    import resource

    _set_soft_limit(resource.RLIMIT_AS, vm_size() + extra)


def no_core_dumps() -> None:
    import ctypes
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(OSError, AttributeError):  # PR_SET_DUMPABLE 0: no core at all
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)

"""Peak resident memory of this process (Linux), for benchmarks that report what pruning costs."""
from __future__ import annotations


def resident_mib(field: str = "VmRSS") -> float:
    """A /proc/self/status figure in MiB: ``VmRSS`` (now) or ``VmHWM`` (peak); NaN elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak() -> None:
    """Make VmHWM restart from the current resident set (Linux >= 4.0), so a later peak is
    that of the code measured, not of whatever ran before it. Freed heap memory is first
    given back to the system (glibc ``malloc_trim``): otherwise later allocations reuse it
    unseen and the growth measured is too small."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass

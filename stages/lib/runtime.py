"""What a run cost on this machine: wall time, peak memory, the device.

These figures change from one machine to the next, so stages write them to
metrics/runtime/<stage>.json only (a `cache: false` out, not a DVC metric), never beside the
quality figures (docs/architecture.md). No torch import at module level: the light paths use it.
"""
import os
import resource
import time
from contextlib import contextmanager
from pathlib import Path

# the keys run_training returns that vary by machine: train.py moves them to metrics/runtime/train.json
RUNTIME_KEYS = ("runtime_s", "samples_per_second", "peak_rss_mib", "cuda_max_memory_allocated_mib", "device")


def reset_peak_rss():
    """Linux: writing 5 to /proc/self/clear_refs resets the process's peak RSS (VmHWM), so the peak read
    after a run is that run's, not the largest since the process started. False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib():
    """Peak resident memory of this process in MiB (VmHWM; else getrusage, the lifetime peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def device_name():
    """'NVIDIA H100 80GB HBM3' on a GPU; on the CPU its model name and the cores this process may use."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    return f"cpu: {model or 'unknown'}, {len(os.sched_getaffinity(0))} cores"


def reset_peaks():
    """Start a new peak: RSS (Linux) and, on a GPU, torch's peak of allocated memory."""
    import torch

    reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peaks():
    """Peak memory since reset_peaks(), and the device: peak_rss_mib, cuda_max_memory_allocated_mib (None
    without CUDA), device."""
    import torch

    cuda = torch.cuda.is_available()
    return {"peak_rss_mib": peak_rss_mib(),
            "cuda_max_memory_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
            "device": device_name()}


@contextmanager
def measure():
    """Yields a dict filled at exit with wall_s and peaks() of the block."""
    reset_peaks()
    out, start = {}, time.perf_counter()
    yield out
    out.update(wall_s=round(time.perf_counter() - start, 2), **peaks())

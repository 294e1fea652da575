"""How every stage reports bad input (one line on stderr, exit code 2, no traceback), and where
it records what varies by machine (metrics/runtime/STAGE.json when DVC runs it)."""
import errno
import logging
import os
import platform
import resource
import sys
import time
import warnings

FULL = (errno.ENOSPC, errno.EDQUOT)


class UserError(Exception):
    """A problem the user can fix (bad file, field or parameter). Message is one line."""


def silence_known_harmless_warnings():
    """Library messages a user cannot act on, filtered where they come from (exact texts; others stay)."""
    # bitsandbytes 0.50 on CPUs with AVX512-BF16 tries an optional Hub kernel (the `kernels` package)
    # when it is imported (peft imports it), logs this, and uses its own kernel: nothing is lost.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community"))
    # transformers 5.x deprecated `is_gradient_checkpointing`; TRL and PEFT still read it (not our code).
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


silence_known_harmless_warnings()   # every stage imports this module before any library


# Machine-varying figures a stage adds to its runtime file (seconds of one phase, samples/s, ...).
_RUNTIME_FIGURES = {}


def record_runtime(**figures):
    """Add figures to metrics/runtime/STAGE.json: never to files that hold quality figures, so that
    a re-run on another machine changes only the runtime files."""
    _RUNTIME_FIGURES.update(figures)


def recorded_runtime():
    """What the stage has recorded so far (a copy)."""
    return dict(_RUNTIME_FIGURES)


def runtime_file():
    """metrics/runtime/STAGE.json for the stage DVC is running (DVC sets DVC_STAGE, e.g.
    "evaluate@base" -> evaluate-base.json), or None outside DVC and in torchrun's workers (the
    launching process writes it, with its workers' CPU time)."""
    stage = os.environ.get("DVC_STAGE")
    if not stage or "TORCHELASTIC_RUN_ID" in os.environ:
        return None
    return os.path.join("metrics", "runtime", stage.rsplit(":", 1)[-1].replace("@", "-") + ".json")


def write_runtime(started, path):
    from .io import atomic_write_json  # io imports this module

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    atomic_write_json(path, {
        "wall_s": round(time.monotonic() - started, 1),
        # user + system CPU of the stage and the processes it waited for (servers, torchrun workers)
        "cpu_s": round(own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime, 1),
        "peak_rss_bytes": max(own.ru_maxrss, children.ru_maxrss) * 1024,
        "cpu_count": os.cpu_count(), "machine": platform.machine(), **_RUNTIME_FIGURES})


def run_main(main, argv=None):
    """Run a stage's main(); turn UserError into a one-line message and exit code 2. Under DVC,
    a finished stage writes metrics/runtime/STAGE.json (wall and CPU time, peak memory)."""
    started = time.monotonic()
    try:
        main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno not in FULL:
            raise
        where = f" writing {err.filename}" if err.filename else ""
        print(f"error: no space left on the device{where} ({err.strerror}); free some space and re-run "
              "(outputs are written whole or not at all)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    path = runtime_file()
    if path:
        write_runtime(started, path)

"""Data-parallel training processes: the train stage re-launches itself under torchrun.

torchrun ships with torch (no accelerate config file, nothing else to pin). Each worker is the same
`python -m stages.train ...` with RANK / LOCAL_RANK / WORLD_SIZE set; transformers' Trainer (through
accelerate) then wraps the model in DistributedDataParallel with the gloo backend on CPUs and NCCL
on GPUs: one code path. Only rank 0 writes outputs (stages/lib/training.py run_training).

A failure on any rank is one line: torchrun exits non-zero, and the parent reports the rank that
failed first (torchrun's "Root Cause") and that rank's last stderr line. Every worker's stderr
(progress bars, warnings, tracebacks), prefixed `[defaultR]:` by torchrun's --tee, is kept in a
log file beside the checkpoints until the run succeeds.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

from .cli import UserError


def is_worker():
    """True inside a process torchrun (or accelerate launch) started."""
    return "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ


def rank():
    """This process's global rank: 0 when not launched."""
    return int(os.environ.get("RANK", "0"))


def launch(num_processes, module, argv, log_path):
    """Run `python -m module *argv` as num_processes torchrun workers on this machine; raise UserError
    naming the failed rank when one fails. Rank 0's stdout comes through; stderr goes to log_path."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={num_processes}",
           "--tee=2",  # each worker's stderr to the log, every line prefixed with its rank
           "-m", module, *argv]
    with open(log_path, "w", encoding="utf-8") as log:
        rc = subprocess.run(cmd, stdout=None, stderr=log).returncode
    if rc == 0:
        log_path.unlink(missing_ok=True)
        return
    failed, line = first_failure(log_path.read_text(encoding="utf-8", errors="replace"))
    raise UserError(f"{module.rsplit('.', 1)[-1]}: rank {failed} failed: {line} (every worker's output: {log_path})")


def first_failure(log_text):
    """(rank, its last stderr line) of torchrun's root cause; ('?', last log line) when torchrun itself failed."""
    root = re.search(r"Root Cause.*?rank\s*:\s*(\d+)", log_text, re.S)
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    if not root:
        return "?", lines[-1] if lines else "no output"
    failed = root.group(1)
    prefix = f"[default{failed}]:"
    own = [line[len(prefix):].strip() for line in lines if line.startswith(prefix) and line[len(prefix):].strip()]
    # progress bars end in \r-separated updates: keep the text after the last one
    last = own[-1].split("\r")[-1].strip() if own else "exited without a message"
    return failed, last.removeprefix("error: ")

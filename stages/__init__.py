"""Pipeline stages: each module is one DVC stage, run as `python -m stages.NAME`."""
import os

# Idle OpenMP threads otherwise spin: on a busy 2-core machine that made a CPU training step
# ~10x slower. Must be set before torch is first imported, which every stage does after this.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

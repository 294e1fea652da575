"""tools/setup.sh refuses a Python older than 3.11 in one line, before installing anything."""
import os
import subprocess

from conftest import ROOT


def test_setup_refuses_python_older_than_3_11(tmp_path):
    fake = tmp_path / "python3.10"
    fake.write_text("#!/bin/sh\necho 3.10.12\n")   # what Ubuntu 22.04's python3 answers
    fake.chmod(0o755)
    done = subprocess.run(["bash", "tools/setup.sh"], cwd=ROOT, capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, PYTHON=str(fake)))
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Python >= 3.11 is needed, found 3.10.12" in lines[0] and str(fake) in lines[0]
    assert "PYTHON=python3.11 make setup" in lines[0]

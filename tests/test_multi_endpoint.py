"""Evaluation over several servers: two real `transformers serve` processes (evaluate.replicas 2),
one SIGKILLed mid-run. Every sample is predicted exactly once into the output, in input order,
none fails, and the predictions are those of a single server (greedy decoding of the same model)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

from conftest import ROOT
from openai_stub import MODEL, Stub, answers_for

from stages.lib.evaluation.client import ChatClient, Endpoints, run_samples
from stages.lib.prompt import DEFAULT_INSTRUCTION


def write_rows(path, rows):
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def evaluate_cmd(*args):
    return [sys.executable, "-m", "stages.evaluate", *map(str, args)]


def test_a_killed_server_loses_nothing(tiny_base_dir, tiny_rows, tmp_path):
    rows = tiny_rows[:20]
    data = write_rows(tmp_path / "rows.json", rows)
    common = ["--model-dir", tiny_base_dir, "--data-file", data, "--engine", "transformers", "--max-tokens", 12,
              "--workers", 2, "--save-interval", 1, "--top-k", "None"]
    single = tmp_path / "single.json"
    done = subprocess.run(evaluate_cmd(*common, "--output-file", single), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    reference = [s["prediction"] for s in json.loads(single.read_text())["samples"]]

    out = tmp_path / "two.json"
    proc = subprocess.Popen(evaluate_cmd(*common, "--output-file", out, "--replicas", 2), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids, lines = [], []
    while len(pids) < 2:   # "transformers serve ready at URL (pid N)", once per replica
        line = proc.stderr.readline()
        assert line or proc.poll() is None, "".join(lines)
        lines.append(line)
        pids += [int(p) for p in re.findall(r"serve ready at \S+ \(pid (\d+)\)", line)]
    deadline = time.monotonic() + 300
    while not (out.exists() and len(json.loads(out.read_text())["samples"]) >= 5):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    os.kill(pids[1], signal.SIGKILL)   # the second server dies mid-run
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, "".join(lines) + stderr[-2000:]

    doc = json.loads(out.read_text())
    assert doc["status"] == "complete" and doc["failed_count"] == 0 and len(doc["server"]["urls"]) == 2
    assert [s["image_path"] for s in doc["samples"]] == [r["image_path"] for r in rows]   # once each, in order
    assert [s["prediction"] for s in doc["samples"]] == reference
    served = Counter(s["endpoint"] for s in doc["samples"])
    first, second = doc["server"]["urls"]
    assert served[first] > 0 and served[second] > 0 and served[first] + served[second] == len(rows)
    assert served[first] > served[second]   # the survivor took the dead one's share


def test_samples_spread_and_fail_over_between_endpoints(tiny_rows, tmp_path):
    """The client alone, against stubs: the least busy endpoint gets each request; a refused
    connection sends the sample to the other at once (no backoff), and the dead one rests."""
    rows = tiny_rows[:12]
    samples = [{"image_path": r["image_path"], "label": r["ocr_text"]} for r in rows]
    with Stub(answers_for(rows), delay_s=0.05) as a, Stub(answers_for(rows), delay_s=0.05) as b:
        client = ChatClient([a.url, b.url], MODEL, DEFAULT_INSTRUCTION, max_tokens=8, timeout=5, max_retries=0)
        records, summary = run_samples(samples, client.predict, workers=4, output_path=tmp_path / "o.json",
                                       header={}, save_interval=50)
        assert summary["failed_count"] == 0
        assert sum(a.requests.values()) == 6 and sum(b.requests.values()) == 6   # 4 workers, equal servers
    with Stub(answers_for(rows)) as alive:
        dead = "http://127.0.0.1:9"   # nothing listens on port 9 (discard): refused at once
        client = ChatClient([dead, alive.url], MODEL, DEFAULT_INSTRUCTION, max_tokens=8, timeout=5, max_retries=0,
                            backoff_s=5.0)
        start = time.monotonic()
        records, summary = run_samples(samples, client.predict, workers=2, output_path=tmp_path / "o.json",
                                       header={}, save_interval=50)
        assert summary["failed_count"] == 0 and time.monotonic() - start < 4   # never waited a 5 s backoff
        assert {r["endpoint"] for r in records} == {alive.url}
        assert [r["prediction"] for r in records] == [r["ocr_text"] for r in rows]
    endpoints = Endpoints(["x", "y"])
    first = endpoints.acquire()
    endpoints.release(first, alive=False)
    assert endpoints.acquire() != first   # resting

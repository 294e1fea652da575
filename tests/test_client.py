"""The evaluation client and the managed server: faults from a stub, then one real `transformers serve`."""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import requests

from openai_stub import MODEL, Stub, answers_for
from stages.lib.cli import UserError
from stages.lib.evaluation.client import ChatClient, SampleError, load_previous, run_samples
from stages.lib.prompt import DEFAULT_INSTRUCTION, chat_messages
from stages.lib.evaluation.serving import check_model_served, managed_server, run_server

INSTRUCTION = DEFAULT_INSTRUCTION


def samples_of(rows):
    return [{"image_path": r["image_path"], "label": r["ocr_text"]} for r in rows]


def client_for(url, model=MODEL, **kw):
    kw = {"max_tokens": 32, "stop": ["<end_of_turn>"], "timeout": 0.5, "max_retries": 2, "backoff_s": 0.01, **kw}
    return ChatClient(url, model, INSTRUCTION, **kw)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_payload_is_the_training_prompt_at_temperature_0(tiny_rows):
    rows = tiny_rows[:1]
    with Stub(answers_for(rows)) as stub:
        out = client_for(stub.url).predict(samples_of(rows)[0])
    assert out["prediction"] == rows[0]["ocr_text"] and out["attempts"] == 1
    sent = stub.payloads[0]
    assert sent["messages"] == chat_messages(rows[0]["image_path"], INSTRUCTION)
    assert sent["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert sent["temperature"] == 0 and sent["max_tokens"] == 32 and sent["stop"] == ["<end_of_turn>"]
    assert sent["model"] == MODEL


def test_faults_end_every_sample_exactly_once_in_input_order(tiny_rows, tmp_path):
    rows = tiny_rows[:12]
    labels = [r["ocr_text"] for r in rows]
    faults = {labels[0]: ["500", "500"], labels[1]: ["drop"], labels[2]: ["malformed"], labels[3]: ["slow"],
              labels[4]: ["500"] * 10, labels[5]: ["400"], labels[6]: ["drop", "malformed"]}
    out = tmp_path / "out.json"
    with Stub(answers_for(rows), faults, slow_s=1.5) as stub:
        client = client_for(stub.url)
        records, summary = run_samples(samples_of(rows), client.predict, workers=4, output_path=out,
                                       header={"fingerprint": "f"}, save_interval=5)
    assert [r["image_path"] for r in records] == [r["image_path"] for r in rows]
    failed = {i for i, r in enumerate(records) if "error" in r}
    assert failed == {4, 5}
    for i, record in enumerate(records):
        if i in failed:   # an error, never an empty prediction
            assert record["prediction"] is None and record["cer_score"] is None and record["error"]
        else:             # the stub answers each image with its own label: right sample, right slot
            assert record["prediction"] == labels[i] and record["cer_score"] == 0 and record["f1_score"] == 1
    assert "HTTP 500" in records[4]["error"] and records[4]["attempts"] == 3
    assert "HTTP 400" in records[5]["error"] and records[5]["attempts"] == 1   # 4xx is not retried
    assert stub.requests[labels[4]] == 3 and stub.requests[labels[5]] == 1
    assert records[0]["attempts"] == 3 and records[3]["attempts"] == 2 and records[6]["attempts"] == 3
    assert summary["failed_count"] == 2 and summary["total_samples"] == 12
    assert summary["overall_cer"] == 0 and summary["latency_p95_s"] >= summary["latency_p50_s"] > 0
    saved = json.loads(out.read_text(encoding="utf-8"))   # the last progress save: partial, ordered
    assert saved["status"] == "partial" and len(saved["samples"]) == 10
    order = [r["image_path"] for r in rows]
    assert [order.index(r["image_path"]) for r in saved["samples"]] == sorted(order.index(r["image_path"]) for r in saved["samples"])


def test_resume_skips_finished_and_redoes_failed(tiny_rows, tmp_path):
    rows = tiny_rows[:6]
    labels = [r["ocr_text"] for r in rows]
    out = tmp_path / "out.json"
    header = {"fingerprint": "abc"}
    with Stub(answers_for(rows), {labels[2]: ["500"] * 3}) as stub:
        records, _ = run_samples(samples_of(rows), client_for(stub.url).predict, workers=2, output_path=out,
                                 header=header, save_interval=1)
    assert "error" in records[2]
    from stages.lib.io import atomic_write_json
    atomic_write_json(out, {**header, "samples": records})
    previous = load_previous(out, "abc")
    assert len(previous) == 5                    # the failed one is not "finished"
    assert load_previous(out, "other") is None   # another model/settings: not reused
    with Stub(answers_for(rows)) as stub:
        records, summary = run_samples(samples_of(rows), client_for(stub.url).predict, workers=2,
                                       output_path=out, header=header, save_interval=1, previous=previous)
    assert stub.requests == {labels[2]: 1}       # only the failed sample was asked again
    assert [r["prediction"] for r in records] == labels and summary["evaluated_this_run"] == 1


def test_interrupt_saves_what_finished(tiny_rows, tmp_path):
    samples = samples_of(tiny_rows[:8])
    out = tmp_path / "out.json"

    def predict(sample):
        if sample is samples[5]:
            raise KeyboardInterrupt
        return {"prediction": sample["label"], "completion_tokens": 1}

    with pytest.raises(KeyboardInterrupt):
        run_samples(samples, predict, workers=1, output_path=out, header={"fingerprint": "f"}, save_interval=100)
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["status"] == "partial"
    assert [r["image_path"] for r in saved["samples"]] == [s["image_path"] for s in samples[:5]]


def test_unreadable_image_is_a_sample_error(tmp_path):
    client = client_for("http://127.0.0.1:9")
    with pytest.raises(SampleError, match="image unreadable"):
        client.predict({"image_path": str(tmp_path / "missing.png"), "label": "x"})


def test_server_that_never_gets_healthy_is_stopped():
    cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
    start = time.monotonic()
    with pytest.raises(UserError, match="not healthy after 1 s"):
        with run_server(cmd, "http://127.0.0.1:9", startup_timeout=1):
            pass
    assert time.monotonic() - start < 15


def test_server_that_exits_early_is_reported_with_its_log():
    cmd = [sys.executable, "-c", "import sys; print('cannot load the weights'); sys.exit(3)"]
    with pytest.raises(UserError, match=r"exited with code 3 .*cannot load the weights"):
        with run_server(cmd, "http://127.0.0.1:9", startup_timeout=30):
            pass


def test_server_dies_with_a_sigkilled_parent(tmp_path):
    """A SIGKILL of the stage cannot run cleanup code: the kernel must take the server down."""
    pid_file = tmp_path / "pid"
    serve = textwrap.dedent("""
        from http.server import BaseHTTPRequestHandler, HTTPServer
        class H(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200); self.end_headers()
            def log_message(self, *a): pass
        HTTPServer(("127.0.0.1", PORT), H).serve_forever()
    """)
    parent = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(os.getcwd())!r})
        from stages.lib.evaluation.serving import free_port, run_server
        port = free_port()
        cmd = [sys.executable, "-c", {serve!r}.replace("PORT", str(port))]
        with run_server(cmd, f"http://127.0.0.1:{{port}}", 30) as (proc, log):
            open({str(pid_file)!r}, "w").write(str(proc.pid))
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent])
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        server_pid = int(pid_file.read_text())
        assert alive(server_pid)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 5
        while alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(server_pid)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_real_transformers_serve(tiny_base_dir, tiny_rows, tmp_path):
    """One real server on the untrained tiny model: garbage text, but a real pipeline."""
    samples = samples_of(tiny_rows[:4])
    with managed_server(tiny_base_dir, "transformers", startup_timeout=180) as server:
        assert server.engine == "transformers" and server.model_name == str(tiny_base_dir)
        check_model_served(server.models, str(tiny_base_dir), server.url)
        with pytest.raises(UserError, match="is not served by"):
            check_model_served(server.models, "gemma-12b", server.url)
        # transformers serve fails on `stop` for a VLM, so the stage sends none to it
        client = client_for(server.url, model=server.model_name, stop=[], timeout=60, max_tokens=8)
        records, summary = run_samples(samples, client.predict, workers=2, output_path=tmp_path / "o.json",
                                       header={}, save_interval=2)
        again, _ = run_samples(samples, client.predict, workers=1, output_path=tmp_path / "p.json",
                               header={}, save_interval=2)
        wrong = client_for(server.url, model="gemma-12b", stop=[], timeout=60)
        with pytest.raises(SampleError, match="HTTP 400"):   # a wrong name is not retried
            wrong.predict(samples[0])
        pid, url = server.pid, server.url
    assert [r["image_path"] for r in records] == [s["image_path"] for s in samples]
    assert summary["failed_count"] == 0
    # temperature 0: the same predictions whatever the number of workers
    assert [r["prediction"] for r in again] == [r["prediction"] for r in records]
    for record in records:
        assert isinstance(record["prediction"], str) and record["cer_score"] is not None
        assert 1 <= record["completion_tokens"] <= 8 and record["latency_s"] > 0
    assert not alive(pid)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/health", timeout=2)


def test_urls_engines_and_commands():
    from stages.lib.evaluation.serving import base_url, pick_engine, server_command

    assert base_url("http://h:8000/v1/chat/completions") == "http://h:8000"   # the original's flag value
    assert base_url("http://h:8000/v1/") == base_url("http://h:8000") == "http://h:8000"
    with pytest.raises(UserError, match="not an http"):
        base_url("h:8000")
    assert pick_engine("transformers") == "transformers"
    with pytest.raises(UserError, match="must be one of"):
        pick_engine("tgi")
    cmd = server_command("transformers", "models/merged", 1234, "models/merged", ["--dtype", "bfloat16"])
    assert cmd[1:] == ["serve", "models/merged", "--host", "127.0.0.1", "--port", "1234", "--dtype", "bfloat16"]

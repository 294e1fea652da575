"""The evaluate stage as users run it (`python -m stages.evaluate`): one real `transformers serve`,
the rest against the fault-injecting stub (--vllm-url) and Tesseract."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from openai_stub import MODEL, Stub, answers_for
from stages.evaluate import model_folder, top_k_arg

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"overall_cer", "overall_f1", "total_samples", "timestamp", "model_name", "samples", "failed_count",
          "samples_per_s", "tokens_per_s", "latency_p50_s", "latency_p95_s", "server", "status"}
SAMPLE_FIELDS = {"image_path", "label", "prediction", "cer_score", "f1_score", "latency_s", "completion_tokens"}


def evaluate_cmd(*args):
    return [sys.executable, "-m", "stages.evaluate", *map(str, args)]


def run_evaluate(*args, timeout=120):
    return subprocess.run(evaluate_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def one_line_error(done):
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines and lines[-1].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr
    return lines[-1]


def write_rows(path, rows):
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def processes_mentioning(text):
    """PIDs whose command line contains `text` (to prove no server was left behind)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and "pytest" not in cmdline:
                found.append(int(entry.name))
    return found


def test_real_server_end_to_end(tiny_base_dir, tiny_rows_file, tmp_path):
    out = tmp_path / "finetuned.json"
    done = run_evaluate("--model-dir", tiny_base_dir, "--engine", "transformers", "--data-file", tiny_rows_file,
                        "--output-file", out, "--top-k", 4, "--workers", 2, "--max-tokens", 8,
                        "--save-interval", 1, timeout=240)
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert FIELDS <= set(doc) and doc["status"] == "complete" and doc["total_samples"] == 4
    assert doc["model_name"] == str(tiny_base_dir) and doc["server"]["managed"] is True
    assert doc["server"]["models"]["data"][0]["id"] == str(tiny_base_dir)
    assert doc["generation"]["temperature"] == 0 and doc["generation"]["max_tokens"] == 8
    rows = json.loads(tiny_rows_file.read_text(encoding="utf-8"))[:4]
    assert [s["image_path"] for s in doc["samples"]] == [r["image_path"] for r in rows]
    assert [s["label"] for s in doc["samples"]] == [r["ocr_text"] for r in rows]
    for sample in doc["samples"]:
        assert SAMPLE_FIELDS <= set(sample) and "error" not in sample and isinstance(sample["prediction"], str)
    assert doc["failed_count"] == 0 and doc["samples_per_s"] > 0 and doc["overall_cer"] is not None
    assert processes_mentioning(str(tiny_base_dir)) == []
    # transformers serve gives no log-probabilities: the served folder scored each prediction afterwards
    assert doc["confidence_source"] == "teacher_forced"
    confidences = [s["confidence"] for s in doc["samples"]]
    assert all(isinstance(c, float) and c <= 0 for c in confidences) and len(set(confidences)) > 1


def test_sigkill_then_rerun_loses_and_duplicates_nothing(tiny_rows, tmp_path):
    rows = tiny_rows[:12]
    data = write_rows(tmp_path / "rows.json", rows)
    out = tmp_path / "out.json"
    with Stub(answers_for(rows), delay_s=0.15) as stub:
        args = ["--vllm-url", f"{stub.url}/v1/chat/completions", "--model-name", MODEL, "--data-file", data,
                "--output-file", out, "--workers", 2, "--save-interval", 2, "--top-k", "None", "--max-tokens", 32]
        proc = subprocess.Popen(evaluate_cmd(*args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        saved = []
        while len(saved) < 4:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            if out.exists():
                saved = json.loads(out.read_text(encoding="utf-8"))["samples"]
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        partial = json.loads(out.read_text(encoding="utf-8"))   # atomic saves: always whole JSON
        assert partial["status"] == "partial" and 4 <= len(partial["samples"]) < 12
        kept = {s["image_path"] for s in partial["samples"]}
        done = run_evaluate(*args)
        assert done.returncode == 0, done.stderr
        assert f"{len(kept)} finished samples kept, {12 - len(kept)} to predict" in done.stderr
        assert f"({len(kept)} kept, {12 - len(kept)} predicted this run; 0 failed" in done.stdout
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["status"] == "complete" and doc["total_samples"] == 12
    assert [s["image_path"] for s in doc["samples"]] == [r["image_path"] for r in rows]
    assert [s["prediction"] for s in doc["samples"]] == [r["ocr_text"] for r in rows]
    for row in rows:   # saved samples were never asked again; every sample was asked
        assert stub.requests[row["ocr_text"]] == 1 if row["image_path"] in kept else stub.requests[row["ocr_text"]] >= 1
    assert "DVC cannot track" in done.stderr and doc["server"]["managed"] is False
    assert doc["server"]["models"]["data"][0]["id"] == MODEL


def test_failed_fraction_above_the_limit_fails_the_stage(tiny_rows, tmp_path):
    rows = tiny_rows[:5]
    data = write_rows(tmp_path / "rows.json", rows)
    out = tmp_path / "out.json"
    with Stub(answers_for(rows), {rows[1]["ocr_text"]: ["500"] * 10}) as stub:
        args = ["--vllm-url", stub.url, "--data-file", data, "--output-file", out, "--max-retries", 1,
                "--timeout", 5, "--workers", 2, "--max-tokens", 32]
        line = one_line_error(run_evaluate(*args))
        assert "1 of 5 samples failed" in line and "HTTP 500" in line
        doc = json.loads(out.read_text(encoding="utf-8"))
        assert doc["status"] == "failed" and doc["failed_count"] == 1
        assert doc["samples"][1]["prediction"] is None and "HTTP 500" in doc["samples"][1]["error"]
        assert [s["prediction"] for i, s in enumerate(doc["samples"]) if i != 1] == \
            [r["ocr_text"] for i, r in enumerate(rows) if i != 1]
        assert stub.requests[rows[1]["ocr_text"]] == 2
        done = run_evaluate(*args, "--max-failure-rate", 0.25)   # within the limit: a result
        assert done.returncode == 0, done.stderr
        assert stub.requests[rows[0]["ocr_text"]] == 1            # resumed: only the failed one again
    assert json.loads(out.read_text(encoding="utf-8"))["status"] == "complete"


def test_bad_input_gives_one_line_errors(tiny_rows, tmp_path):
    rows = tiny_rows[:3]
    line = one_line_error(run_evaluate("--data-file", tmp_path / "missing.json", "--output-file", tmp_path / "o.json"))
    assert "missing.json: file not found" in line

    bad_image = tmp_path / "broken.png"
    bad_image.write_bytes(b"not a png")
    data = write_rows(tmp_path / "rows.json", rows + [{"image_path": str(bad_image), "ocr_text": "x"}])
    line = one_line_error(run_evaluate("--data-file", data, "--output-file", tmp_path / "o.json"))
    assert "row 3" in line and "broken.png" in line and "not a readable image" in line

    data = write_rows(tmp_path / "ok.json", rows)
    with Stub(answers_for(rows)) as stub:
        line = one_line_error(run_evaluate("--vllm-url", stub.url, "--model-name", "gemma-12b", "--max-tokens", 32,
                                           "--data-file", data, "--output-file", tmp_path / "o.json"))
        assert "model 'gemma-12b' is not served by" in line and MODEL in line
        assert sum(stub.requests.values()) == 0
    line = one_line_error(run_evaluate("--vllm-url", stub.url, "--max-tokens", 32, "--data-file", data,
                                       "--output-file", tmp_path / "o.json"))
    assert "/v1/models: no usable answer" in line

    line = one_line_error(run_evaluate("--model-dir", tmp_path, "--data-file", data, "--output-file", tmp_path / "o.json"))
    assert "not a model folder" in line
    assert not (tmp_path / "o.json").exists()   # nothing half-written


def test_the_seeds_command_runs_without_max_tokens(tiny_rows, tmp_path):
    """The original's flags against a running server, no --max-tokens: none is sent (the server's limit,
    the model's context, applies) and an answer the server cut (finish_reason length) is counted."""
    rows = tiny_rows[:3]
    data, out = write_rows(tmp_path / "rows.json", rows), tmp_path / "o.json"
    with Stub(answers_for(rows), {rows[0]["ocr_text"]: ["length"]}) as stub:
        done = run_evaluate("--vllm-url", f"{stub.url}/v1/chat/completions", "--data-file", data,
                            "--output-file", out, "--workers", 4, "--save-interval", 50)
        assert done.returncode == 0, done.stderr
        assert len(stub.payloads) == 3 and not any("max_tokens" in p for p in stub.payloads)
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["generation"]["max_tokens"] is None
    assert [r["finish_reason"] for r in doc["samples"]].count("length") == 1
    assert "1 truncated" in done.stdout and "into max_tokens the server's limit" in done.stderr


def test_tesseract_engine_uses_the_same_format(tiny_rows, tmp_path):
    rows = tiny_rows[:3]
    data = write_rows(tmp_path / "rows.json", rows)
    out = tmp_path / "tesseract.json"
    done = run_evaluate("--engine", "tesseract", "--data-file", data, "--output-file", out, "--workers", 2)
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert FIELDS <= set(doc) and doc["engine"] == "tesseract" and doc["total_samples"] == 3
    assert [s["image_path"] for s in doc["samples"]] == [r["image_path"] for r in rows]
    assert all(SAMPLE_FIELDS <= set(s) and s["prediction"] for s in doc["samples"])
    assert doc["overall_f1"] > 0.5   # Tesseract reads these rendered lines well
    assert doc["confidence_source"] == "tesseract_words"
    assert all(0 < s["confidence"] <= 1 for s in doc["samples"])


def test_top_k_and_model_folder(tmp_path, tiny_base_dir):
    assert top_k_arg("None") is None and top_k_arg("7") == 7
    base = tmp_path / "base"
    base.mkdir()
    (base / "source.json").write_text(json.dumps({"model_name": str(tiny_base_dir)}))
    assert Path(model_folder(base)) == Path(tiny_base_dir)   # evaluate_base serves what source.json names
    assert model_folder(tiny_base_dir) == Path(tiny_base_dir)


def test_sigterm_saves_progress_and_exits(tiny_rows, tmp_path):
    """dvc or CI stopping the stage: finished samples are kept, the exit code says terminated."""
    rows = tiny_rows[:10]
    data = write_rows(tmp_path / "rows.json", rows)
    out = tmp_path / "out.json"
    with Stub(answers_for(rows), delay_s=0.2) as stub:
        proc = subprocess.Popen(evaluate_cmd("--vllm-url", stub.url, "--data-file", data, "--output-file", out,
                                             "--workers", 1, "--save-interval", 100, "--max-tokens", 32),
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while sum(stub.requests.values()) < 3:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 143
    partial = json.loads(out.read_text(encoding="utf-8"))   # saved although save_interval was not reached
    assert partial["status"] == "partial" and 2 <= len(partial["samples"]) < 10
    assert [s["prediction"] for s in partial["samples"]] == [r["ocr_text"] for r in rows[:len(partial["samples"])]]


def test_vllm_engine_command_and_stop_strings(tiny_rows, tmp_path):
    """The vLLM branch with a stand-in `vllm` on PATH (vLLM needs a GPU): the stage starts
    `vllm serve DIR --served-model-name DIR`, sends the stop strings, and stops it afterwards."""
    rows = tiny_rows[:3]
    data = write_rows(tmp_path / "rows.json", rows)
    model = tmp_path / "merged"
    model.mkdir()
    (model / "config.json").write_text("{}")
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(answers_for(rows), ensure_ascii=False), encoding="utf-8")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "vllm"
    fake.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                    "from openai_stub import fake_vllm_main\nfake_vllm_main(sys.argv)\n")
    fake.chmod(0o755)
    log = tmp_path / "requests.jsonl"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_VLLM_ANSWERS=str(answers),
               FAKE_VLLM_LOG=str(log))
    out = tmp_path / "out.json"
    line = one_line_error(subprocess.run(evaluate_cmd("--engine", "vllm", "--model-dir", model, "--data-file", data,
                                                      "--output-file", out), cwd=ROOT, capture_output=True, text=True,
                                         timeout=120, env=env))
    assert "merged: no tokenizer to measure the labels with" in line and not out.exists()   # max_tokens auto
    done = subprocess.run(evaluate_cmd("--engine", "vllm", "--model-dir", model, "--data-file", data,
                                       "--output-file", out, "--workers", 2, "--max-tokens", 24),
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["engine"] == "vllm" and doc["model_name"] == str(model)
    assert [s["prediction"] for s in doc["samples"]] == [r["ocr_text"] for r in rows]
    sent = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(sent) == 3 and all(p["stop"] == ["<end_of_turn>"] and p["model"] == str(model) for p in sent)
    assert all(p["temperature"] == 0 and p["max_tokens"] == doc["generation"]["max_tokens"] for p in sent)
    assert processes_mentioning(str(model)) == []


def test_resume_counts_kept_and_predicted_again_after_images_changed(tiny_rows, tmp_path):
    """Two images change after a finished run: the log says 10 kept and 2 predicted again."""
    from PIL import Image

    rows = [{**r, "image_path": str(tmp_path / f"img{i}.png")} for i, r in enumerate(tiny_rows[:12])]
    for row, original in zip(rows, tiny_rows):
        Image.open(original["image_path"]).save(row["image_path"])
    data, out = write_rows(tmp_path / "rows.json", rows), tmp_path / "out.json"
    args = ["--data-file", data, "--output-file", out, "--workers", 2, "--max-tokens", 32, "--model-name", MODEL]
    with Stub(answers_for(rows)) as stub:
        assert run_evaluate("--vllm-url", stub.url, *args).returncode == 0
        for row in rows[:2]:   # new pixels, same paths and labels
            Image.open(row["image_path"]).rotate(180).save(row["image_path"])
        stub.answers.update(answers_for(rows))
        done = run_evaluate("--vllm-url", stub.url, *args)
        assert done.returncode == 0, done.stderr
        assert sum(stub.requests.values()) == 12 + 2
    assert ("10 finished samples kept, 2 to predict (failed, new or changed); 2 earlier results no longer match"
            in done.stderr), done.stderr
    assert "(10 kept, 2 predicted this run; 0 failed, 0 truncated), raw CER 0.0000, raw F1 1.0000 (text as predicted" \
        in done.stdout, done.stdout
    assert f"evaluate: out on {data}: 12 samples" in done.stdout


def test_truncation_warning_tells_a_loop_from_a_low_limit(tiny_rows, tmp_path):
    rows = tiny_rows[:4]
    data, out = write_rows(tmp_path / "rows.json", rows), tmp_path / "out.json"
    answers = answers_for(rows)
    urls = list(answers)
    loop_label, cut_label = rows[0]["ocr_text"], rows[1]["ocr_text"]
    answers[urls[0]] = loop_label + "發票票票票票票"          # past the label, repeating one character
    answers[urls[1]] = cut_label[:2]                        # cut before the label's length
    with Stub(answers, {answers[urls[0]]: ["length"], answers[urls[1]]: ["length"]}) as stub:
        done = run_evaluate("--vllm-url", stub.url, "--model-name", MODEL, "--data-file", data,
                            "--output-file", out, "--max-tokens", 12)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: ") and "max_tokens" in line]
    assert len(warnings) == 2, done.stderr
    cut, loop = warnings
    assert cut.startswith("warning: 1 of 4 predictions were cut by max_tokens 12 before the label's length")
    assert f"label {len(cut_label)} characters, prediction 2" in cut and "raise evaluate.max_tokens" in cut
    assert loop.startswith("warning: 1 of 4 predictions looped into max_tokens 12 (a repeated substring, e.g. '票'")
    assert "a higher limit would not help" in loop and "raise" not in loop

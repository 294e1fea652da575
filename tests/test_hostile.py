"""Hostile and careless input: outputs never delete what they did not write, a killed replace loses
nothing, hostile files stay data, and every bad input is one line with exit code 2."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, make_rows

ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}


def run_stage(module, *args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", f"stages.{module}", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(done, *needles):
    """The stage failed the user-error way: exit 2, one line on stderr, no traceback."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def project(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    return tmp_path


def write_raw(project, n=8, seed=0, name="raw.json"):
    rows = [{"img_path": os.path.relpath(r["image_path"], project), "ocr_results": r["ocr_text"]}
            for r in make_rows(project / "img" / f"doc{seed}", n, seed=seed)]
    (project / name).write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return name


def split(project, raw, out="out", *extra):
    return run_stage("split", "--input", raw, "--output-dir", out, "--metrics", "m.json", "--plots-dir", "plots",
                     "--group-by", "none", *extra, cwd=project)


def tree(folder):
    """{relative path: bytes} of every file under folder."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ outputs never delete what they did not write

def test_output_folder_with_foreign_files_is_refused_and_kept(project):
    raw = write_raw(project)
    (project / "mydata").mkdir()
    (project / "mydata" / "notes.txt").write_text("mine")
    one_line_error(split(project, raw, "mydata"), "mydata", "did not write")
    assert (project / "mydata" / "notes.txt").read_text() == "mine"
    images = tree(project / "img")
    one_line_error(split(project, raw, "img"), "img")          # the input images' folder
    one_line_error(split(project, raw, "."), "project itself")  # the project root
    assert tree(project / "img") == images and (project / raw).is_file() and (project / "params.yaml").is_file()


def test_output_holding_the_input_is_refused(project):
    write_raw(project)
    assert split(project, "raw.json", "out").returncode == 0
    (project / "out" / "raw.json").write_text((project / "raw.json").read_text(encoding="utf-8"), encoding="utf-8")
    one_line_error(split(project, "out/raw.json", "out"), "holds an input")
    assert (project / "out" / "raw.json").is_file()


def test_browse_refuses_to_replace_results(project):
    (project / "results").mkdir()
    (project / "results" / "finetuned.json").write_text("{}")
    (project / "scored").mkdir()
    done = run_stage("browse", "--out", "results", "--scored-dir", "scored", cwd=project)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (project / "results" / "finetuned.json").read_text() == "{}"


KILL_SCRIPT = """
import os, sys, time
from pathlib import Path
window, ready = sys.argv[1], Path(sys.argv[2])
real_replace = os.replace

def pause():
    ready.write_text("in the window")
    time.sleep(600)   # SIGKILLed here

def replace(src, dst):
    real_replace(src, dst)
    if window == "aside" and str(dst).endswith(".replaced"):
        pause()        # the old folder is aside, the new one not yet in
    if window == "moved" and ".building-" in str(src) and Path(dst).name == "out":
        pause()        # the new folder is in, the old one not yet deleted

os.replace = replace
if window == "building":
    import stages.split as S
    real_write = S.atomic_write_json
    def write(path, obj, indent=2):
        real_write(path, obj, indent)
        if Path(path).name == "ocr_non_test.json":
            pause()    # the new folder half built
    S.atomic_write_json = write
import stages.split
from stages.lib.cli import run_main
run_main(stages.split.main, sys.argv[3:])
"""


@pytest.mark.parametrize("window", ["building", "aside", "moved"])
def test_sigkill_inside_the_replace_loses_nothing(project, window):
    """A real split process is SIGKILLed at each instant of the folder replace; at every instant the
    old or the new output is whole on disk, and the next run finishes the job and cleans up."""
    old_raw, new_raw = write_raw(project, seed=1, name="old.json"), write_raw(project, seed=2, name="new.json")
    assert split(project, old_raw).returncode == 0
    old = tree(project / "out")
    assert json.loads(old["ocr_test.json"])
    ready = project / "ready"
    script = project / "kill_in_window.py"
    script.write_text(KILL_SCRIPT)
    args = ["--input", new_raw, "--output-dir", "out", "--metrics", "m.json", "--plots-dir", "plots", "--group-by", "none"]
    proc = subprocess.Popen([sys.executable, str(script), window, str(ready), *args], cwd=project, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Right after the kill: the old output is whole, in place or aside, or the new one is in place.
    aside = project / ".out.replaced"
    on_disk = [tree(p) for p in (project / "out", aside) if p.is_dir()]
    assert old in on_disk or window == "moved"
    if window == "moved":
        assert tree(project / "out")["ocr_test.json"] != old["ocr_test.json"]
    # The next run (any run writing `out`) restores or finishes the replace and removes the leftovers.
    done = split(project, old_raw)
    assert done.returncode == 0, done.stderr[-2000:]
    assert tree(project / "out") == old
    leftovers = [p.name for p in project.iterdir() if p.name.startswith(".out.")]
    assert leftovers == []


# ------------------------------------------------------------------ every bad param is one line

def set_params(project, **changes):
    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    for dotted, value in changes.items():
        node = params
        *parents, last = dotted.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")


@pytest.mark.parametrize("changes, flags, needle", [
    ({"split__group_by": "parnet"}, [], "split.group_by"),
    ({"split__empty_text": "dorp"}, [], "split.empty_text"),
    ({"split__test_ratio": float("nan")}, [], "split.test_ratio"),
    ({}, ["--test-ratio", "inf"], "--test-ratio"),
])
def test_bad_split_params_are_one_line(project, changes, flags, needle):
    raw = write_raw(project, n=4)
    set_params(project, **changes)
    one_line_error(split(project, raw, "out", *flags) if not flags else
                   run_stage("split", "--input", raw, "--output-dir", "out", *flags, cwd=project), needle)
    assert not (project / "out").exists()


@pytest.mark.parametrize("key, value", [("learning_rate", float("inf")), ("val_ratio", float("nan"))])
def test_non_finite_training_params_are_one_line(project, key, value):
    set_params(project, **{key: value})
    one_line_error(run_stage("train", "--output", "lora", cwd=project), key, "finite")
    assert not (project / "lora").exists()


# ------------------------------------------------------------------ hostile images: bounded work, one line

def bomb_png(path, width=60000, height=60000):
    """A PNG header declaring width x height pixels (a few hundred bytes on disk)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))


def huge_pdf(path):
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument.new()
    pdf.new_page(14400, 14400)   # the largest PDF page: 40,000 x 40,000 pixels at 200 dpi
    pdf.save(str(path))


def long_tiff(path, pages=3000):
    from PIL import Image

    frames = [Image.new("L", (8, 8), 255) for _ in range(pages)]
    frames[0].save(path, save_all=True, append_images=frames[1:])


@pytest.mark.parametrize("make, name, texts, needle", [
    (bomb_png, "bomb.png", "x", "megapixels"),
    (huge_pdf, "huge.pdf", ["x"], "megapixels"),
    (long_tiff, "long.tif", "x", "pages, over the limit"),
])
def test_hostile_images_are_one_line_and_fast(project, make, name, texts, needle):
    ok = write_raw(project, n=3)
    make(project / name)
    rows = json.loads((project / ok).read_text(encoding="utf-8")) + [{"img_path": name, "ocr_results": texts}]
    (project / "raw.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    start = time.monotonic()
    one_line_error(split(project, "raw.json"), "row 3", name, needle)
    assert time.monotonic() - start < 60
    assert not (project / "out").exists()


def test_same_image_under_two_spellings_is_one_image(project):
    write_raw(project, n=4)
    rows = json.loads((project / "raw.json").read_text(encoding="utf-8"))
    first = Path(rows[0]["img_path"])
    rows.append({"img_path": f"{first.parent}/../{first.parent.name}/{first.name}", "ocr_results": "again"})
    (project / "raw.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    one_line_error(split(project, "raw.json"), "row 4", "duplicate", "row 0")
    rows[-1]["img_path"] = f"img/../{rows[1]['img_path']}"
    del rows[0]
    (project / "raw.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    one_line_error(split(project, "raw.json"), "duplicate")
    rows.pop()
    (project / "raw.json").write_text(json.dumps(rows[:1] + [{"img_path": f"./{rows[1]['img_path']}",
                                                             "ocr_results": rows[1]["ocr_results"]}] + rows[2:]),
                                      encoding="utf-8")
    assert split(project, "raw.json").returncode == 0
    written = json.loads((project / "out" / "ocr_test.json").read_text()) + \
        json.loads((project / "out" / "ocr_non_test.json").read_text())
    assert sorted(r["image_path"] for r in written) == sorted(r["img_path"] for r in rows)   # './' dropped


# ------------------------------------------------------------------ hostile peers: servers, model folders, results

def rows_file(project, n=2):
    rows = make_rows(project / "img" / "eval", n)
    (project / "rows.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return rows


@pytest.mark.parametrize("server_args", [["--host", "0.0.0.0"], ["--host=0.0.0.0"], ["--port", "80"],
                                         ["--trust-remote-code"]])
def test_managed_server_args_cannot_change_where_it_listens(project, server_args):
    """Whatever evaluate.server_args say, the managed server listens on 127.0.0.1 and runs no folder code:
    reserved arguments are refused before any server starts."""
    set_params(project, evaluate__server_args=server_args)
    rows_file(project)
    done = run_stage("evaluate", "--data-file", "rows.json", "--output-file", "out.json", cwd=project)
    one_line_error(done, "evaluate.server_args", server_args[0].split("=")[0], "127.0.0.1")
    assert not (project / "out.json").exists()


def test_model_folder_with_custom_code_is_one_line_and_never_imported(project):
    folder = project / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "evil.Config"}}))
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "evil.py").write_text("open(__file__ + '.ran', 'w').write('ran')\n")
    rows_file(project)
    done = run_stage("evaluate", "--model-dir", "evil", "--data-file", "rows.json", "--output-file", "out.json",
                     "--max-tokens", "8", cwd=project)
    one_line_error(done, "evil/config.json", "auto_map")
    assert not (folder / "evil.py.ran").exists() and not (project / "out.json").exists()


class KeyedServer:
    """An OpenAI-compatible server that wants `Authorization: Bearer KEY` and replies what no real server
    can be made to on demand: a lone surrogate in the text, token counts as strings."""

    def __init__(self, key):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        import threading

        seen = self.auth = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, code, text):
                data = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def authorized(self):
                seen.append(self.headers.get("Authorization"))
                return self.headers.get("Authorization") == f"Bearer {key}"

            def do_GET(self):
                if not self.authorized():
                    return self.send(401, '{"error": "no key"}')
                self.send(200, '{"object": "list", "data": [{"id": "m"}]}')

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                if not self.authorized():
                    return self.send(401, '{"error": "no key"}')
                self.send(200, '{"choices": [{"finish_reason": "stop", "message": {"content": "a\\ud800b"}}],'
                               ' "usage": {"completion_tokens": "12", "prompt_tokens": "x"}}')

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_api_key_goes_as_bearer_token_and_never_into_outputs(project, monkeypatch):
    rows_file(project)
    server = KeyedServer("s3cret-key")
    monkeypatch.setitem(ENV, "OCR_API_KEY", "s3cret-key")
    try:
        done = run_stage("evaluate", "--vllm-url", server.url, "--data-file", "rows.json", "--output-file", "out.json",
                         "--max-tokens", "8", "--workers", "1", cwd=project)
    finally:
        server.server.shutdown()
    assert done.returncode == 0, done.stderr[-2000:]
    assert set(server.auth) == {"Bearer s3cret-key"}
    text = (project / "out.json").read_text(encoding="utf-8")
    assert "s3cret" not in text + done.stdout + done.stderr
    doc = json.loads(text)
    assert [s["prediction"] for s in doc["samples"]] == ["a\ufffdb"] * 2     # the lone surrogate replaced
    assert [s["completion_tokens"] for s in doc["samples"]] == [None, None]  # "12" is no count
    # Credentials in the URL are refused, never stored.
    done = run_stage("evaluate", "--vllm-url", "http://user:s3cret@127.0.0.1:9/v1", "--data-file", "rows.json",
                     "--output-file", "out2.json", "--max-tokens", "8", cwd=project)
    line = one_line_error(done, "credentials", "OCR_API_KEY")
    assert "s3cret" not in line and not (project / "out2.json").exists()


def test_search_password_with_at_sign_is_never_shown(monkeypatch, tmp_path):
    from stages.lib.cli import UserError
    from stages.lib.search.study import open_storage, storage_url

    monkeypatch.setenv("OCR_SEARCH_STORAGE", "postgresql+psycopg2://bob:p@ss:w0rd@127.0.0.1:9/db")
    with pytest.raises(UserError) as refused:
        storage_url(tmp_path)
    assert "%40" in str(refused.value) and "bob:***@127.0.0.1:9/db" in str(refused.value)
    assert "ss" not in str(refused.value).replace("password", "")
    with pytest.raises(UserError) as failed:   # an encoded '@': the driver's message hides the password
        open_storage("postgresql+psycopg2://bob:p%40ss:w0rd@127.0.0.1:9/db")
    assert "w0rd" not in str(failed.value) and "bob:***@" in str(failed.value)


def test_two_runs_with_one_title_are_one_line(project):
    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    models = params["runs"]["models"]
    first, second = list(models)[:2]
    models[second]["title"] = models[first]["title"]
    (project / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    one_line_error(run_stage("browse", cwd=project), "same title", first, second)


# ------------------------------------------------------------------ the results page: tampered files stay data

XSS = '<img src=x onerror="document.body.dataset.pwned=1">"\'><script>document.body.dataset.pwned=2</script>'


@pytest.fixture
def page_project(project):
    """results/ with script in every text field -> (score) scored/ -> (browse) browse/."""
    from test_browse import RUNS

    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    params["runs"] = json.loads(json.dumps(RUNS))
    params["runs"]["engines"]["tesseract"]["title"] = "Tess " + XSS
    (project / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    rows = [(os.path.relpath(r["image_path"], project), r["ocr_text"]) for r in make_rows(project / "data/lines", 3)]
    rows.append(("data/lines/" + XSS + ".png", "no such image"))
    (project / "results").mkdir()
    for name in ("finetuned", "base", "tesseract"):
        samples = [{"image_path": path, "label": text + XSS, "prediction": XSS + text, "finish_reason": XSS}
                   for path, text in rows]
        samples[1].update(prediction=None, error=XSS)
        (project / "results" / f"{name}.json").write_text(json.dumps({"samples": samples}, ensure_ascii=False))
    for stage in ("score", "browse"):
        done = run_stage(stage, cwd=project)
        assert done.returncode == 0, done.stderr[-2000:]
    return project


def rendered(project):
    from test_browse import chromium

    url = (project / "browse" / "index.html").as_uri()
    return chromium("--virtual-time-budget=5000", "--dump-dom", url)


def browser_or_skip():
    from test_browse import CHROMIUM

    if CHROMIUM is None:
        pytest.skip("chromium is not installed (make setup installs it)")


def test_script_in_every_text_field_stays_text_in_chromium(page_project):
    browser_or_skip()
    dom = rendered(page_project)
    assert 'data-ready="1"' in dom and "pwned" not in dom.split("<body", 1)[1].split(">", 1)[0]
    assert "<script>document" not in dom and "&lt;img src=x" in dom


def test_tampered_page_data_stays_text_in_chromium(page_project):
    """data.js edited by hand (past the stage's checks): the page escapes what it puts in attributes."""
    browser_or_skip()
    path = page_project / "browse" / "data.js"
    text = path.read_text(encoding="utf-8")
    data = json.loads(text[text.index("=") + 1:].rstrip().rstrip(";"))
    data["samples"][0]["runs"]["finetuned"]["c"] = XSS
    data["runs"][0]["scored_samples"] = XSS
    path.write_text(f"window.BROWSE_DATA = {json.dumps(data)};\n", encoding="utf-8")
    dom = rendered(page_project)
    assert 'data-ready="1"' in dom and "pwned" not in dom.split("<body", 1)[1].split(">", 1)[0]


@pytest.mark.parametrize("field, value, needle", [
    ("image_sha256", "../../../outside", "image_sha256"),
    ("cer_score", XSS, "cer_score"),
    ("label", {"html": XSS}, "label"),
])
def test_tampered_scored_file_is_one_line(page_project, field, value, needle):
    path = page_project / "scored" / "base.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["samples"][0][field] = value
    path.write_text(json.dumps(doc), encoding="utf-8")
    before = tree(page_project / "browse")
    one_line_error(run_stage("browse", cwd=page_project), "scored/base.json", "samples[0]", needle)
    assert tree(page_project / "browse") == before
    assert not (page_project / "outside.png").exists()


def test_serve_follows_no_link_out_of_the_project_and_port_in_use_is_one_line(page_project, tmp_path_factory):
    import socket
    import urllib.error
    import urllib.request

    secret = tmp_path_factory.mktemp("elsewhere") / "secret.png"
    secret.write_bytes(b"\x89PNG not yours")
    (page_project / "data" / "linked.png").symlink_to(secret)
    path = page_project / "scored" / "base.json"   # a scored sample naming the link
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["samples"][0]["image_path"] = "data/linked.png"
    path.write_text(json.dumps(doc), encoding="utf-8")
    assert run_stage("browse", cwd=page_project).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "stages.browse", "--serve", "--port", "0"], cwd=page_project,
                            env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().split("serving ")[1].split(" ")[0]
        base = url.rsplit("/browse/", 1)[0]
        for target in ("data/linked.png", "browse/../data/linked.png"):
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(f"{base}/{target}", timeout=10)
        assert urllib.request.urlopen(f"{base}/data/lines/line_0000.png", timeout=10).read().startswith(b"\x89PNG")
        port = int(url.split(":")[2].split("/")[0])
        one_line_error(run_stage("browse", "--serve", "--port", str(port), cwd=page_project), "--port", "in use")
    finally:
        proc.terminate()
        proc.wait(10)


def test_full_disk_is_one_line(project):
    """A real full filesystem (a 16 KiB tmpfs; needs root to mount, skipped otherwise)."""
    full = project / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(full)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        raw = write_raw(project, n=60)
        rows = json.loads((project / raw).read_text(encoding="utf-8"))
        (project / raw).write_text(json.dumps([dict(r, ocr_results=r["ocr_results"] * 40) for r in rows],
                                              ensure_ascii=False), encoding="utf-8")
        one_line_error(split(project, raw, "full/out"), "no space left", "full/")
        assert [p.name for p in full.iterdir()] == []   # nothing half-written left behind
    finally:
        subprocess.run(["umount", str(full)], check=True)


# ------------------------------------------------------------------ training: resume and deterministic outputs

def test_resume_skips_a_checkpoint_killed_while_written_and_target_modules_are_sorted(tiny_base_dir, tiny_rows,
                                                                                        tmp_path):
    import shutil

    from test_train import FirstStep, StopAt, small_config
    from stages.lib.training import run_training, split_train_val

    config = small_config(num_train_epochs=2.0)   # 10 steps, a checkpoint every 2
    train, val = split_train_val(tiny_rows, config["val_ratio"], config["seed"])
    out, ckpt = tmp_path / "lora", tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        run_training(config, tiny_base_dir, train, val, out, checkpoint_dir=ckpt, callbacks=[StopAt(5)],
                     measure_cer=False)
    # What SIGKILL while the Trainer writes checkpoint-6 leaves: its weights, a cut trainer_state.json.
    shutil.copytree(ckpt / "checkpoint-4", ckpt / "checkpoint-6")
    state = (ckpt / "checkpoint-6" / "trainer_state.json")
    state.write_text(state.read_text()[:40])
    seen = []
    metrics = run_training(config, tiny_base_dir, train, val, out, checkpoint_dir=ckpt, callbacks=[FirstStep(seen)],
                           resume=True, measure_cer=False)
    assert seen[0] == 4 and metrics["global_step"] == 10
    modules = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert modules == sorted(modules) and len(modules) > 1


# ------------------------------------------------------------------ the README's own-data steps, in the wrong order

def test_own_data_survives_dvc_repro_before_dvc_remove_synth(project):
    """Copy your images under data/raw_data/, then `dvc repro` before anything else (the natural wrong
    order), then the README's steps: the user's files are never touched."""
    import shutil

    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent))
    shutil.copytree(ROOT / "stages", project / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {k: stages[k] for k in ("synth", "split")}}))
    set_params(project, synth__n_lines=40, split__group_by="none")

    def sh(*cmd):
        done = subprocess.run(cmd, cwd=project, env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    sh("git", "init", "-q")
    sh(dvc, "init", "-q")
    rows = [{"img_path": os.path.relpath(r["image_path"], project), "ocr_results": r["ocr_text"]}
            for r in make_rows(project / "data/raw_data/images/doc1", 6, seed=7)]
    (project / "data/raw_data/ocr.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    mine = tree(project / "data/raw_data")
    out = sh(dvc, "repro")   # before `dvc remove synth`: the synth stage writes its own folder
    assert "Running stage 'synth'" in out and tree(project / "data/raw_data") == mine
    assert "data/raw_data/ocr.json is there but split.data" in out
    sh(dvc, "repro", "--force", "synth")
    assert tree(project / "data/raw_data") == mine
    params = project / "params.yaml"
    params.write_text(params.read_text(encoding="utf-8").replace("data: data/synthetic", "data: data/raw_data"))
    sh(dvc, "remove", "synth", "--outs")
    sh(dvc, "add", "data/raw_data")
    sh(dvc, "repro")
    assert tree(project / "data/raw_data") == mine
    split_rows = json.loads((project / "data/input/ocr_test.json").read_text(encoding="utf-8")) + \
        json.loads((project / "data/input/ocr_non_test.json").read_text(encoding="utf-8"))
    assert sorted(r["image_path"] for r in split_rows) == sorted(r["img_path"] for r in rows)
    assert not (project / "data/synthetic").exists()


def test_temp_files_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    from stages.lib.io import atomic_write_json

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".x.json.{dead.pid}-abcd.tmp"      # what a writer SIGKILLed mid-write leaves
    live = tmp_path / f".x.json.{os.getpid()}-efgh.tmp"   # a writer still running: left alone
    stale.write_text("half")
    live.write_text("busy")
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "x.json"])


def test_lone_surrogates_in_files_are_replaced(tmp_path):
    from stages.lib.evaluation.client import load_previous
    from stages.lib.io import atomic_write_json, read_json

    path = tmp_path / "r.json"
    path.write_text('{"fingerprint": "f", "samples": [{"image_path": "a", "label": "x\\udc80y\\ud83d\\ude00",'
                    ' "prediction": "p\\ud800"}]}', encoding="utf-8")
    doc = read_json(path)
    assert doc["samples"][0]["label"] == "x\ufffdy\U0001F600"   # a lone one replaced, a pair joined
    atomic_write_json(tmp_path / "out.json", doc)   # writable as UTF-8 now
    assert list(load_previous(path, "f").values())[0]["prediction"] == "p\ufffd"


def test_train_refuses_an_output_that_is_not_its_own_before_training(project, tiny_base_dir):
    import shutil

    shutil.copytree(tiny_base_dir, project / "models/base")
    rows = make_rows(project / "img", 4)
    (project / "rows.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    one_line_error(run_stage("train", "--non-test", "rows.json", "--output", "models/base", cwd=project),
                   "holds an input")
    one_line_error(run_stage("train", "--non-test", "rows.json", "--output", "img", cwd=project), "did not write")
    assert len(list((project / "img").iterdir())) == 4 and (project / "models/base/config.json").is_file()


def test_ctrl_c_between_the_two_moves_puts_the_old_folder_back(tmp_path, monkeypatch):
    from stages.lib import io

    with io.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("old")
    real = os.replace

    def interrupted(src, dst):
        real(src, dst)
        if str(dst).endswith(".replaced"):
            raise KeyboardInterrupt

    monkeypatch.setattr(io.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("new")
    assert (tmp_path / "out" / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

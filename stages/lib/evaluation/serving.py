"""A local OpenAI-compatible server for one model folder, started and always stopped by us.

    with managed_server("models/merged", engine="auto", startup_timeout=300) as server:
        ...  # server.url, server.model_name (the `model` field to send), server.models

engine "auto" picks `vllm serve` when vLLM is installed and a CUDA GPU is visible, otherwise
`transformers serve` (the transformers[serving] extra). The server listens on 127.0.0.1 on a
free port and is pinned to the folder, so the `model` field must be exactly the folder path
(vLLM gets the same name through --served-model-name).

Stopping: the server runs in its own process group, and the whole group gets SIGTERM, then
SIGKILL, when the block ends (success, error, Ctrl-C, or SIGTERM turned into SystemExit by the
caller). If our process is SIGKILLed, the kernel kills the server too (PR_SET_PDEATHSIG), so no
server outlives the stage. Its output goes to a log file whose last lines explain a failed start.
"""
import ctypes
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests

from ..cli import UserError

ENGINES = ("auto", "transformers", "vllm")
PR_SET_PDEATHSIG = 1


@dataclass
class Server:
    url: str                     # base URL, e.g. http://127.0.0.1:PORT (no /v1)
    model_name: str              # the `model` field requests must carry
    engine: str                  # transformers | vllm | external
    models: dict = field(default_factory=dict)   # the /v1/models answer
    pid: int | None = None
    log_path: str | None = None  # a managed server's output; kept after the run when keep_log() was called
    _keep: dict = field(default_factory=dict, repr=False)

    def keep_log(self):
        """Keep the server's log after it stops (samples failed: the cause is in there)."""
        self._keep["log"] = True

    @property
    def accepts_stop(self):
        """transformers serve 5.24 answers HTTP 500 to `stop` with a vision processor."""
        return self.engine != "transformers"


def base_url(url):
    """Accept the original's full endpoint (…/v1/chat/completions) or a base URL; return the base."""
    url = url.strip().rstrip("/")
    for suffix in ("/chat/completions", "/v1"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    if not url.startswith(("http://", "https://")):
        raise UserError(f"--vllm-url: '{url}' is not an http(s) URL (e.g. http://HOST:PORT/v1/chat/completions)")
    return url


def pick_engine(engine):
    """'auto' -> vllm when importable and a CUDA GPU is visible, else transformers."""
    if engine not in ENGINES:
        raise UserError(f"evaluate.engine: '{engine}' must be one of {list(ENGINES)} or tesseract")
    if engine != "auto":
        return engine
    if importlib.util.find_spec("vllm") is None:
        return "transformers"
    import torch  # only on the vLLM path: torch's import costs seconds

    return "vllm" if torch.cuda.is_available() else "transformers"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def transformers_serve_takes(flag):
    """Whether the installed `transformers serve` has `flag`: read from its source, without importing it
    (transformers 5.24 has --chat-template-kwargs; older releases of its serving CLI may not)."""
    spec = importlib.util.find_spec("transformers")
    folders = list(spec.submodule_search_locations or []) if spec else []
    option = flag.lstrip("-").replace("-", "_")
    return any(option in path.read_text(encoding="utf-8", errors="replace")
               for folder in folders for path in (Path(folder) / "cli" / "serve.py",
                                                  Path(folder) / "commands" / "serving.py") if path.is_file())


def image_server_args(engine, image):
    """The server flags that apply params `image:` (the processor settings training used) to every
    request: vLLM's --mm-processor-kwargs, transformers serve's --chat-template-kwargs (forwarded to
    processor.apply_chat_template, which hands them to the image processor). [] when there are none."""
    if not image:
        return []
    flag = "--mm-processor-kwargs" if engine == "vllm" else "--chat-template-kwargs"
    if engine != "vllm" and not transformers_serve_takes(flag):
        raise UserError(f"params.yaml: 'image' settings cannot be given to this transformers serve (no {flag}): "
                        "it would read pages with its own defaults; use evaluate.engine vllm or transformers 5.24")
    return [flag, json.dumps(image, sort_keys=True)]


def server_command(engine, model_dir, port, model_name, extra_args=()):
    """The command line that serves `model_dir` under `model_name` on 127.0.0.1:port, plus the
    user's extra arguments (e.g. vLLM's --max-model-len, transformers' --dtype)."""
    if engine == "vllm":
        exe = shutil.which("vllm")
        if exe is None:
            raise UserError("evaluate.engine is vllm but the `vllm` command is not on PATH (pip install vllm)")
        return [exe, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                "--served-model-name", model_name, *extra_args]
    exe = shutil.which("transformers") or str(Path(sys.executable).with_name("transformers"))
    if not Path(exe).exists():
        raise UserError("the `transformers` command is not installed (pip install 'transformers[serving]')")
    return [exe, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), *extra_args]


def _die_with_parent():
    """Runs in the child before exec: own process group, and SIGKILL when our process dies."""
    parent = os.getppid()
    os.setsid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the process-group kill below still covers normal exits
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def stop_process(proc, grace_s=10.0):
    """SIGTERM the process group, wait up to grace_s, then SIGKILL it; reap the child."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:  # children left in the group (vLLM's engine processes) go too
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _log_tail(log_path, lines=3):
    try:
        text = Path(log_path).read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def wait_healthy(url, proc, timeout_s, log_path):
    """Poll GET /health until 200; fail early if the process exits, and after timeout_s."""
    deadline = time.monotonic() + timeout_s
    with requests.Session() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise UserError(f"the model server exited with code {proc.returncode} before it was ready "
                                f"(log {log_path}: {_log_tail(log_path)})")
            try:
                if session.get(f"{url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
    raise UserError(f"the model server at {url} was not healthy after {timeout_s:g} s "
                    f"(evaluate.startup_timeout; log {log_path}: {_log_tail(log_path)})")


@contextmanager
def run_server(cmd, url, startup_timeout, env=None, keep=None):
    """Start `cmd`, wait until `url`/health answers, yield the Popen; always stop it afterwards.
    The log is deleted after a clean run unless keep["log"] was set meanwhile."""
    fd, log_path = tempfile.mkstemp(prefix="ocr-eval-server-", suffix=".log")
    proc = None
    ok = False
    try:
        with os.fdopen(fd, "w") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=_die_with_parent, env=env)
        wait_healthy(url, proc, startup_timeout, log_path)
        yield proc, log_path
        ok = True
    finally:
        if proc is not None:
            stop_process(proc)
        if ok and not (keep or {}).get("log"):
            Path(log_path).unlink(missing_ok=True)  # keep the log only when something went wrong


def served_models(url, timeout=10):
    """The server's GET /v1/models answer (a dict), or a UserError saying why there is none."""
    try:
        response = requests.get(f"{url}/v1/models", timeout=timeout)
        response.raise_for_status()
        models = response.json()
    except (requests.RequestException, ValueError) as err:
        raise UserError(f"{url}/v1/models: no usable answer ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(models, dict) or not isinstance(models.get("data", []), list):
        raise UserError(f"{url}/v1/models: expected an OpenAI model list, got {response.text[:200]!r}")
    return models


def served_ids(models):
    """The model ids in a served_models() answer."""
    return [m.get("id") for m in models.get("data", []) if isinstance(m, dict)]


def check_model_served(models, model_name, url):
    """A wrong model name fails here, before any sample: one line naming what the server has."""
    ids = served_ids(models)
    if ids and model_name not in ids:
        raise UserError(f"model '{model_name}' is not served by {url} (it serves {ids}); "
                        "pass --model-name with one of those")


@contextmanager
def managed_server(model_dir, engine="auto", startup_timeout=300, model_name=None, extra_args=()):
    """Serve `model_dir` locally for the duration of the block; yield a Server."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: not a model folder (no config.json); run the stage that writes it first")
    engine = pick_engine(engine)
    name = model_name or str(model_dir)
    if engine == "transformers" and name != str(model_dir):
        raise UserError(f"--model-name '{name}': transformers serve answers only to the folder path "
                        f"'{model_dir}'; leave --model-name out")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
    keep = {}
    with run_server(server_command(engine, model_dir, port, name, extra_args), url, startup_timeout, env,
                    keep) as (proc, log_path):
        models = served_models(url)
        check_model_served(models, name, url)
        yield Server(url=url, model_name=name, engine=engine, models=models, pid=proc.pid, log_path=log_path,
                     _keep=keep)

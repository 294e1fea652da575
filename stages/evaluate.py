"""evaluate: OCR a test split with a model (or Tesseract) -> results/NAME.json with RAW CER/F1.

    python -m stages.evaluate                                   # models/merged -> results/finetuned.json
    python -m stages.evaluate --model-dir models/base --output-file results/base.json
    python -m stages.evaluate --engine tesseract --output-file results/tesseract.json
    python -m stages.evaluate --vllm-url http://HOST:PORT/v1/chat/completions --model-name M \\
        --data-file data/input/ocr_test.json --output-file results/x.json --top-k None --workers 8

By default the stage serves --model-dir itself (a folder, or models/base's source.json target)
on 127.0.0.1 and a free port: `vllm serve` when vLLM and a GPU are present, else
`transformers serve`; it stops the server whatever happens (stages/lib/evaluation/serving.py). With
--vllm-url it talks to a running server instead, records that server's /v1/models answer
and warns that DVC cannot track what it serves.

Every request carries the training prompt (stages/lib/prompt.py), temperature 0, max_tokens
and the stop strings of evaluate.stop (not sent to a managed `transformers serve`: 5.24 fails
with HTTP 500 on `stop` for a vision model; the model's end-of-turn token is already one of
its eos tokens there). Samples that still fail after retries get an `error` field (prediction
null, scores null) and are left out of the overall figures; the stage exits non-zero when the
failed fraction exceeds evaluate.max_failure_rate. Re-running resumes from the output file:
finished samples are kept, missing and failed ones are redone, provided the model, prompt and
generation settings (the `fingerprint`) are unchanged.

Output: {"overall_cer", "overall_f1", "total_samples", "timestamp", "model_name", "samples":
[{"image_path", "label", "prediction", "cer_score", "f1_score", "latency_s", "completion_tokens",
...}], "failed_count", "samples_per_s", "tokens_per_s", "latency_p50_s", "latency_p95_s", ...}.
Scores are raw (no normalization): the normalize-score stage scores comparably.
"""
import argparse
import hashlib
import json
import signal
import sys
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from .lib import params as P
from .lib.cli import UserError, run_main
from .lib.evaluation.engines import ENGINES as OCR_ENGINES
from .lib.evaluation.client import ChatClient, SampleError, load_previous, run_samples
from .lib.io import atomic_write_json, read_split
from .lib.prompt import user_turn
from .lib.evaluation.serving import Server, base_url, check_model_served, managed_server, served_ids, served_models

ENGINES = ("auto", "transformers", "vllm", *OCR_ENGINES)


def top_k_arg(text):
    """--top-k N | None (the original's spelling for 'all samples')."""
    if text.strip().lower() in ("none", "null", "all", ""):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or None, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 or None, got {value}")
    return value


def parse_args(argv):
    params = P.load_params()
    get = lambda key, kind, **kw: P.get(params, f"evaluate.{key}", kind, **kw)  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="models/merged", help="model folder to serve (or models/base)")
    parser.add_argument("--engine", choices=ENGINES, default=get("engine", str, choices=ENGINES))
    parser.add_argument("--vllm-url", "--url", dest="url", default=get("url", str, allow_none=True),
                        help="a running OpenAI-compatible server instead of serving --model-dir")
    parser.add_argument("--model-name", default=None, help="the `model` field (default: the served folder)")
    parser.add_argument("--data-file", default="data/input/ocr_test.json")
    parser.add_argument("--output-file", default="results/finetuned.json")
    parser.add_argument("--top-k", type=top_k_arg, default=get("top_k", int, minimum=1, allow_none=True))
    parser.add_argument("--workers", type=int, default=get("workers", int, minimum=1))
    parser.add_argument("--save-interval", type=int, default=get("save_interval", int, minimum=1))
    parser.add_argument("--timeout", type=float, default=get("timeout", float, minimum=0.001))
    parser.add_argument("--max-retries", type=int, default=get("max_retries", int, minimum=0))
    parser.add_argument("--max-tokens", type=int, default=get("max_tokens", int, minimum=1))
    parser.add_argument("--max-failure-rate", type=float,
                        default=get("max_failure_rate", float, minimum=0.0, maximum=1.0))
    parser.add_argument("--startup-timeout", type=float, default=get("startup_timeout", float, minimum=1))
    parser.add_argument("--instruction", default=P.get(params, "instruction", str))
    args = parser.parse_args(argv)
    if args.engine in OCR_ENGINES:   # each engine reads only its own keys (dvc.yaml lists them)
        args.engine_settings = OCR_ENGINES[args.engine].settings(params)
    else:
        args.stop = get("stop", list)
        if not all(isinstance(s, str) and s for s in args.stop):
            raise UserError(f"params.yaml: 'evaluate.stop' must be a list of non-empty strings, got {args.stop!r}")
        args.retry_backoff = get("retry_backoff", float, minimum=0)
        args.server_args = get("server_args", list)
        if not all(isinstance(a, str) for a in args.server_args):
            raise UserError(f"params.yaml: 'evaluate.server_args' must be a list of strings, got {args.server_args!r}")
    for name in ("workers", "save_interval"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_retries < 0 or args.timeout <= 0 or args.max_tokens < 1:
        raise UserError("--max-retries must be >= 0, --timeout > 0 and --max-tokens >= 1")
    if not 0 <= args.max_failure_rate <= 1:
        raise UserError(f"--max-failure-rate must be between 0 and 1, got {args.max_failure_rate}")
    return args


def read_samples(path, top_k):
    """The split's rows (first top_k) as [{"image_path", "label"}], every image checked readable."""
    rows = read_split(path)
    if top_k is not None:
        rows = rows[:top_k]
    if not rows:
        raise UserError(f"{path}: no samples to evaluate")
    for i, row in enumerate(rows):
        image_path = row["image_path"]
        try:
            with Image.open(image_path) as image:
                image.verify()
        except FileNotFoundError:
            raise UserError(f"{path}: row {i}: image '{image_path}' does not exist") from None
        except Exception as err:  # PIL raises many types for a bad file
            raise UserError(f"{path}: row {i}: image '{image_path}' is not a readable image "
                            f"({type(err).__name__})") from None
    return [{"image_path": r["image_path"], "label": r["ocr_text"]} for r in rows]


def model_folder(path):
    """--model-dir itself, or the checkpoint models/base's source.json points at."""
    path = Path(path)
    if (path / "source.json").is_file():
        from .lib.modeling import resolve_base_dir

        return Path(resolve_base_dir(path))
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a model folder (no config.json); run the stage that writes it "
                        "(`dvc repro merge` for models/merged) or pass --vllm-url")
    return path


def folder_identity(path):
    """Names, sizes and mtimes of a model folder: cheap, and changes whenever a stage rewrites it."""
    return sorted((str(p.relative_to(path)), st.st_size, st.st_mtime_ns)
                  for p in Path(path).rglob("*") if p.is_file() for st in [p.stat()])


def fingerprint(identity, generation=None):
    """What must match for an earlier output file to be resumed: the model (or engine) and,
    for a model, the prompt as built and the generation settings (ChatClient.generation)."""
    settings = {} if generation is None else {
        "prompt": user_turn(generation["instruction"], image_url="<image>"), "max_tokens": generation["max_tokens"],
        "stop": generation["stop"], "temperature": generation["temperature"]}
    blob = json.dumps({"identity": identity, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# ---- the stage ----

@contextmanager
def model_server(args, folder):
    """A Server to talk to: the user's URL (checked, untracked) or one we start and stop on `folder`."""
    if args.url:
        url = base_url(args.url)
        models = served_models(url, timeout=min(args.timeout, 30))
        ids = served_ids(models)
        name = args.model_name or (ids[0] if len(ids) == 1 else None)
        if name is None:
            raise UserError(f"{url} serves {ids or 'no listed model'}: pass --model-name")
        check_model_served(models, name, url)
        print(f"warning: evaluating {name} at {url}: DVC cannot track what that server serves; "
              "its /v1/models answer is recorded in the output", file=sys.stderr)
        yield Server(url=url, model_name=name, engine="external", models=models)
        return
    print(f"evaluate: starting a model server on {folder} (engine {args.engine}) ...", file=sys.stderr)
    with managed_server(folder, args.engine, args.startup_timeout, args.model_name, args.server_args) as server:
        print(f"evaluate: {server.engine} serve ready at {server.url} (pid {server.pid})", file=sys.stderr)
        yield server


def evaluate(args, samples, predict, identity, model_name, server_info, generation=None, stopping=None):
    """Run (resuming), write the final document, fail when too many samples failed. `generation`:
    the model's request settings (None for Tesseract)."""
    fp = fingerprint(identity, generation)
    previous = load_previous(args.output_file, fp)
    if previous is None:
        print(f"evaluate: {args.output_file} is from another model or settings: starting over", file=sys.stderr)
    elif previous:
        print(f"evaluate: resuming: {len(previous)} finished samples kept from {args.output_file}", file=sys.stderr)
    header = {"model_name": model_name, "engine": server_info["engine"], "fingerprint": fp,
              "data_file": str(args.data_file), "server": server_info,
              "top_k": args.top_k}
    if generation is not None:
        header["generation"] = generation
    records, summary = run_samples(samples, predict, workers=args.workers, output_path=args.output_file,
                                   header=header, save_interval=args.save_interval, previous=previous,
                                   desc=Path(args.output_file).stem, on_interrupt=stopping)
    failed = summary["failed_count"]
    status = "failed" if failed / len(records) > args.max_failure_rate else "complete"
    doc = {"overall_cer": summary.pop("overall_cer"), "overall_f1": summary.pop("overall_f1"),
           "total_samples": summary.pop("total_samples"),
           "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "model_name": model_name, "status": status, **summary, **header, "samples": records}
    atomic_write_json(args.output_file, doc)
    figures = ", ".join(f"{k} {doc[k]:.4f}" for k in ("overall_cer", "overall_f1") if doc[k] is not None)
    print(f"evaluate: {len(records)} samples ({failed} failed), {figures}, {doc['samples_per_s']} samples/s "
          f"-> {args.output_file}")
    if status == "failed":
        common, count = Counter(r["error"] for r in records if "error" in r).most_common(1)[0]
        raise UserError(f"{failed} of {len(records)} samples failed (more than evaluate.max_failure_rate "
                        f"{args.max_failure_rate:g}); most common ({count}x): {common[:200]} "
                        "(re-run to retry only the failed samples)")


def main(argv=None):
    args = parse_args(argv)
    samples = read_samples(args.data_file, args.top_k)
    # SIGTERM (dvc, CI, kill) unwinds like Ctrl-C: progress saved, server stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.engine in OCR_ENGINES:
        engine = OCR_ENGINES[args.engine]
        info = engine.identity(args.engine_settings)
        predict = engine.predictor(args.engine_settings, args.timeout)
        name = " ".join(str(v) for k, v in info.items() if k not in ("version",))
        evaluate(args, samples, predict, info, name, info)
        return
    folder = None if args.url else model_folder(args.model_dir)
    with model_server(args, folder) as server:
        client = ChatClient(server.url, server.model_name, args.instruction, max_tokens=args.max_tokens,
                            stop=args.stop if server.accepts_stop else [], timeout=args.timeout, max_retries=args.max_retries,
                            backoff_s=args.retry_backoff)
        if server.engine == "external":
            identity = {"url": server.url, "model": server.model_name,
                        "served": served_ids(server.models)}
        else:
            identity = {"engine": server.engine, "folder": str(Path(args.model_dir)), "server_args": args.server_args,
                        "files": folder_identity(folder)}
        info = {"engine": server.engine, "url": server.url, "managed": server.engine != "external",
                "models": server.models}
        try:
            evaluate(args, samples, client.predict, identity, server.model_name, info, client.generation,
                     client.stopping.set)
        finally:
            client.close()


if __name__ == "__main__":
    run_main(main)

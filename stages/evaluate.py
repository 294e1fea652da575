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

Several servers: `evaluate.url` a list of URLs (or --vllm-url A,B), or `evaluate.replicas: N` for
the managed server (N `transformers serve` processes on N ports; vLLM: one `vllm serve` with
--data-parallel-size N, its own load balancing). Samples go to the least busy live server; when
one dies, its samples go to the others (stages/lib/evaluation/client.py), and every guarantee
below holds: each sample once, in input order, resume after SIGKILL, failures never scored.

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
import re
import signal
import sys
from collections import Counter
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path

from .lib import params as P
from .lib.cli import UserError, record_runtime, run_main
from .lib.evaluation.engines import ENGINES as OCR_ENGINES, load_engine
from .lib.evaluation import confidence
from .lib.evaluation.client import ChatClient, load_previous, run_samples, sample_key
from .lib.images import ImageError, content_hash, page_count, split_ref
from .lib.io import atomic_write_json, read_split
from .lib.modeling import IMAGE_PARAMS, check_no_custom_code, image_settings, resolve_base_dir
from .lib.prompt import user_turn
from .lib.evaluation.serving import (Server, base_url, check_model_served, check_server_args, image_server_args,
                                     managed_server, pick_engine, served_ids, served_models)

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


# What each kind of run reads from params.yaml (its dvc.yaml `params:`; tests/test_dvc_yaml.py checks).
COMMON_KEYS = ("workers", "save_interval", "timeout", "top_k", "max_failure_rate")
MODEL_KEYS = ("engine", "url", "replicas", "max_retries", "max_tokens", "stop", "retry_backoff", "startup_timeout",
              "server_args")
MODEL_PARAMS = ["instruction", IMAGE_PARAMS, *(f"evaluate.{k}" for k in COMMON_KEYS + MODEL_KEYS)]
ENGINE_PARAMS = [f"evaluate.{k}" for k in COMMON_KEYS]


def engine_of(argv):
    """The --engine of a command line (None: a served model, settings from params.yaml)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--engine")
    return pre.parse_known_args(argv)[0].engine


def declared_params(argv):
    """The params.yaml keys this command reads: a model's, or an OCR engine's own."""
    engine = engine_of(argv)
    return ENGINE_PARAMS + list(load_engine(engine).PARAMS) if engine in OCR_ENGINES else MODEL_PARAMS


def parse_args(argv):
    params = P.load_params(declared_params(argv))
    is_engine = engine_of(argv) in OCR_ENGINES
    get = lambda key, kind, **kw: P.get(params, f"evaluate.{key}", kind, **kw)  # noqa: E731
    def model(read):   # an engine reads no model keys
        return None if is_engine else read()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="models/merged", help="model folder to serve (or models/base)")
    parser.add_argument("--engine", choices=ENGINES, default=model(lambda: get("engine", str, choices=ENGINES)))
    parser.add_argument("--vllm-url", "--url", dest="url", default=model(lambda: get("url", None)),
                        help="a running OpenAI-compatible server instead of serving --model-dir (several: A,B)")
    parser.add_argument("--replicas", type=int, default=model(lambda: get("replicas", int, minimum=1)),
                        help="managed servers to start (vLLM: its --data-parallel-size)")
    parser.add_argument("--model-name", default=None, help="the `model` field (default: the served folder)")
    parser.add_argument("--data-file", default="data/input/ocr_test.json")
    parser.add_argument("--output-file", default="results/finetuned.json")
    parser.add_argument("--top-k", type=top_k_arg, default=get("top_k", int, minimum=1, allow_none=True))
    parser.add_argument("--workers", type=int, default=get("workers", int, minimum=1))
    parser.add_argument("--save-interval", type=int, default=get("save_interval", int, minimum=1))
    parser.add_argument("--timeout", type=float, default=get("timeout", float, minimum=0.001))
    parser.add_argument("--max-failure-rate", type=float,
                        default=get("max_failure_rate", float, minimum=0.0, maximum=1.0))
    parser.add_argument("--max-retries", type=int, default=model(lambda: get("max_retries", int, minimum=0)))
    parser.add_argument("--max-tokens", type=max_tokens_arg, default=model(lambda: get("max_tokens", None)),
                        help="'auto' (from the longest label of the split) or a number")
    parser.add_argument("--startup-timeout", type=float, default=model(lambda: get("startup_timeout", float, minimum=1)))
    parser.add_argument("--instruction", default=model(lambda: P.get(params, "instruction", str)))
    args = P.parse_checked(parser, argv)
    if is_engine:
        args.engine_settings = load_engine(args.engine).settings(params)
    else:
        args.max_tokens = max_tokens_arg(args.max_tokens, "params.yaml: 'evaluate.max_tokens'")
        args.image = image_settings(params)   # the processor settings training used: the servers get them too
        args.stop = get("stop", list)
        if not all(isinstance(s, str) and s for s in args.stop):
            raise UserError(f"params.yaml: 'evaluate.stop' must be a list of non-empty strings, got {args.stop!r}")
        args.url = url_list(args.url)
        if args.replicas < 1:
            raise UserError(f"--replicas must be >= 1, got {args.replicas}")
        args.retry_backoff = get("retry_backoff", float, minimum=0)
        args.server_args = get("server_args", list)
        if not all(isinstance(a, str) for a in args.server_args):
            raise UserError(f"params.yaml: 'evaluate.server_args' must be a list of strings, got {args.server_args!r}")
        check_server_args(args.server_args)
        if args.max_retries < 0:
            raise UserError(f"--max-retries must be >= 0, got {args.max_retries}")
    for name in ("workers", "save_interval"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.timeout <= 0:
        raise UserError(f"--timeout must be > 0, got {args.timeout}")
    if not 0 <= args.max_failure_rate <= 1:
        raise UserError(f"--max-failure-rate must be between 0 and 1, got {args.max_failure_rate}")
    return args


def url_list(value):
    """evaluate.url / --vllm-url: None, one URL, "A,B", or a list of URLs -> None or [base URLs]."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(u, str) for u in value):
        raise UserError(f"params.yaml: 'evaluate.url' must be null, a URL or a list of URLs, got {value!r}")
    urls = [base_url(u) for u in value]
    if len(set(urls)) != len(urls):
        raise UserError(f"evaluate.url: the same server is listed twice in {urls}")
    return urls


def max_tokens_arg(value, where="--max-tokens"):
    """'auto' or a positive number of tokens."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{where} must be 'auto' or a number of tokens >= 1, got {value!r}") from None
    if number < 1 or isinstance(value, bool):
        raise UserError(f"{where} must be 'auto' or a number of tokens >= 1, got {value!r}")
    return number


def read_samples(path, top_k):
    """The split's rows (first top_k) as [{"image_path", "image_sha256", "label"}], every image checked."""
    rows = read_split(path)
    if top_k is not None:
        rows = rows[:top_k]
    if not rows:
        raise UserError(f"{path}: no samples to evaluate")
    for i, row in enumerate(rows):   # a cheap header check (the split stage decoded every image)
        image_file = split_ref(row["image_path"])[0]
        if not image_file.is_file():
            raise UserError(f"{path}: row {i}: image '{image_file}' does not exist")
        try:
            page_count(image_file)
        except ImageError as err:
            raise UserError(f"{path}: row {i}: image {err}") from None
    return [{"image_path": r["image_path"], "image_sha256": r.get("image_sha256") or content_hash(r["image_path"]),
             "label": r["ocr_text"], **({"tags": r["tags"]} if r.get("tags") else {})} for r in rows]


def model_folder(path):
    """--model-dir itself, or the checkpoint models/base's source.json points at."""
    path = Path(path)
    if (path / "source.json").is_file():
        return Path(resolve_base_dir(path))
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a model folder (no config.json); run the stage that writes it "
                        "(`dvc repro merge` for models/merged) or pass --vllm-url")
    check_no_custom_code(path)
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
def model_servers(args, folder):
    """The Servers to talk to: the user's URLs (each checked, untracked) or the ones we start and stop
    on `folder` (evaluate.replicas)."""
    if args.url:
        servers, name = [], args.model_name
        for url in args.url:   # every server must be up and serve the model before any sample
            models = served_models(url, timeout=min(args.timeout, 30))
            ids = served_ids(models)
            name = name or (ids[0] if len(ids) == 1 else None)
            if name is None:
                raise UserError(f"{url} serves {ids or 'no listed model'}: pass --model-name")
            check_model_served(models, name, url)
            servers.append(Server(url=url, model_name=name, engine="external", models=models))
        print(f"warning: evaluating {name} at {', '.join(args.url)}: DVC cannot track what a server serves; "
              "the /v1/models answer is recorded in the output", file=sys.stderr)
        yield servers
        return
    engine = pick_engine(args.engine)
    # vLLM balances over its own data-parallel ranks behind one URL; transformers serve is one model per process.
    extra = list(args.server_args) + image_server_args(engine, args.image)
    if engine == "vllm" and args.replicas > 1 and "--data-parallel-size" not in extra:
        extra += ["--data-parallel-size", str(args.replicas)]
    count = 1 if engine == "vllm" else args.replicas
    print(f"evaluate: starting {count} model server(s) on {folder} (engine {engine}) ...", file=sys.stderr)
    with ExitStack() as stack:
        servers = [stack.enter_context(managed_server(folder, engine, args.startup_timeout, args.model_name, extra))
                   for _ in range(count)]
        for server in servers:
            print(f"evaluate: {server.engine} serve ready at {server.url} (pid {server.pid})", file=sys.stderr)
        yield servers


def evaluate(args, samples, predict, identity, model_name, server_info, generation=None, stopping=None,
             servers=(), confidence_source=None):
    """Run (resuming), write the final document, fail when too many samples failed. `generation`:
    the model's request settings (None for an engine); `servers`: managed Servers (their logs are
    kept and named when samples failed)."""
    fp = fingerprint(identity, generation)
    previous = load_previous(args.output_file, fp)
    if previous is None:
        print(f"evaluate: {args.output_file} is from another model or settings: starting over", file=sys.stderr)
    elif previous:
        print(f"evaluate: resuming from {args.output_file}: {resume_text(previous, samples)}", file=sys.stderr)
    header = {"model_name": model_name, "engine": server_info["engine"], "fingerprint": fp,
              "data_file": str(args.data_file), "server": server_info,
              "top_k": args.top_k}
    if generation is not None:
        header["generation"] = generation
    header["confidence_source"] = confidence_source   # stages/lib/evaluation/confidence.py
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
    truncated = [r for r in records if r.get("finish_reason") == "length"]
    predicted = summary["evaluated_this_run"]
    record_runtime(samples_predicted=predicted, samples_per_second=doc["samples_per_s"],
                   latency_p50_s=doc.get("latency_p50_s"))
    print(f"evaluate: {Path(args.output_file).stem} on {args.data_file}: {len(records)} samples "
          f"({len(records) - predicted} kept, {predicted} predicted this run; {failed} failed, {len(truncated)} "
          f"truncated), {figure_text(doc)}, {doc['samples_per_s']} samples/s -> {args.output_file}")
    log = ""
    logs = [server.log_path for server in servers if server.log_path]
    if failed and logs:
        for server in servers:
            server.keep_log()
        log = f"; the server's log: {', '.join(logs)}"
        print(f"evaluate: {failed} samples failed{log}", file=sys.stderr)
    for line in truncation_warnings(truncated, len(records), generation, getattr(args, "max_tokens_auto", False)):
        print(line, file=sys.stderr)
    if status == "failed":
        common, count = Counter(r["error"] for r in records if "error" in r).most_common(1)[0]
        raise UserError(f"{failed} of {len(records)} samples failed (more than evaluate.max_failure_rate "
                        f"{args.max_failure_rate:g}); most common ({count}x): {common[:200]} "
                        f"(re-run to retry only the failed samples){log}")


def figure_text(doc):
    """The raw figures, said to be raw (normalize-score's normalized ones are those the tables show),
    or why there is no figure (every sample failed)."""
    if doc["overall_cer"] is None:
        return "no figures (no sample succeeded)"
    return (f"raw CER {doc['overall_cer']:.4f}, raw F1 {doc['overall_f1']:.4f} (text as predicted; "
            "normalize-score gives the normalized figures of metrics/score.json)")


def resume_text(previous, samples):
    """What a resumed run keeps and predicts again: earlier records match a sample by its key
    (image path, content hash, label); failed, changed and new samples are predicted again."""
    kept = sum(sample_key(s) in previous for s in samples)
    stale = len(previous) - kept
    text = f"{kept} finished samples kept, {len(samples) - kept} to predict (failed, new or changed)"
    return text + (f"; {stale} earlier results no longer match a sample (image or label changed)" if stale else "")


def repeated_unit(text, min_repeats=3, longest_unit=20):
    """The substring (1..longest_unit characters) that `text` repeats most often in a row, when at
    least min_repeats times (e.g. '票' in '發票票票號碼'), or None."""
    runs = [(len(m.group(0)) // len(m.group(1)), m.group(1))
            for m in re.finditer(rf"(.{{1,{longest_unit}}}?)\1{{{min_repeats - 1},}}", text)]
    return max(runs)[1] if runs else None


def truncation_warnings(truncated, total, generation, auto):
    """One line per kind of answer cut by max_tokens (finish_reason 'length'), with its advice:
    cut before the label's length (the limit is too low), or longer than the label already, a loop
    when it repeats a substring (a higher limit would not help)."""
    limit = (generation or {}).get("max_tokens") or "the server's limit"
    short = [r for r in truncated if len(r["prediction"] or "") < len(r["label"])]
    longer = [r for r in truncated if len(r["prediction"] or "") >= len(r["label"])]
    loops = [(r, unit) for r in longer for unit in [repeated_unit(r["prediction"])] if unit]
    lines = []
    if short:
        r = short[0]
        advice = ("'auto' sized it from the split's labels: set evaluate.max_tokens to a larger number"
                  if auto else "raise evaluate.max_tokens or set it to 'auto'")
        if (generation or {}).get("max_tokens") is None:   # nothing was sent: the server's own limit cut it
            advice = "the server's context limit cut it: serve the model with a longer context"
        lines.append(f"warning: {len(short)} of {total} predictions were cut by max_tokens {limit} before the label's "
                     f"length (e.g. {r['image_path']}: label {len(r['label'])} characters, prediction "
                     f"{len(r['prediction'] or '')}): {advice}")
    if loops:
        r, unit = loops[0]
        lines.append(f"warning: {len(loops)} of {total} predictions looped into max_tokens {limit} (a repeated "
                     f"substring, e.g. {unit!r} in {r['image_path']}): a higher limit would not help; the model "
                     "needs more training on lines like these")
    if len(longer) > len(loops):
        lines.append(f"warning: {len(longer) - len(loops)} of {total} predictions ran past the label's length into "
                     f"max_tokens {limit} without repeating itself: a higher limit would not help")
    return lines


def auto_max_tokens(folder, samples, instruction):
    """evaluate.max_tokens 'auto': the longest tokenized label of the data, with a margin, capped by the
    model's context (stages/lib/modeling.generation_budget, the rule training's validation uses)."""
    if folder is None:   # an external server (the seed's command): no tokenizer here to measure labels with
        print("evaluate: max_tokens auto with --vllm-url: none sent, the server's limit applies (the model's "
              "context); answers it cuts are counted as truncated (finish_reason 'length')", file=sys.stderr)
        return None
    from transformers import AutoTokenizer

    from .lib.modeling import generation_budget

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as error:   # a folder without tokenizer files
        raise UserError(f"{folder}: no tokenizer to measure the labels with for evaluate.max_tokens 'auto' "
                        f"({type(error).__name__}); set evaluate.max_tokens to a number") from None
    budget, info = generation_budget(tokenizer, [s["label"] for s in samples], folder, instruction)
    print(f"evaluate: max_tokens auto = {budget} (longest label {info['longest_label_tokens']} tokens; "
          f"model context {info['context']})", file=sys.stderr)
    return budget


def main(argv=None):
    args = parse_args(argv)
    samples = read_samples(args.data_file, args.top_k)
    # SIGTERM (dvc, CI, kill) unwinds like Ctrl-C: progress saved, server stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.engine in OCR_ENGINES:
        engine = load_engine(args.engine)
        info = engine.identity(args.engine_settings)
        predict = engine.predictor(args.engine_settings, args.timeout)
        name = " ".join([args.engine, *(f"{k}={v}" for k, v in args.engine_settings.items())])
        evaluate(args, samples, predict, info, name, info, confidence_source=getattr(engine, "CONFIDENCE", None))
        return
    folder = None if args.url else model_folder(args.model_dir)
    if folder is not None:   # the served model's family takes its own settings of params `image:`
        from .lib.families import FAMILIES, family_image_settings, model_type

        family = FAMILIES.get(model_type(folder))
        if family is None and args.image:
            print(f"note: {folder} is not of a known model family (model_type {model_type(folder)!r}): served with "
                  "its own image settings, params `image:` not sent", file=sys.stderr)
        args.image = family_image_settings(family, args.image) if family else {}
    args.max_tokens_auto = args.max_tokens == "auto"   # the truncation warning's advice depends on it
    if args.max_tokens_auto:
        args.max_tokens = auto_max_tokens(folder, samples, args.instruction)
    with model_servers(args, folder) as servers:
        server, urls = servers[0], [s.url for s in servers]
        logprobs = server.engine == "vllm" or confidence.serves_logprobs(server.models)
        client = ChatClient(urls, server.model_name, args.instruction, max_tokens=args.max_tokens,
                            stop=args.stop if server.accepts_stop else [], timeout=args.timeout, max_retries=args.max_retries,
                            backoff_s=args.retry_backoff, logprobs=logprobs)
        if server.engine == "external":
            identity = {"url" if len(urls) == 1 else "urls": urls[0] if len(urls) == 1 else sorted(urls),
                        "model": server.model_name, "served": served_ids(server.models)}
        else:
            identity = {"engine": server.engine, "folder": str(Path(args.model_dir)), "server_args": args.server_args,
                        "image": args.image, "files": folder_identity(folder)}
        info = {"engine": server.engine, "url": server.url, "urls": urls, "managed": server.engine != "external",
                "models": server.models}
        # The managed transformers server gives no log-probabilities: the served folder scores the
        # predictions afterwards (teacher_forced); an external server without them gives none.
        teacher = server.engine == "transformers" and not logprobs
        source = confidence.SERVER_LOGPROBS if logprobs else confidence.TEACHER_FORCED if teacher else None
        try:
            evaluate(args, samples, client.predict, identity, server.model_name, info, client.generation,
                     client.stopping.set, servers=servers if server.engine != "external" else (),
                     confidence_source=source)
        finally:
            client.close()
    if teacher:
        confidence.add_teacher_forced(args.output_file, folder, args.instruction)


if __name__ == "__main__":
    run_main(main)

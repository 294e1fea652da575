"""The evaluation client: OpenAI chat-completions requests that lose nothing.

ChatClient.predict(sample) sends one image with the shared prompt (stages/lib/prompt.py
chat_messages: the same turn training uses) at temperature 0 with max_tokens and stop strings,
through one pooled requests.Session per worker thread. Connection errors, timeouts, 5xx answers
and malformed replies are retried with exponential backoff; other 4xx answers are not (the same
request would fail again). A sample that still fails raises SampleError, which the runner
records as an `error` field, never as an empty prediction.

Several servers (`evaluate.url` a list, or `evaluate.replicas`): every request goes to the least
busy live endpoint; one that fails a request (refused, timed out, 5xx) rests for a while (1 s,
doubling up to 30 s) and the sample goes at once to another, so a dead server's samples are
taken by the others. Each record names the endpoint that answered it.

run_samples() drives any predict function (chat or Tesseract) over a thread pool and keeps the
output file safe: progress is written atomically every save_interval finished samples (status
"partial"), in input order; load_previous() reads such a file back so that a re-run skips the
samples already done and redoes only the missing and the failed ones.
"""
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import requests
from tqdm import tqdm

from .. import metrics
from ..images import ImageError
from ..io import atomic_write_json
from ..prompt import chat_messages


class SampleError(Exception):
    """A sample that could not be evaluated; the message becomes its `error` field."""

    def __init__(self, message, attempts=1):
        super().__init__(message)
        self.attempts = attempts


class Endpoints:
    """The servers one client spreads its requests over (thread-safe)."""

    REST_S, MAX_REST_S = 1.0, 30.0

    def __init__(self, urls):
        self.urls = list(urls)
        self.busy = [0] * len(self.urls)          # requests in flight
        self.failures = [0] * len(self.urls)      # consecutive failed requests
        self.resting_until = [0.0] * len(self.urls)
        self._lock = threading.Lock()

    def _live(self, now):
        return [i for i in range(len(self.urls)) if self.resting_until[i] <= now]

    def others_live(self, index):
        """Is there a live endpoint other than `index`? (then a retry needs no backoff)"""
        with self._lock:
            return any(i != index for i in self._live(time.monotonic()))

    def acquire(self, avoid=None):
        """The least busy live endpoint, not `avoid` when another is live; when all rest, the one
        that rests the shortest. Its in-flight count goes up until release()."""
        with self._lock:
            now = time.monotonic()
            live = self._live(now)
            choices = [i for i in live if i != avoid] or live
            if choices:
                index = min(choices, key=lambda i: (self.busy[i], i))
            else:
                index = min(range(len(self.urls)), key=lambda i: self.resting_until[i])
            self.busy[index] += 1
            return index

    def release(self, index, alive):
        with self._lock:
            self.busy[index] -= 1
            if alive:
                self.failures[index], self.resting_until[index] = 0, 0.0
            else:
                self.failures[index] += 1
                rest = min(self.MAX_REST_S, self.REST_S * 2 ** (self.failures[index] - 1))
                self.resting_until[index] = time.monotonic() + rest


class ChatClient:
    def __init__(self, url, model_name, instruction, *, max_tokens, stop=None, timeout=60.0,
                 max_retries=3, backoff_s=0.5, max_backoff_s=10.0):
        urls = [url] if isinstance(url, str) else list(url)
        self.endpoints = Endpoints(f"{u}/v1/chat/completions" for u in urls)
        self.model_name = model_name
        self.instruction = instruction
        self.max_tokens = max_tokens
        self.stop = list(stop or [])
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.stopping = threading.Event()   # set on Ctrl-C: no more retries
        self._local = threading.local()
        self._sessions = []
        self._sessions_lock = threading.Lock()

    def _session(self):
        """One connection-pooled session per worker thread (Session is not thread-safe)."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers["Content-Type"] = "application/json"
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def close(self):
        with self._sessions_lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    @property
    def generation(self):
        """The settings every request carries (recorded in the output and in its fingerprint)."""
        return {"instruction": self.instruction, "temperature": 0, "max_tokens": self.max_tokens, "stop": self.stop}

    def payload(self, image_path):
        body = {"model": self.model_name, "messages": chat_messages(image_path, self.instruction),
                "temperature": self.generation["temperature"]}
        if self.max_tokens is not None:   # None: the server's own limit (an external server, no tokenizer here)
            body["max_tokens"] = self.max_tokens
        if self.stop:
            body["stop"] = self.stop
        return body

    def body(self, image_path):
        """The request body as sent: payload() as UTF-8 JSON."""
        return json.dumps(self.payload(image_path), ensure_ascii=False).encode("utf-8")

    def _backoff(self, attempt):
        """Exponential backoff with jitter (so that workers do not retry in lock-step)."""
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        if self.stopping.wait(delay):
            raise SampleError("interrupted", attempt)

    def predict(self, sample):
        """One sample -> {"prediction", "completion_tokens", ...}; SampleError when it cannot."""
        try:
            body = self.body(sample["image_path"])
        except (OSError, ImageError) as err:
            raise SampleError(f"image unreadable: {err}") from None
        session = self._session()
        problem = "no attempt made"
        # max_retries counts retries on one server; moving to another live one is free (once per other).
        attempts = self.max_retries + len(self.endpoints.urls)
        last, waits = None, 0
        for attempt in range(attempts):
            if attempt and not self.endpoints.others_live(last):
                waits += 1
                if waits > self.max_retries:
                    break
                self._backoff(waits)
            last = self.endpoints.acquire(avoid=last)
            alive = False
            try:
                outcome, problem, alive = self._post(session, self.endpoints.urls[last], body, attempt)
            except SampleError:
                alive = True   # a 4xx answer: the server is up, the request is at fault
                raise
            finally:
                self.endpoints.release(last, alive)
            if outcome is not None:
                return outcome
        raise SampleError(f"{problem} (after {attempt + 1} attempts)", attempt + 1)

    def _post(self, session, endpoint, body, attempt):
        """One request: (outcome or None, problem, whether the server answered sanely)."""
        start = time.perf_counter()
        try:
            response = session.post(endpoint, data=body, timeout=(min(10.0, self.timeout), self.timeout))
        except requests.Timeout:
            return None, f"timed out after {self.timeout:g} s", False
        except requests.RequestException as err:  # refused, reset, dropped mid-reply
            return None, f"connection failed: {type(err).__name__}", False
        latency = time.perf_counter() - start
        if response.status_code >= 500:
            return None, f"HTTP {response.status_code}: {response.text[:200].strip()}", False
        if response.status_code != 200:   # the same request would fail again, on any server
            raise SampleError(f"HTTP {response.status_code}: {response.text[:300].strip()}", attempt + 1)
        try:
            reply = response.json()
            choice = reply["choices"][0]
            content = choice["message"]["content"]
            if not isinstance(content, str):
                raise TypeError("content is not a string")
        except (ValueError, KeyError, IndexError, TypeError) as err:
            return None, f"malformed reply ({type(err).__name__}): {response.text[:120].strip()}", False
        usage = reply.get("usage") or {}
        outcome = {"prediction": content, "completion_tokens": usage.get("completion_tokens"),
                   "prompt_tokens": usage.get("prompt_tokens"), "finish_reason": choice.get("finish_reason"),
                   "latency_s": round(latency, 4), "attempts": attempt + 1}
        if len(self.endpoints.urls) > 1:
            outcome["endpoint"] = endpoint.removesuffix("/v1/chat/completions")
        return outcome, None, True


def sample_key(sample):
    """What a finished record must match to be reused: the image (path and content hash) and the label.
    A changed image (same path, new pixels) has a new hash, so it is predicted again."""
    return f"{sample.get('image_path')}\x00{sample.get('image_sha256')}\x00{sample.get('label')}"


SCORED_FIELDS = {"image_path", "image_sha256", "label", "prediction", "cer_score", "f1_score", "error"}


def score_record(sample, outcome):
    """The per-sample record of the output file, with RAW (unnormalized) CER/F1.

    `outcome` is a fresh predict() result or a record reused from an earlier run: scores are
    always recomputed, so a change in the metrics code reaches resumed samples too."""
    record = {"image_path": sample["image_path"], "image_sha256": sample.get("image_sha256"), "label": sample["label"]}
    if "error" in outcome:
        record.update(prediction=None, cer_score=None, f1_score=None, error=outcome["error"],
                      attempts=outcome.get("attempts"))
        return record
    prediction = outcome["prediction"]
    record.update(prediction=prediction, cer_score=metrics.cer(sample["label"], prediction),
                  f1_score=metrics.f1(sample["label"], prediction))
    record.update({k: v for k, v in outcome.items() if k not in SCORED_FIELDS})
    return record


def load_previous(path, fingerprint):
    """Finished (error-free) records of an earlier run with the same fingerprint, by sample key.

    A file from another model, prompt or settings is not reused (returns None so the caller can
    say so); a file that cannot be read is treated as absent."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or not isinstance(doc.get("samples"), list):
        return {}
    if doc.get("fingerprint") != fingerprint:
        return None
    done = {}
    for record in doc["samples"]:
        if isinstance(record, dict) and "error" not in record and isinstance(record.get("prediction"), str):
            done[sample_key(record)] = record
    return done


def summarize(records, wall_s, new_count, new_tokens):
    """Overall RAW figures over the successful samples, and this run's speed figures."""
    ok = [r for r in records if "error" not in r]
    latencies = [r["latency_s"] for r in ok if isinstance(r.get("latency_s"), (int, float))]
    return {
        "overall_cer": metrics.corpus_cer([r["label"] for r in ok], [r["prediction"] for r in ok]) if ok else None,
        "overall_f1": (sum(r["f1_score"] for r in ok) / len(ok)) if ok else None,
        "total_samples": len(records),
        "failed_count": len(records) - len(ok),
        "samples_per_s": round(new_count / wall_s, 3) if wall_s > 0 else None,
        "tokens_per_s": round(new_tokens / wall_s, 2) if wall_s > 0 and new_tokens else None,
        "latency_p50_s": round(metrics.percentile(latencies, 0.50), 4) if latencies else None,
        "latency_p95_s": round(metrics.percentile(latencies, 0.95), 4) if latencies else None,
        "evaluated_this_run": new_count,
        "wall_s": round(wall_s, 3),
    }


def _run_one(predict, sample):
    """predict() with every failure turned into an outcome: a worker never loses a sample."""
    start = time.perf_counter()
    try:
        outcome = predict(sample)
    except SampleError as err:
        return {"error": str(err), "attempts": err.attempts}
    except Exception as err:  # an unexpected bug still ends the sample, as an error
        return {"error": f"{type(err).__name__}: {err}"}
    outcome.setdefault("latency_s", round(time.perf_counter() - start, 4))
    return outcome


def run_samples(samples, predict, *, workers, output_path, header, save_interval, previous=None,
                desc="evaluate", on_interrupt=None):
    """Evaluate `samples` ([{"image_path", "label"}]) with `predict` on `workers` threads.

    Finished records in `previous` (from load_previous) are reused. Progress is saved to
    output_path every save_interval finished samples and on Ctrl-C; returns (records in input
    order, summary). The caller writes the final document (it decides the final status)."""
    previous = previous or {}
    records = [previous.get(sample_key(s)) for s in samples]
    records = [None if r is None else score_record(s, r) for s, r in zip(samples, records)]
    pending = [i for i, r in enumerate(records) if r is None]
    new_tokens = 0
    start = time.perf_counter()

    def save(status):
        done = [r for r in records if r is not None]
        atomic_write_json(output_path, {**header, "status": status, "samples": done})

    if pending:
        bar = tqdm(total=len(pending), desc=desc, unit="sample", dynamic_ncols=True, mininterval=0.5)
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="eval")
        failed = since_save = 0
        try:
            futures = {pool.submit(_run_one, predict, samples[i]): i for i in pending}
            for future in as_completed(futures):
                i = futures[future]
                records[i] = score_record(samples[i], future.result())
                failed += "error" in records[i]
                new_tokens += records[i].get("completion_tokens") or 0
                since_save += 1
                if since_save >= save_interval:
                    save("partial")
                    since_save = 0
                elapsed = time.perf_counter() - start
                speed = f"tok/s={new_tokens / elapsed:.1f} " if new_tokens else ""
                bar.set_postfix_str(f"{speed}failed={failed}", refresh=False)
                bar.update(1)
        except BaseException:
            if on_interrupt is not None:
                on_interrupt()           # stop retries first so the pool drains quickly
            pool.shutdown(wait=False, cancel_futures=True)
            save("partial")              # whatever finished is kept for the next run
            raise
        finally:
            bar.close()
        pool.shutdown(wait=True)
    summary = summarize(records, time.perf_counter() - start, len(pending), new_tokens)
    return records, summary

"""Evaluation client speed against a local OpenAI-compatible stub with a fixed reply delay.

    python -m bench.bench_client [--delay-ms 50] [--requests 48] [--workers 8] [--repeats 2]

The stub (a ThreadingHTTPServer in its own process, so its CPU is not billed to the client)
answers every chat completion after exactly --delay-ms. The client is the stage's own
(stages/lib/evaluation/client.py ChatClient + run_samples: base64 + JSON per request, one session per
thread, scoring, progress bar, atomic saves every 50 samples) on a rendered 128x128 PNG.
Also: two stubs that answer one request at a time (as one transformers serve process does), 1
endpoint vs 2 with the same 4 workers (evaluate.url as a list, or evaluate.replicas).
Prints, best of --repeats:
  rate with 1 worker and with --workers, and their ratio (target >= 7x for 8 workers);
  the client's own time per request: its process CPU time / requests, end-to-end wall time
  per request at 1 worker minus the stub's delay, and the pieces measured alone (building the
  payload: base64 + JSON; bookkeeping: scoring, ordering, progress and saves per sample).
"""
import argparse
import random
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from stages.lib.evaluation.client import ChatClient, run_samples
from stages.lib.prompt import DEFAULT_INSTRUCTION
from stages.lib.synthetic import random_line, render_line

STUB = textwrap.dedent("""
    import json, sys, threading, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    DELAY = float(sys.argv[1])
    SERIAL = sys.argv[2:] == ["serial"]   # one request at a time, like one transformers serve process
    ONE_AT_A_TIME = threading.Lock()
    REPLY = json.dumps({"id": "b", "object": "chat.completion", "model": "bench",
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": "台北市信義區信義路5段7號"}}],
                        "usage": {"prompt_tokens": 60, "completion_tokens": 13, "total_tokens": 73}}).encode()
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True   # else headers and body in two writes meet delayed ACK: +40 ms
        def log_message(self, *a): pass
        def reply(self, body):
            self.send_response(200); self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
        def do_GET(self): self.reply(b'{"status": "ok"}')
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            if SERIAL:
                with ONE_AT_A_TIME:
                    time.sleep(DELAY)
            else:
                time.sleep(DELAY)
            self.reply(REPLY)
    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    server.daemon_threads = True
    server.request_queue_size = 64
    print(server.server_address[1], flush=True)
    server.serve_forever()
""")


def start_stub(delay_s, serial=False):
    proc = subprocess.Popen([sys.executable, "-c", STUB, str(delay_s), *(["serial"] if serial else [])],
                            stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}"


def make_samples(folder, n):
    rng = random.Random(0)
    image = Path(folder) / "line.png"
    render_line(random_line(rng), "NotoSerifCJK-Regular.ttc:Noto Serif CJK TC", 24, 128, rng).save(image)
    return [{"image_path": str(image), "label": random_line(rng)} for _ in range(n)]


def endpoints_ratio(samples, delay, workers, out, repeats):
    """Servers that answer one request at a time (fixed delay): 2 endpoints vs 1, same client workers."""
    stubs = [start_stub(delay, serial=True) for _ in range(2)]
    try:
        urls = [url for _, url in stubs]
        timed_run(urls, samples[:workers], workers, out)   # warm-up
        one = two = (0.0, 0.0, 0.0)
        for _ in range(repeats):
            one = max(one, timed_run(urls[:1], samples, workers, out))
            two = max(two, timed_run(urls, samples, workers, out))
    finally:
        for proc, _ in stubs:
            proc.terminate()
            proc.wait()
    return one[0], two[0]


def timed_run(url, samples, workers, out):
    client = ChatClient(url, "bench", DEFAULT_INSTRUCTION, max_tokens=64, stop=["<end_of_turn>"], timeout=30,
                        max_retries=0)
    cpu, wall = time.process_time(), time.perf_counter()
    records, summary = run_samples(samples, client.predict, workers=workers, output_path=out,
                                   header={"fingerprint": "bench"}, save_interval=50, desc=f"{workers} worker(s)")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    client.close()
    if summary["failed_count"]:
        raise SystemExit(f"bench_client: {summary['failed_count']} requests failed: {records[0].get('error')}")
    return len(samples) / wall, wall, cpu


def piece_costs(samples, out, n=200):
    """The client's work without any network: payload building, and the runner's bookkeeping."""
    client = ChatClient("http://127.0.0.1:9", "bench", DEFAULT_INSTRUCTION, max_tokens=64, stop=["<end_of_turn>"])
    start = time.perf_counter()
    for sample in samples[:1] * n:
        client.body(sample["image_path"])
    encode = (time.perf_counter() - start) / n
    many = samples[:1] * n
    many = [{"image_path": s["image_path"], "label": f"{s['label']}{i}"} for i, s in enumerate(many)]
    reply = {"prediction": "台北市信義區信義路5段7號", "completion_tokens": 13, "latency_s": 0.05}
    start = time.perf_counter()
    run_samples(many, lambda s: dict(reply), workers=1, output_path=out, header={}, save_interval=50, desc="bookkeeping")
    bookkeeping = (time.perf_counter() - start) / n
    return encode, bookkeeping


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--requests", type=int, default=48, help="requests per worker-count run at 1 worker")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    delay = args.delay_ms / 1000
    proc, url = start_stub(delay)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            samples = make_samples(tmp, args.requests * args.workers)
            out = Path(tmp) / "out.json"
            timed_run(url, samples[:args.workers], args.workers, out)   # warm-up: connections, imports
            best_1 = best_n = (0.0, 0.0, 0.0)
            for _ in range(args.repeats):   # interleaved so that a busy moment hits both alike
                best_1 = max(best_1, timed_run(url, samples[:args.requests], 1, out))
                best_n = max(best_n, timed_run(url, samples, args.workers, out))
            encode, bookkeeping = piece_costs(samples, out)
            one, two = endpoints_ratio(samples[:args.requests * 2], delay, 4, out, args.repeats)
    finally:
        proc.terminate()
        proc.wait()
    ratio = best_n[0] / best_1[0]
    n1, nn = args.requests, len(samples)
    print(f"bench_client: stub reply delay {args.delay_ms:g} ms, best of {args.repeats}: "
          f"1 worker {best_1[0]:.1f} req/s ({n1} requests), {args.workers} workers {best_n[0]:.1f} req/s "
          f"({nn} requests); ratio {ratio:.2f}x (target >= 7: {'met' if ratio >= 7 else 'MISSED'})")
    print(f"bench_client: client's own time per request: CPU {best_1[2] / n1 * 1000:.2f} ms at 1 worker, "
          f"{best_n[2] / nn * 1000:.2f} ms at {args.workers}; wall overhead at 1 worker "
          f"{(best_1[1] / n1 - delay) * 1000:.2f} ms (request round trip beyond the delay); "
          f"alone: payload (base64 + JSON) {encode * 1000:.3f} ms, bookkeeping {bookkeeping * 1000:.3f} ms")
    print(f"bench_client: servers answering one request at a time ({args.delay_ms:g} ms), 4 workers: 1 endpoint "
          f"{one:.1f} req/s, 2 endpoints {two:.1f} req/s; ratio {two / one:.2f}x (target ~2: each server is the "
          "bottleneck)")
    return 0 if ratio >= 7 else 1


if __name__ == "__main__":
    sys.exit(main())

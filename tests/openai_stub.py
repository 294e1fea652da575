"""A fault-injecting OpenAI-compatible server (stdlib http.server) for the evaluate tests.

It answers each image with its label (so a reply that lands on the wrong sample shows up as a
wrong prediction) and injects, per label, a scripted list of faults for successive attempts:
"500", "400", "drop" (close the connection without a reply), "malformed" (200 with broken JSON),
"slow" (reply after `slow_s`, past the client's timeout), "length" (finish_reason length). Faults a real server cannot be made
to produce on demand; everything else is tested against a real `transformers serve`.
"""
import json
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "stub-model"


class Stub:
    def __init__(self, answers, faults=None, delay_s=0.0, slow_s=2.0, model=MODEL, port=0,
                 log_path=None):
        self.answers = dict(answers)          # data URL -> text to answer
        self.faults = {k: list(v) for k, v in (faults or {}).items()}   # text -> faults per attempt
        self.delay_s = delay_s
        self.slow_s = slow_s
        self.model = model
        self.requests = Counter()             # text -> number of chat requests seen
        self.payloads = []
        self.lock = threading.Lock()
        self.log_path = log_path              # a JSON line per chat request (for a stub in another process)
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True   # headers and body go in two writes: avoid delayed-ACK stalls

            def log_message(self, *args):
                pass

            def _send(self, code, body, content_type="application/json"):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/health":
                    self._send(200, {"status": "ok"})
                elif self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": stub.model, "object": "model"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if payload.get("model") != stub.model:
                    return self._send(404, {"error": {"message": f"The model `{payload.get('model')}` does not exist."}})
                url = payload["messages"][0]["content"][0]["image_url"]["url"]
                text = stub.answers.get(url)
                if text is None:
                    return self._send(400, {"error": {"message": "unknown image"}})
                with stub.lock:
                    attempt = stub.requests[text]
                    stub.requests[text] += 1
                    stub.payloads.append(payload)
                    if stub.log_path:
                        with open(stub.log_path, "a", encoding="utf-8") as log:
                            log.write(json.dumps({k: v for k, v in payload.items() if k != "messages"}) + "\n")
                    plan = stub.faults.get(text, [])
                    fault = plan[attempt] if attempt < len(plan) else "ok"
                if stub.delay_s:
                    time.sleep(stub.delay_s)
                if fault == "500":
                    return self._send(500, b"Internal Server Error", "text/plain")
                if fault == "400":
                    return self._send(400, {"error": {"message": "bad request"}})
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "malformed":
                    return self._send(200, b'{"choices": [{"message": ', "application/json")
                if fault == "slow":
                    time.sleep(stub.slow_s)
                try:   # "length": the answer the server's own limit cut (the model's context when no max_tokens)
                    self._send(200, {"id": "x", "object": "chat.completion", "model": stub.model,
                                     "choices": [{"index": 0, "finish_reason": "length" if fault == "length" else "stop",
                                                  "message": {"role": "assistant", "content": text}}],
                                     "usage": {"prompt_tokens": 10, "completion_tokens": max(1, len(text)),
                                               "total_tokens": 10 + len(text)}})
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (slow reply): that is the point

        return Handler


def answers_for(rows):
    """data URL of each row's image -> its label, as the client will send it."""
    from stages.lib.prompt import image_data_url

    return {image_data_url(r["image_path"]): r["ocr_text"] for r in rows}


def fake_vllm_main(argv):
    """`vllm serve DIR --host H --port P --served-model-name N ...` played by the stub (no GPU here):
    answers from the JSON file $FAKE_VLLM_ANSWERS, requests logged to $FAKE_VLLM_LOG."""
    import os

    port = int(argv[argv.index("--port") + 1])
    name = argv[argv.index("--served-model-name") + 1]
    with open(os.environ["FAKE_VLLM_ANSWERS"], encoding="utf-8") as f:
        answers = json.load(f)
    with Stub(answers, model=name, port=port, log_path=os.environ["FAKE_VLLM_LOG"]):
        while True:
            time.sleep(3600)

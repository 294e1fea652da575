"""Confidence sources (stages/lib/evaluation/confidence.py) on the shapes the peers return."""
import pytest

from stages.lib.evaluation import confidence as C
from stages.lib.evaluation.client import ChatClient

# A vLLM chat-completions choice with `logprobs: true` (OpenAI's shape).
VLLM_CHOICE = {"index": 0, "message": {"role": "assistant", "content": "臺北"}, "finish_reason": "stop",
               "logprobs": {"content": [{"token": "臺", "logprob": -0.1, "bytes": [232], "top_logprobs": []},
                                        {"token": "北", "logprob": -0.3, "bytes": [229], "top_logprobs": []}]}}


def test_server_logprobs_mean_and_when_to_ask(tiny_rows):
    assert C.mean_logprob(VLLM_CHOICE) == pytest.approx(-0.2)
    assert C.mean_logprob({"message": {"content": "x"}}) is None and C.mean_logprob({"logprobs": None}) is None
    assert C.serves_logprobs({"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "vllm"}]})
    assert not C.serves_logprobs({"data": [{"id": "m", "owned_by": "huggingface"}]}) and not C.serves_logprobs(None)
    image = tiny_rows[0]["image_path"]
    assert ChatClient("http://127.0.0.1:1", "m", "read", max_tokens=8, logprobs=True).payload(image)["logprobs"] is True
    assert "logprobs" not in ChatClient("http://127.0.0.1:1", "m", "read", max_tokens=8).payload(image)


def test_engine_scores():
    assert C.weighted_score(["臺北市", "1"], [0.9, 0.5]) == pytest.approx((3 * 0.9 + 0.5) / 4)
    assert C.weighted_score([], []) is None and C.weighted_score(["  "], [0.9]) is None
    tsv = ("level\tpage_num\tblock_num\tpar_num\tline_num\tword_num\tleft\ttop\twidth\theight\tconf\ttext\n"
           "1\t1\t0\t0\t0\t0\t0\t0\t100\t30\t-1\t\n"
           "5\t1\t1\t1\t1\t1\t0\t0\t40\t30\t91.5\t統一\n"
           "5\t1\t1\t1\t1\t2\t40\t0\t40\t30\t70.5\t編號\n")
    assert C.tesseract_confidence(tsv) == pytest.approx(0.81)
    assert C.tesseract_confidence("") is None

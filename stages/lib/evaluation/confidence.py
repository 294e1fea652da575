"""Per-sample confidence of a prediction (higher = surer), from the best source a run has.

The evaluation output records each sample's `confidence` (null where none could be had) and the
document's `confidence_source`, one of:
    server_logprobs   the mean log-probability of the completion's tokens as the server returned
                      them (`logprobs: true`, asked only of servers that support it: vLLM, told
                      by its /v1/models `owned_by: vllm`); <= 0.
    teacher_forced    the same figure computed after the run for the managed `transformers serve`
                      (5.24 refuses `logprobs` for chat completions): the served model folder reads
                      the same prompt and image followed by the prediction and its end-of-turn
                      token, in one forward pass, and the mean log-probability of those tokens is
                      taken (the text is tokenized again, so its tokens may differ from the ones
                      generated; with the end-of-turn token, an empty prediction still gets a
                      figure: how sure the model was that there is nothing to read); <= 0.
    paddleocr_scores  RapidOCR's recognition score of each text box, averaged weighted by the
                      box's text length; 0..1; null when no box was found.
    tesseract_words   the mean of Tesseract's word confidences (its TSV `conf`, 0..100, words
                      with conf >= 0) / 100; null when no word was found.
The figures of different sources are not on one scale: compare samples within one run only (the
score stage's deciles and review list do).
"""
import sys

from ..io import atomic_write_json, read_json
from .client import mean_logprob  # noqa: F401 - server_logprobs: computed where the reply is read

SERVER_LOGPROBS, TEACHER_FORCED = "server_logprobs", "teacher_forced"
PADDLEOCR_SCORES, TESSERACT_WORDS = "paddleocr_scores", "tesseract_words"


def serves_logprobs(models):
    """Whether the server behind a /v1/models answer ({"data": [...]}) returns token log-probabilities (vLLM)."""
    data = models.get("data") if isinstance(models, dict) else None
    return isinstance(data, list) and any(isinstance(m, dict) and m.get("owned_by") == "vllm" for m in data)


def weighted_score(texts, scores):
    """paddleocr_scores of one page's boxes."""
    pairs = [(len((t or "").strip()), s) for t, s in zip(texts or [], scores or [])
             if isinstance(s, (int, float)) and (t or "").strip()]
    total = sum(n for n, _ in pairs)
    return sum(n * s for n, s in pairs) / total if total else None


def tesseract_confidence(tsv):
    """tesseract_words of one page's TSV output."""
    lines = tsv.splitlines()
    if not lines:
        return None
    header = lines[0].split("\t")
    if "conf" not in header or "text" not in header:
        return None
    conf_at, text_at = header.index("conf"), header.index("text")
    values = []
    for line in lines[1:]:
        cells = line.split("\t")
        if len(cells) > max(conf_at, text_at) and cells[text_at].strip():
            try:
                value = float(cells[conf_at])
            except ValueError:
                continue
            if value >= 0:
                values.append(value / 100)
    return sum(values) / len(values) if values else None


def teacher_forced_scores(folder, records, instruction):
    """{index: teacher_forced confidence} of the records with a prediction and no confidence."""
    import torch

    from ..images import load_image
    from ..modeling import load_model, load_processor
    from ..prompt import generation_prompt

    todo = [i for i, r in enumerate(records) if isinstance(r.get("prediction"), str) and r.get("confidence") is None]
    if not todo:
        return {}
    processor = load_processor(folder)
    model = load_model(folder).eval()
    prompt = generation_prompt(processor, instruction)
    end = "<end_of_turn>" if "<end_of_turn>" in processor.tokenizer.get_vocab() else (processor.tokenizer.eos_token or "")
    out = {}
    with torch.inference_mode():
        for i in todo:
            image = load_image(records[i]["image_path"])
            head = processor(text=[prompt], images=[image], add_special_tokens=False, return_tensors="pt")
            full = processor(text=[prompt + records[i]["prediction"] + end], images=[image], add_special_tokens=False,
                             return_tensors="pt")
            start, ids = head["input_ids"].shape[1], full["input_ids"][0]
            if len(ids) <= start or not torch.equal(ids[:start], head["input_ids"][0]):
                continue   # the answer's tokens do not follow the prompt's: no figure rather than a wrong one
            logits = model(**full.to(model.device)).logits[0, start - 1:-1].float()
            picked = torch.log_softmax(logits, dim=-1).gather(1, ids[start:].to(logits.device)[:, None])
            out[i] = float(picked.mean())
    return out


def add_teacher_forced(output_file, folder, instruction):
    """Fill in the teacher_forced confidences of an evaluation output, in place (atomically)."""
    doc = read_json(output_file)
    scores = teacher_forced_scores(folder, doc["samples"], instruction)
    for i, value in scores.items():
        doc["samples"][i]["confidence"] = round(value, 6)
    doc["confidence_source"] = TEACHER_FORCED
    atomic_write_json(output_file, doc)
    print(f"evaluate: confidence ({TEACHER_FORCED}) of {len(scores)} samples -> {output_file}", file=sys.stderr)

"""What the tiny test models of every family share: a character-level tokenizer (one token per
character, byte fallback, the family's special tokens first) and the family's chat template (TRL
ships the checkpoints' templates). Each family saves its processor through its own Processor class
(Gemma 4's and Qwen3-VL's hold a video processor built on torchvision, which the CPU set installs).
"""
import json
from pathlib import Path

# Characters the chat templates and processors themselves write (others fall back to bytes).
TEMPLATE_CHARS = "\n abcdefghijklmnopqrstuvwxyz"


def chat_template(name):
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / name).read_text(encoding="utf-8")


def char_tokenizer(alphabet, specials, template, merges=(), **kwargs):
    """A fast tokenizer: `specials` (ids 0..), 256 byte tokens, one token per character, then the
    tokens of `merges` ((left, right) pairs, e.g. Gemma's newline runs)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in sorted(set(alphabet) | set(TEMPLATE_CHARS)):
        vocab.setdefault(ch, len(vocab))
    for left, right in merges:
        vocab[left + right] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), unk_token=kwargs.get("unk_token"),
                                byte_fallback=True))
    core.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    core.add_special_tokens(list(specials))
    return PreTrainedTokenizerFast(tokenizer_object=core, padding_side="right", chat_template=template, **kwargs)


def settings_of(sub_processor):
    """What save_pretrained writes for an image processor or feature extractor (its to_json_string)."""
    return {k: v for k, v in json.loads(sub_processor.to_json_string()).items() if not k.startswith("_")}

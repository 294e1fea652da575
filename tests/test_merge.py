"""merge stage: parity on the tiny model (language and vision LoRA merged), reload, bad input.

The adapter is made here the way training makes it (peft LoRA on training.lora_targets: every
Linear of both towers, the projector trained fully via modules_to_save), with random non-zero
LoRA B so that merging really changes the weights and the outputs."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stages import merge
from stages.lib import merging as M
from stages.lib.families.gemma3 import real_key
from stages.lib.cli import UserError

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--samples", "2", "--max-new-tokens", "8"]
ALL_ON = {f"finetune_{k}": True for k in ("vision_layers", "language_layers", "attention_modules", "mlp_modules")}


def make_adapter(base_dir, out_dir, seed=1):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from stages.lib.families import gemma3
    from stages.lib.training import lora_targets

    model = AutoModelForImageTextToText.from_pretrained(str(base_dir))
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=lora_targets(model, ALL_ON, gemma3),
                        modules_to_save=["multi_modal_projector"], init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # the trained projector copy differs from the base's
        peft_model.base_model.model.model.multi_modal_projector.modules_to_save["default"] \
            .mm_input_projection_weight.mul_(1.5)
    peft_model.save_pretrained(str(out_dir))
    AutoProcessor.from_pretrained(str(base_dir)).save_pretrained(str(out_dir))
    return Path(out_dir)


def tensors(folder):
    """{checkpoint key: float32 tensor} of a model folder's safetensors."""
    from safetensors.torch import load_file

    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        out.update({k: v.float() for k, v in load_file(str(path)).items()})
    return out


def run_stage(tmp, base, adapter, rows, *extra):
    out, metrics = tmp / "models" / "merged", tmp / "metrics" / "merge.json"
    merge.main(["--base", str(base), "--adapter", str(adapter), "--out", str(out), "--metrics", str(metrics),
                "--rows", str(rows), *FAST, *extra])
    return out, metrics


def assert_nothing_written(out):
    """No models/merged, and no temp folder left beside it."""
    assert not out.exists()
    assert not list(out.parent.glob(".merged*")) if out.parent.exists() else True


@pytest.fixture(scope="module")
def adapter_dir(tiny_base_dir, tmp_path_factory):
    return make_adapter(tiny_base_dir, tmp_path_factory.mktemp("lora") / "lora")


@pytest.fixture(scope="module")
def merged(tiny_base_dir, adapter_dir, tiny_rows_file, tmp_path_factory):
    """The stage run once with its defaults (bf16): (merged folder, metrics dict)."""
    out, metrics = run_stage(tmp_path_factory.mktemp("run"), tiny_base_dir, adapter_dir, tiny_rows_file)
    return out, json.loads(metrics.read_text())


def test_parity_passes_and_is_sensitive(merged):
    _, m = merged
    assert m["passed"] is True and m["dtype"] == "bfloat16" and m["backend"] == "transformers"
    assert m["saved_dtype"] == "BF16"  # the tiny base is stored in float32: merged into 16-bit anyway
    assert m["greedy_mismatches"] == 0 and m["samples"] == 2
    assert m["max_relative_logit_gap"] <= m["tolerance"] == M.TOLERANCE["bfloat16"]
    # The tolerance is far below what the adapter, or its vision part alone, changes:
    assert m["vision_lora_layers"] > 0
    assert m["vision_lora_effect"] > 5 * m["tolerance"] and m["adapter_effect"] > 5 * m["tolerance"]


def test_merged_files_are_readable_by_other_users(merged):
    folder, _ = merged
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir() if p.is_file()}
    assert set(modes.values()) == {"0o644"}, modes


def test_gemma3_is_never_merged_in_float16():
    # vLLM refuses float16 for Gemma 3: auto is bf16 (float32 on a GPU without bf16), float16 refused
    assert M.pick_dtype("auto", "gemma3")[0] == "bfloat16"   # a CPU: bf16
    with pytest.raises(UserError, match="vLLM does not serve gemma3 in float16"):
        M.pick_dtype("float16", "gemma3")
    assert M.pick_dtype("float16", "llama")[0] == "float16"


def test_unsloth_merges_only_a_base_stored_in_the_merge_dtype(merged, tiny_base_dir):
    # unsloth's merged save keeps the base's stored dtype (seen on an H200 with the float32 tiny base)
    folder, _ = merged
    assert M.stored_dtypes(tiny_base_dir) == {"F32"} and M.stored_dtypes(folder) == {"BF16"}
    backend, note = M.merge_backend("unsloth", tiny_base_dir, "bfloat16")
    assert backend == "transformers" and "['F32']" in note
    assert M.merge_backend("unsloth", tiny_base_dir, "float32") == ("unsloth", None)
    assert M.merge_backend("unsloth", folder, "bfloat16") == ("unsloth", None)
    assert M.merge_backend("transformers", tiny_base_dir, "bfloat16") == ("transformers", None)


def test_language_and_vision_lora_are_merged(merged, tiny_base_dir, adapter_dir):
    """Every LoRA layer's merged weight is the base's plus scale * B @ A, vision tower included."""
    from safetensors.torch import load_file

    out, _ = merged
    base, new = tensors(tiny_base_dir), tensors(out)
    adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))
    scale = json.loads((adapter_dir / "adapter_config.json").read_text())["lora_alpha"] / 4
    checked = {"vision_tower": 0, "language_model": 0}
    for key in adapter:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.model.").removesuffix(".lora_A.weight")
        # saved under the real checkpoints' names: language_model.model.layers..., vision_tower.vision_model...
        weight = real_key(f"model.{module}.weight", tied=True)
        delta = scale * adapter[key.replace("lora_A", "lora_B")].float() @ adapter[key].float()
        bf16_base = base[weight].bfloat16().float()
        assert (new[weight] - bf16_base).abs().max() > 0.1 * delta.abs().max(), f"{module} left unmerged"
        assert (new[weight] - (bf16_base + delta)).abs().max() <= 0.01 * (bf16_base + delta).abs().max() + 1e-3
        checked[next(t for t in checked if t in module)] += 1
    assert checked["vision_tower"] >= 12 and checked["language_model"] >= 14
    projector = next(k for k in new if k.endswith("mm_input_projection_weight"))
    assert (new[projector] - base[projector] * 1.5).abs().max() <= 0.01 * base[projector].abs().max()


def test_folder_loads_and_has_what_servers_need(merged):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out, m = merged
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "chat_template.jinja", "tokenizer.json"} <= names
    assert any(n.endswith(".safetensors") for n in names) and not any(n.endswith(".bin") for n in names)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForConditionalGeneration"] == m["architectures"]
    model = AutoModelForImageTextToText.from_pretrained(str(out))
    processor = AutoProcessor.from_pretrained(str(out))
    assert model.dtype == torch.bfloat16 and type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert processor.chat_template and list(processor.image_processor.image_mean) == [1.0, 1.0, 1.0]
    end_of_turn = processor.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn in json.loads((out / "generation_config.json").read_text())["eos_token_id"]


def test_parity_catches_an_unmerged_vision_tower(merged, tiny_base_dir, adapter_dir, tiny_rows_file, tmp_path):
    """A folder whose vision weights were left as the base's (the known unsloth failure) fails parity."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoProcessor

    out, m = merged
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    base = load_file(str(next(Path(tiny_base_dir).glob("*.safetensors"))))
    weights_file = next(broken.glob("*.safetensors"))
    weights = load_file(str(weights_file))
    for key in weights:
        if "vision_tower." in key:
            weights[key] = base[key].to(torch.bfloat16)
    save_file(weights, str(weights_file), metadata={"format": "pt"})

    processor = AutoProcessor.from_pretrained(str(adapter_dir))
    images = merge.parity_images(tiny_rows_file, 2, 0.1, 42)
    args = (processor, images, merge.P.load_params()["instruction"], 8, ("<end_of_turn>",))
    reference = M.greedy_with_logits(
        PeftModel.from_pretrained(M.load_base(tiny_base_dir, torch.bfloat16), str(adapter_dir)), *args)
    good = M.greedy_with_logits(M.load_base(out, torch.bfloat16), *args)
    bad = M.greedy_with_logits(M.load_base(broken, torch.bfloat16), *args)
    assert M.judge(reference, good, m["tolerance"])[0] is True
    passed, _, _, gap = M.judge(reference, bad, m["tolerance"])
    assert passed is False and gap > m["tolerance"]


def test_failed_parity_fails_the_stage_and_writes_no_folder(tiny_base_dir, adapter_dir, tiny_rows_file, tmp_path):
    with pytest.raises(UserError, match="parity check failed"):
        run_stage(tmp_path, tiny_base_dir, adapter_dir, tiny_rows_file, "--tolerance", "1e-9",
                  "--samples", "1", "--max-new-tokens", "3")
    assert_nothing_written(tmp_path / "models" / "merged")
    assert json.loads((tmp_path / "metrics" / "merge.json").read_text())["passed"] is False


def test_foreign_adapter_is_refused(tiny_base_dir, tiny_rows_file, tmp_path):
    from stages.lib.synthetic import charset
    from stages.lib.tinymodel import build_tiny_model

    other = build_tiny_model(tmp_path / "other", charset(), text_hidden_size=64, vision_hidden_size=64)
    foreign = make_adapter(other, tmp_path / "foreign")
    with pytest.raises(UserError, match="does not fit this base"):
        run_stage(tmp_path, tiny_base_dir, foreign, tiny_rows_file)
    assert_nothing_written(tmp_path / "models" / "merged")


@pytest.mark.parametrize("case", ["no_adapter", "not_lora", "base_not_model", "base_4bit", "disk_full"])
def test_bad_input_one_line_error_before_work(case, tiny_base_dir, adapter_dir, tiny_rows_file, tmp_path):
    base, adapter, extra = tiny_base_dir, adapter_dir, []
    if case == "no_adapter":
        adapter, message = tmp_path / "missing", "no LoRA adapter"
    elif case == "not_lora":
        adapter = tmp_path / "ia3"
        shutil.copytree(adapter_dir, adapter)
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps(dict(config, peft_type="IA3")))
        message = "only LORA adapters"
    elif case == "base_not_model":
        base, message = tmp_path / "empty", "no base model"
        base.mkdir()
    elif case == "base_4bit":
        base = tmp_path / "quantized"
        shutil.copytree(tiny_base_dir, base)
        config = json.loads((base / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
        (base / "config.json").write_text(json.dumps(config))
        message = "quantized checkpoint"
    else:
        extra, message = ["--keep-free-gb", "1e9"], "not enough disk space"
    with pytest.raises(UserError, match=message) as err:
        run_stage(tmp_path, base, adapter, tiny_rows_file, *extra)
    assert "\n" not in str(err.value)
    assert_nothing_written(tmp_path / "models" / "merged")
    assert not (tmp_path / "metrics").exists()


def test_cli_prints_one_line_and_exits_2(tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "stages.merge", "--base", str(tmp_path / "empty"),
                           "--out", str(tmp_path / "merged")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and not (tmp_path / "merged").exists()
    expected = f"error: {tmp_path / 'empty'}: no base model (run `dvc repro base` first)"
    assert proc.stderr.strip().splitlines() == [expected]


def test_a_flip_at_a_near_tie_is_not_a_mismatch():
    """Greedy runs may part where the reference's two tokens are within the tolerance (rounding);
    parting anywhere else, or stopping early, is a mismatch."""
    import torch

    logits = torch.zeros(3, 5)
    logits[:, 0] = 10.0
    logits[1, 2] = 9.9                      # step 1: tokens 0 and 2 within 1% of the largest logit
    reference = [([0, 0, 0], logits)]
    tie = [([0, 2, 4], logits.clone())]
    wrong = [([0, 3, 4], logits.clone())]   # token 3 is far below token 0 in the reference
    early = [([0], logits[:1].clone())]
    assert M.judge(reference, tie, 0.05)[:3] == (True, 0, 1)
    assert M.judge(reference, tie, 0.001)[:3] == (False, 1, 0)
    assert M.judge(reference, wrong, 0.05)[:3] == (False, 1, 0)
    assert M.judge(reference, early, 0.05)[:3] == (False, 1, 0)

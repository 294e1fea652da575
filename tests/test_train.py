"""The train stage's library: answer-only labels, learning, resume, and refusal of bad params."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from stages.lib.cli import UserError
from stages.lib.params import load_params
from stages.lib.modeling import load_processor
from stages.lib.prompt import DEFAULT_INSTRUCTION
from stages.lib.training import OcrCollator, load_for_training, run_training, split_train_val, training_config

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTION = DEFAULT_INSTRUCTION


def small_config(**overrides):
    values = dict(num_train_epochs=1.0, per_device_train_batch_size=4, eval_steps=2, logging_steps=1,
                  learning_rate=5.0e-3, warmup_ratio=0.0, backend="transformers", val_ratio=0.25)
    values.update(overrides)
    return training_config(load_params(path=ROOT / "params.yaml"), values)


def collated(processor, rows):
    return OcrCollator(processor, INSTRUCTION)(rows)


def test_labels_cover_only_the_answer(tiny_base_dir, tiny_rows):
    processor = load_processor(tiny_base_dir)
    rows = tiny_rows[:4]
    batch = collated(processor, rows)
    for labels, ids, row in zip(batch["labels"], batch["input_ids"], rows):
        answer = labels[labels != -100]
        assert processor.tokenizer.decode(answer) == row["ocr_text"] + "<end_of_turn>\n"
        # everything before the answer (image tokens, instruction, turn markers) is masked
        start = (labels != -100).nonzero()[0].item()
        assert "<start_of_turn>model\n" in processor.tokenizer.decode(ids[:start])


def test_training_steps_lower_the_loss(tiny_base_dir, tiny_rows):
    torch.manual_seed(0)
    model, processor = load_for_training(small_config(), tiny_base_dir, "transformers")
    trainable = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n and "vision_tower" in n for n in names)
    assert any("lora_" in n and "language_model" in n for n in names)
    assert any("multi_modal_projector" in n for n in names)  # the bare projector weight, trained fully
    assert sum(p.numel() for p in trainable) < sum(p.numel() for p in model.parameters()) / 2
    batch = collated(processor, tiny_rows[:8])
    optimizer = torch.optim.AdamW(trainable, lr=5.0e-3)
    model.train()
    with torch.no_grad():
        before = model(**batch).loss.item()
    for _ in range(5):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        after = model(**batch).loss.item()
    assert after < before - 0.1, (before, after)


def test_finetune_flags_pick_the_towers(tiny_base_dir):
    model, _ = load_for_training(small_config(finetune_vision_layers=False, finetune_mlp_modules=False),
                                 tiny_base_dir, "transformers")
    lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora and not any("vision_tower" in n for n in lora)
    assert not any(k in n for n in lora for k in ("gate_proj", "up_proj", "down_proj", "fc1", "fc2"))


class StopAt:
    """Simulates an interruption: raises once the trainer reaches `step`."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class _Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= step:
                    raise KeyboardInterrupt("simulated interruption")
        return _Stop()


class FirstStep:
    def __new__(cls, seen):
        from transformers import TrainerCallback

        class _First(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                seen.append(state.global_step)
        return _First()


def test_run_training_resumes_and_keeps_the_best(tiny_base_dir, tiny_rows, tmp_path):
    config = small_config(num_train_epochs=2.0)  # 18 train rows / batch 4 -> 5 steps an epoch, 10 in all
    train, val = split_train_val(tiny_rows, config["val_ratio"], config["seed"])
    out, ckpt, live = tmp_path / "lora", tmp_path / "ckpt", tmp_path / "live"
    with pytest.raises(KeyboardInterrupt):
        run_training(config, tiny_base_dir, train, val, out, live_dir=live, checkpoint_dir=ckpt,
                     callbacks=[StopAt(5)], measure_cer=False)
    assert not out.exists()  # nothing half-written
    assert (ckpt / "checkpoint-4").is_dir()
    seen = []
    metrics = run_training(config, tiny_base_dir, train, val, out, live_dir=live, checkpoint_dir=ckpt,
                           callbacks=[FirstStep(seen)], resume=True)
    assert seen[0] == 4  # continued from the last checkpoint, not from step 0
    assert metrics["global_step"] == 10
    assert metrics["best_eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-4)
    assert metrics["best_step"] in (2, 4, 6, 8, 10)
    assert {"train_loss", "runtime_s", "samples_per_second", "trainable_params", "val_cer", "val_cer_base"} <= set(metrics)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja",
            "processor_config.json"} <= {p.name for p in out.iterdir()}
    assert not ckpt.exists()  # checkpoints go once the run has finished
    eval_rows = (live / "plots/metrics/eval/loss.tsv").read_text().splitlines()
    train_rows = (live / "plots/metrics/train/loss.tsv").read_text().splitlines()
    assert eval_rows[0].split("\t")[0] == "step" and len(eval_rows) - 1 == 5  # steps 2,4,6,8,10
    assert [int(r.split("\t")[0]) for r in train_rows[1:]] == list(range(1, 11))


def test_split_train_val_keeps_documents_whole():
    rows = [{"image_path": f"d{i // 10}/l{i}.png", "ocr_text": "x"} for i in range(200)]
    train, val = split_train_val(rows, 0.1, 42)
    assert len(val) == 20 and len(train) == 180
    assert not {Path(r["image_path"]).parent for r in train} & {Path(r["image_path"]).parent for r in val}
    assert split_train_val(rows, 0.1, 42) == (train, val)


@pytest.mark.parametrize("override, message", [
    ({"learning_rate": -1.0e-4}, "'learning_rate' must be > 0"),
    ({"lora_r": 0}, "'lora_r' must be >= 1"),
    ({"backend": "tensorflow"}, "'backend' must be one of"),
    ({"learning_rate": "2e-4"}, "'learning_rate' must be float"),
    ({"lora_alpha": 0}, "'lora_alpha' must be > 0"),
    ({"finetune_vision_layers": False, "finetune_language_layers": False}, "nothing to train"),
    ({"lora_rank": 8}, "unknown training parameter 'lora_rank'"),
])
def test_bad_training_params_are_refused(override, message):
    with pytest.raises(UserError, match=message):
        small_config(**override)


def run_stage(tmp_path, stage, **changes):
    """Run `python -m stages.STAGE` in tmp_path with params.yaml changed; return (rc, stderr)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params.update(changes)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}, timeout=120)
    return proc.returncode, proc.stderr.strip()


def test_base_refuses_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "notes.txt").write_text("hello")
    rc, err = run_stage(tmp_path, "base", model_name=str(tmp_path / "not_a_model"))
    assert rc == 2 and err.count("\n") == 0, err
    assert "'model_name'" in err and "is not a model folder (no config.json)" in err
    rc, err = run_stage(tmp_path, "base", model_name="google/gemma-3-4b-it")
    assert rc == 2 and "is not a folder" in err and "nothing is downloaded" in err


def test_base_points_at_a_real_checkpoint_folder(tmp_path, tiny_base_dir):
    rc, err = run_stage(tmp_path, "base", model_name=str(tiny_base_dir))
    assert rc == 0, err
    assert json.loads((tmp_path / "models/base/source.json").read_text()) == {"model_name": str(tiny_base_dir.resolve())}
    from stages.lib.modeling import resolve_base_dir
    assert resolve_base_dir(tmp_path / "models/base") == tiny_base_dir.resolve()


def test_train_stage_refuses_bad_params_before_loading_anything(tmp_path):
    rc, err = run_stage(tmp_path, "train", lora_r=0)
    assert rc == 2 and err == "error: params.yaml: 'lora_r' must be >= 1, got 0"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only refusals")
def test_cpu_refuses_what_it_cannot_run():
    from stages.lib.training import choose_backend

    assert choose_backend(small_config(backend="auto")) == "transformers"
    with pytest.raises(UserError, match="'backend' unsloth needs a CUDA GPU"):
        choose_backend(small_config(backend="unsloth"))
    with pytest.raises(UserError, match="'load_in_4bit' needs a CUDA GPU"):
        choose_backend(small_config(load_in_4bit=True))


def test_apply_best_writes_the_study_values_into_params_yaml(tmp_path, monkeypatch, capsys):
    """The one step from search to training: params.yaml gets the best values (comments kept);
    train itself reads params.yaml only."""
    import yaml

    from stages import search

    monkeypatch.chdir(tmp_path)
    original = (ROOT / "params.yaml").read_text(encoding="utf-8")
    Path("params.yaml").write_text(original, encoding="utf-8")
    Path("models/search").mkdir(parents=True)
    best = {"params": {"lora_r": 32, "learning_rate": 0.0039901784}, "trial": 2, "value": 0.0501,
            "objective": "eval_loss", "study_name": "ocr-lora", "skipped": False}
    Path("models/search/best_params.json").write_text(json.dumps(best))
    search.main(["--apply-best"])
    text = Path("params.yaml").read_text(encoding="utf-8")
    params = yaml.safe_load(text)
    assert params["lora_r"] == 32 and params["learning_rate"] == 0.0039901784
    assert isinstance(params["learning_rate"], float)
    assert "# LoRA" not in original or "# LoRA" in text
    kept = [line for line in original.splitlines() if line.lstrip().startswith("#")]
    assert all(line in text for line in kept)                       # every comment line is still there
    changed = [(a, b) for a, b in zip(original.splitlines(), text.splitlines()) if a != b]
    assert len(changed) == 2 and all(b.startswith(("lora_r:", "learning_rate:")) for _, b in changed), changed
    assert "lora_r 16 -> 32" in capsys.readouterr().out
    # a value the config refuses is refused before anything is written
    best["params"] = {"lora_r": 0}
    Path("models/search/best_params.json").write_text(json.dumps(best))
    before = Path("params.yaml").read_bytes()
    with pytest.raises(UserError, match="'lora_r' must be >= 1"):
        search.main(["--apply-best"])
    assert Path("params.yaml").read_bytes() == before

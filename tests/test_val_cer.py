"""The CER during training (issue 22): the value logged at each evaluation is the greedy CER of the
checkpoint saved at that step, measured again here from the checkpoint on disk; best_metric val_cer keeps
the checkpoint with the lowest one."""
import shutil
from pathlib import Path

import pytest

from stages.lib.cli import UserError
from stages.lib.metrics import corpus_cer
from stages.lib.modeling import generation_budget, load_model, load_processor, read_images
from stages.lib.images import load_image
from stages.lib.params import load_params
from stages.lib.training import run_training, split_train_val, training_config, val_cer_sample

ROOT = Path(__file__).resolve().parents[1]


def config_with(**overrides):
    values = dict(num_train_epochs=2.0, per_device_train_batch_size=4, eval_steps=2, logging_steps=1,
                  learning_rate=5.0e-3, warmup_ratio=0.0, backend="transformers", val_ratio=0.25)
    values.update(overrides)
    return training_config(load_params(path=ROOT / "params.yaml"), values)


class KeepCheckpoints:
    """Copies every checkpoint as it is saved (the trainer deletes all but two, and all at the end)."""

    def __new__(cls, into):
        from transformers import TrainerCallback

        class _Keep(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                src = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                shutil.copytree(src, Path(into) / src.name)
        return _Keep()


def test_cer_during_training_equals_a_separate_greedy_cer_of_each_checkpoint(tiny_base_dir, tiny_rows, tmp_path):
    from peft import PeftModel

    config = config_with(val_cer_rows=4, best_metric="val_cer", learning_rate=5.0e-2)
    train, val = split_train_val(tiny_rows, config["val_ratio"], config["seed"])
    kept, live = tmp_path / "kept", tmp_path / "live"
    metrics = run_training(config, tiny_base_dir, train, val, tmp_path / "lora", live_dir=live,
                           checkpoint_dir=tmp_path / "ckpt", callbacks=[KeepCheckpoints(kept)], measure_cer=False)
    lines = (live / "plots/metrics/eval/val_cer.tsv").read_text().splitlines()
    assert lines[0].split("\t")[:2] == ["step", "val_cer"]
    logged = {int(s): float(v) for s, v, *_ in (line.split("\t") for line in lines[1:])}
    assert sorted(logged) == [2, 4, 6, 8, 10]
    # lr 5e-2 moves the untrained tiny model's readings (babble, then empty): the values differ by step
    assert len(set(logged.values())) > 1, logged

    rows = val_cer_sample(val, 4, config["seed"])
    assert len(rows) == 4 and all(r in val for r in rows)
    processor = load_processor(tiny_base_dir)
    budget, _ = generation_budget(processor.tokenizer, [r["ocr_text"] for r in train + val], tiny_base_dir,
                                  config["instruction"])
    images = [load_image(r["image_path"]) for r in rows]
    for step in (2, 10):   # the first and the last checkpoint: the readings changed in between
        model = PeftModel.from_pretrained(load_model(tiny_base_dir), str(kept / f"checkpoint-{step}"))
        again = corpus_cer([r["ocr_text"] for r in rows],
                           read_images(model, processor, images, config["instruction"], max_new_tokens=budget))
        assert logged[step] == pytest.approx(again, abs=1e-12), step
    # the kept adapter is the checkpoint of the lowest CER (the first of equal ones, as the trainer keeps)
    best = min(logged, key=lambda s: (logged[s], s))
    assert metrics["best_metric"] == "val_cer" and metrics["best_step"] == best
    assert metrics["best_val_cer"] == pytest.approx(logged[best])


def test_best_metric_val_cer_needs_cer_rows():
    with pytest.raises(UserError, match="val_cer_rows"):
        config_with(val_cer_rows=0, best_metric="val_cer")
    with pytest.raises(UserError, match="best_metric"):
        config_with(best_metric="f1")

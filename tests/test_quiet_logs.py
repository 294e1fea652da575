"""A default run prints no library warning a user cannot act on (issue 24), and real ones stay:
stages/lib/cli.py filters the known-harmless messages by their exact text."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import logging, warnings
{first}
import peft                               # imports bitsandbytes: its CPU kernel message
from transformers import Gemma3TextConfig, Gemma3ForCausalLM
model = Gemma3ForCausalLM(Gemma3TextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=1, num_key_value_heads=1, head_dim=16,
                                           vocab_size=32))
model.is_gradient_checkpointing           # what TRL and PEFT read: a FutureWarning in transformers 5.24
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("a real bitsandbytes warning")
warnings.warn("a real FutureWarning", FutureWarning)
"""


def stderr_of(first):
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(first=first)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_known_harmless_library_warnings_are_silenced_and_real_ones_kept():
    loud = stderr_of("")
    assert "is_gradient_checkpointing" in loud            # proof that the script provokes them
    quiet = stderr_of("import stages.lib.cli")
    assert "is_gradient_checkpointing" not in quiet and "gemm_4bit_forward" not in quiet, quiet
    assert "a real bitsandbytes warning" in quiet and "a real FutureWarning" in quiet


def test_training_arguments_use_the_current_checkpointing_name():
    from stages.lib.training import sft_config
    import warnings

    config = {"report_to": "none", "per_device_train_batch_size": 4, "num_processes": 1, "seed": 0,
              "learning_rate": 1.0e-3, "num_train_epochs": 1.0, "gradient_accumulation_steps": 1,
              "warmup_ratio": 0.0, "weight_decay": 0.0, "logging_steps": 1, "eval_steps": 1, "max_seq_length": 64,
              "best_metric": "eval_loss"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = sft_config(config, "/tmp/unused-checkpoints", "transformers")
    assert not [w for w in caught if "checkpointing" in str(w.message)], [str(w.message) for w in caught]
    assert args.gradient_checkpointing is False   # the CPU path: off, as before

"""The README's real-checkpoint command: applied to params.yaml by DVC's own `-S` override code, it
gives the values LoRA on a real checkpoint takes and a valid search space, with no demo warning;
the tiny demo's values on a real checkpoint are warned about."""
import shlex
import shutil

import yaml

from conftest import ROOT
from stages.lib.params import load_params
from stages.lib.search.space import corners, parse_space
from stages.lib.training import demo_value_warnings, training_config


def readme_command():
    """The `dvc exp run` command of the README's GPU section, continuation lines joined."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## On a GPU with a real checkpoint", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    joined = block.replace("\\\n", " ")
    line = next(line for line in joined.splitlines() if line.strip().startswith("dvc exp run"))
    return shlex.split(line)


def test_the_readme_command_sets_real_checkpoint_values(tmp_path):
    from dvc.utils.hydra import apply_overrides

    words = readme_command()
    overrides = [words[i + 1] for i, word in enumerate(words) if word == "-S"]
    params_file = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params_file)
    apply_overrides(params_file, overrides)
    params = load_params(path=params_file)   # DVC writes 1.0e-5 back as 1e-05: read as a float, not a string
    config = training_config(params)
    assert {k: config[k] for k in ("learning_rate", "num_train_epochs", "per_device_train_batch_size",
                                   "gradient_accumulation_steps", "lora_r", "lora_alpha", "load_in_4bit")} == {
        "learning_rate": 2.0e-4, "num_train_epochs": 5.0, "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 4, "lora_r": 16, "lora_alpha": 16.0, "load_in_4bit": True}
    space = parse_space(params["search"]["space"])
    assert (space["learning_rate"]["low"], space["learning_rate"]["high"]) == (1.0e-5, 5.0e-4)
    assert (space["num_train_epochs"]["low"], space["num_train_epochs"]["high"]) == (2, 5)
    for values in corners(space):   # every end of the space is a valid training config
        training_config({**params, **values})
    assert config["image"]["do_pan_and_scan"] is True
    assert config["model_name"] != "tiny" and demo_value_warnings(config, space) == []


def test_demo_values_on_a_real_checkpoint_are_warned_about():
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    assert demo_value_warnings(training_config(params)) == []          # the tiny demo: its own values
    real = training_config(dict(params, model_name="/models/gemma-3-4b-it"))
    warnings = demo_value_warnings(real, parse_space(params["search"]["space"]))
    assert any("learning_rate 0.005" in w for w in warnings) and any("num_train_epochs 25" in w for w in warnings)
    assert any("search.space.learning_rate up to 0.01" in w for w in warnings)

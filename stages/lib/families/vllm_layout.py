"""The key layout vLLM loads, per family: each family module names vLLM 0.33.0's weight-name
mapping for it (VLLM_WEIGHT_PREFIXES, copied from its source; tools/check_vllm_mappings.py compares)
and the top-level modules that mapping must land in (VLLM_MODULES); these check a folder against them.
"""
from pathlib import Path


def saved_keys(folder):
    from safetensors import safe_open

    keys = []
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:   # the header only
            keys += list(f.keys())
    return keys


def unplaced_keys(family, keys):
    """The saved tensor names a family's vLLM 0.33.0 loader cannot place. Each name goes through the
    family's VLLM_WEIGHT_PREFIXES as vLLM's WeightsMapper applies them (in order, every matching
    prefix, not only the first) and must then start with one of its VLLM_MODULES."""
    odd = []
    for key in keys:
        mapped = key
        for old, new in family.VLLM_WEIGHT_PREFIXES:
            if mapped.startswith(old):
                mapped = new + mapped[len(old):]
        if not mapped.startswith(family.VLLM_MODULES):
            odd.append(key)
    return sorted(odd)


def problems(family, folder):
    odd = unplaced_keys(family, saved_keys(folder))
    return [f"{len(odd)} tensors vLLM's {family.TITLE} loader cannot place (first: {odd[0]})"] if odd else []


def check(family, folder):
    """For families whose checkpoints are in the layout transformers saves: nothing to rewrite, only
    to check (UserError when a tensor would not load). Returns {"renamed": 0, "dropped": []}."""
    from ..cli import UserError

    found = problems(family, folder)
    if found:
        raise UserError(f"{folder}: not in the {family.TITLE} layout vLLM loads: {'; '.join(found)}")
    return {"renamed": 0, "dropped": []}

"""Check each family's VLLM_WEIGHT_PREFIXES (stages/lib/families/) against vLLM's own source.

    pip download vllm==0.33.0 --no-deps -d /tmp/vllm && unzip -q /tmp/vllm/vllm-*.whl 'vllm/model_executor/models/*' -d /tmp/vllm
    python tools/check_vllm_mappings.py /tmp/vllm/vllm/model_executor/models

Reads `hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={...})` of the family's class (no vLLM
import: it does not install beside the CPU torch) and exits 1 when a family's copy differs.
"""
import ast
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages.lib.families import FAMILIES  # noqa: E402

SOURCES = {"gemma3": "gemma3_mm.py", "gemma4": "gemma4_mm.py", "qwen3_vl": "qwen3_vl.py"}


def vllm_prefixes(path, class_name):
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    for node in cls.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "hf_to_vllm_mapper":
            keywords = {k.arg: ast.literal_eval(k.value) for k in node.value.keywords}
            return tuple(keywords["orig_to_new_prefix"].items()), sorted(keywords)
    raise SystemExit(f"{path}: {class_name} has no hf_to_vllm_mapper")


def main(models_dir):
    failed = False
    for name, family in FAMILIES.items():
        prefixes, kinds = vllm_prefixes(Path(models_dir) / SOURCES[name], family.ARCHITECTURE)
        same = prefixes == family.VLLM_WEIGHT_PREFIXES and kinds == ["orig_to_new_prefix"]
        failed |= not same
        print(f"{name}: {'same as' if same else 'DIFFERENT from'} {SOURCES[name]} ({family.ARCHITECTURE})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

"""Every third-party package a default stage imports (anywhere in its import closure, function-level
imports included) is pinned in both requirements files: a GPU machine runs the same stages."""
import re
import sys
from importlib.metadata import packages_distributions

import pytest

from conftest import ROOT
from test_dvc_yaml import STAGE_LIST, closure, command_module, imported_modules, roots_of

# Installed by tools/setup.sh before requirements.txt (the CPU build), and only on GPU machines.
CPU_SET_EXCEPTIONS = {"torch", "unsloth", "vllm"}
# Imported directly but installed as a dependency of a pinned package (checked below against that
# package's installed metadata): pinning them too would fight the resolver of the GPU set.
BROUGHT_BY = {"numpy": "transformers", "safetensors": "transformers", "tokenizers": "transformers",
              "sqlalchemy": "optuna", "ruamel-yaml": "dvc"}


def pinned(path):
    """Normalized distribution names pinned (==) in a requirements file."""
    names = set()
    for line in (ROOT / path).read_text(encoding="utf-8").splitlines():
        match = re.match(r"\s*([A-Za-z0-9_.-]+)(\[[^]]*\])?\s*==", line)
        if match:
            names.add(normalize(match.group(1)))
    return names


def normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def stage_imports():
    """{distribution: [importing file]} for the third-party imports of every stage of dvc.yaml."""
    files = set()
    for _, cmd, _, _ in STAGE_LIST:
        module, argv = command_module(cmd)
        files |= closure(roots_of(module, argv))
    dists = packages_distributions()
    found = {}
    for file in sorted(files):
        for name in imported_modules(ROOT / file):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in ("stages", ""):
                continue
            for dist in dists.get(top, [top]):
                found.setdefault(normalize(dist), []).append(file)
    return found


@pytest.mark.parametrize("path, exceptions", [("requirements-gpu.txt", set()),
                                              ("requirements.txt", CPU_SET_EXCEPTIONS)])
def test_requirements_hold_every_package_the_stages_import(path, exceptions):
    have = pinned(path)
    have |= {dist for dist, bringer in BROUGHT_BY.items() if bringer in have}
    missing = {dist: files[0] for dist, files in stage_imports().items() if dist not in have | exceptions}
    assert not missing, f"{path} lacks packages the default stages import: {missing}"


@pytest.mark.parametrize("dist, bringer", sorted(BROUGHT_BY.items()))
def test_a_package_left_unpinned_is_a_dependency_of_a_pinned_one(dist, bringer):
    from importlib.metadata import requires

    needs = {normalize(re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0]) for r in requires(bringer) or []
             if "extra ==" not in r}
    assert dist in needs, f"{bringer} does not require {dist}: pin {dist} in both requirements files"


def test_the_check_sees_function_level_imports():
    imports = stage_imports()
    assert "rapidocr" in imports and "pypdfium2" in imports and "onnxruntime" in imports
    assert "unsloth" in imports   # imported inside a function, on the GPU path only

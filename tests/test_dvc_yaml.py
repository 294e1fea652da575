"""dvc.yaml cannot drift from the code (issue 12).

For every stage DVC resolves from dvc.yaml (foreach included):
- its `deps` under stages/ are exactly the import closure of its command's module within stages/
  (every module it imports, at any depth, package __init__ files included, and for an OCR engine
  its engine module): a missing one leaves the stage stale when that module changes; an extra one
  re-runs it for nothing;
- its `params` are exactly what the stage declares it reads (the module's PARAMS, or
  declared_params(argv) where that depends on the command line); stages/lib/params.load_params
  makes reading an undeclared key fail at run time, so declared == read.
"""
import ast
import importlib
import shlex
import sys
from pathlib import Path

import pytest

from conftest import ROOT

STAGES = ROOT / "stages"


def module_file(name):
    """stages.lib.x -> stages/lib/x.py or stages/lib/x/__init__.py (None when outside stages/)."""
    if not name.startswith("stages"):
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path):
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path):
    """Every module an import statement of `path` names (relative imports resolved), anywhere in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = package.split(".")
                parent = parent[:len(parent) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            else:
                base = node.module
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import x` imports module x
    return found


def closure(roots):
    """Files under stages/ that importing the root modules executes: the modules and their packages."""
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ too
            path = module_file(".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(imported_modules(path))
    return {str(p.relative_to(ROOT)) for p in seen}


def resolved_stages():
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        return [(stage.addressing, stage.cmd, [str(Path(d.def_path)) for d in stage.deps],
                 sorted(key for dep in stage.params for key in dep.params))
                for stage in repo.index.stages]


def command_module(cmd):
    """(module, argv) of `python -m stages.NAME ...`."""
    words = shlex.split(cmd)
    assert words[:2] == ["python", "-m"] and words[2].startswith("stages."), f"not a stage command: {cmd}"
    return words[2], words[3:]


def roots_of(module, argv):
    roots = [module]
    if "--engine" in argv:
        from stages.lib.evaluation.engines import ENGINES

        engine = argv[argv.index("--engine") + 1]
        if engine in ENGINES:
            roots.append(f"stages.lib.evaluation.engines.{engine}")
    return roots


STAGE_LIST = resolved_stages()


@pytest.mark.parametrize("name,cmd,deps,params", STAGE_LIST, ids=[s[0] for s in STAGE_LIST])
def test_stage_deps_are_its_import_closure(name, cmd, deps, params):
    module, argv = command_module(cmd)
    wanted = closure(roots_of(module, argv))
    listed = {d for d in deps if d.startswith("stages/") and d.endswith(".py")}
    assets = [d for d in deps if d.startswith("stages/") and not d.endswith(".py")]   # e.g. the results page
    assert all((ROOT / d).is_file() for d in assets), f"{name}: dvc.yaml deps name missing files: {assets}"
    assert not wanted - listed, f"{name}: dvc.yaml deps miss modules it imports: {sorted(wanted - listed)}"
    assert not listed - wanted, f"{name}: dvc.yaml deps list modules it does not import: {sorted(listed - wanted)}"


@pytest.mark.parametrize("name,cmd,deps,params", STAGE_LIST, ids=[s[0] for s in STAGE_LIST])
def test_stage_params_are_what_it_reads(name, cmd, deps, params):
    module_path, argv = command_module(cmd)
    module = importlib.import_module(module_path)
    declared = module.declared_params(argv) if hasattr(module, "declared_params") else module.PARAMS
    assert sorted(declared) == params, (f"{name}: dvc.yaml params {params} != what the stage reads "
                                        f"{sorted(declared)}")


def test_every_training_parameter_has_a_value_in_params_yaml():
    import yaml

    from stages.lib.training import TRAINING_KEYS, training_config

    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    assert set(TRAINING_KEYS) <= set(params)
    training_config(params)   # and the shipped values pass every check


def test_reading_an_undeclared_key_fails_at_once(tmp_path, monkeypatch):
    from stages.lib import params as P

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("a: {b: 1, c: 2}\nd: 3\n", encoding="utf-8")
    view = P.load_params(["a.b"])
    assert P.get(view, "a.b", int) == 1
    with pytest.raises(RuntimeError, match="'d' without declaring it"):
        P.get(view, "d", int)
    with pytest.raises(P.UserError, match="missing parameter 'e'"):
        P.get(view, "e", int)


def test_closure_sees_function_level_and_relative_imports():
    files = closure(["stages.train"])
    # training.py imports metrics inside run_training (a function-level relative import)
    assert "stages/lib/metrics.py" in files and "stages/lib/training.py" in files
    assert "stages/__init__.py" in files and "stages/lib/__init__.py" in files
    assert "stages/score.py" not in files


if __name__ == "__main__":  # print each stage's closure (a help when editing dvc.yaml)
    for name, cmd, _, _ in STAGE_LIST:
        module, argv = command_module(cmd)
        print(name, sorted(closure(roots_of(module, argv))), file=sys.stdout)

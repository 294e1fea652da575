"""params.yaml: loaded once per stage, with typed lookups that fail with the key's name.

Each stage declares the keys it reads (its PARAMS, the same list as its `params:` in dvc.yaml;
tests/test_dvc_yaml.py checks the two agree) and loads params.yaml through that declaration:
load_params(PARAMS) hands the stage only those keys, so reading an undeclared key fails at once
instead of leaving a stage that DVC does not re-run when that key changes."""
import re
from pathlib import Path

import yaml

from .cli import UserError

PARAMS_FILE = "params.yaml"


class Loader(yaml.SafeLoader):
    """PyYAML (YAML 1.1) reads 1e-05, a float without a dot, as a string; that is how Python, and so
    `dvc exp run -S x=1.0e-5` when it rewrites params.yaml, writes small floats. Read it as YAML 1.2 does."""


Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"),
                             list("-+0123456789"))


class Params(dict):
    """The declared part of params.yaml; `everything` is the whole file (to tell a key the stage
    forgot to declare from one missing in the file)."""
    everything = None


def load_params(declared=None, path=PARAMS_FILE):
    """params.yaml as a dict; with `declared` (dotted keys: 'split', 'evaluate.workers'), only those."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found (run from the project root)")
    try:
        params = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(params, dict):
        raise UserError(f"{path}: expected a mapping of parameters")
    if declared is None:
        return params
    view = Params()
    view.everything = params
    for key in declared:
        found, value = lookup(params, key)
        if found:
            node = view
            *parents, last = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
    return view


def lookup(params, dotted_key):
    """(True, value) for 'a.b.c' in params, else (False, None)."""
    node = params
    for part in dotted_key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def get(params, dotted_key, kind=None, *, minimum=None, maximum=None, choices=None, allow_none=False):
    """Look up 'a.b.c' in params, checking its type and range; errors name the key."""
    found, value = lookup(params, dotted_key)
    if not found:
        if getattr(params, "everything", None) is not None and lookup(params.everything, dotted_key)[0]:
            raise RuntimeError(f"the stage reads params.yaml '{dotted_key}' without declaring it in its PARAMS "
                               "(and dvc.yaml): DVC would not re-run it when that key changes")
        raise UserError(f"params.yaml: missing parameter '{dotted_key}'")
    if value is None and allow_none:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is not None and (not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool))):
        hint = " (write floats like 2.0e-4: YAML reads 2e-4 as a string)" if kind is float and isinstance(value, str) else ""
        raise UserError(f"params.yaml: '{dotted_key}' must be {kind.__name__}, got {value!r}{hint}")
    if minimum is not None and value < minimum:
        raise UserError(f"params.yaml: '{dotted_key}' must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise UserError(f"params.yaml: '{dotted_key}' must be <= {maximum}, got {value!r}")
    if choices is not None and value not in choices:
        raise UserError(f"params.yaml: '{dotted_key}' must be one of {list(choices)}, got {value!r}")
    return value

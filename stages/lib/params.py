"""params.yaml: loaded once per stage, with typed lookups that fail with the key's name."""
from pathlib import Path

import yaml

from .cli import UserError

PARAMS_FILE = "params.yaml"


def load_params(path=PARAMS_FILE):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found (run from the project root)")
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(params, dict):
        raise UserError(f"{path}: expected a mapping of parameters")
    return params


def get(params, dotted_key, kind=None, *, minimum=None, maximum=None, choices=None, allow_none=False):
    """Look up 'a.b.c' in params, checking its type and range; errors name the key."""
    node = params
    for part in dotted_key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise UserError(f"params.yaml: missing parameter '{dotted_key}'")
        node = node[part]
    value = node
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

"""The search space, in the original's config vocabulary, and the sampler and pruner built from it.

A space maps a training key (a top-level key of params.yaml) to one spec:
  {type: loguniform, low: 1.0e-4, high: 1.0e-2}       suggest_float(log=True)
  {type: uniform, low: 0.0, high: 0.15}                suggest_float
  {type: int, low: 2, high: 5, step: 1}                suggest_int (step defaults to 1)
  {type: categorical, choices: [8, 16, 32]}            suggest_categorical
Any spec may add `values: [...]`: the explicit grid for mode `grid` (other modes ignore it).
Grid rule otherwise: categorical -> its choices; int -> every step from low to high, or
`grid_points` values spread evenly over the steps when there are more; uniform -> `grid_points`
evenly spaced values, both ends included; loguniform -> `grid_points` values evenly spaced
on a log scale, both ends included.

The original's JSON config ({"search_space": {...}, <fixed training keys>...}) is read by
`read_config`: its fixed keys override params.yaml's, its "train[:90%]"/"train[90%:]" splits
become val_ratio.
"""
import math
import re

from ..cli import UserError
from ..io import read_json

TYPES = ("loguniform", "uniform", "int", "categorical")
MODES = ("bayesian", "random", "grid")
PRUNERS = ("median", "none")


def _number(value, where, kind=float):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        hint = " (write floats like 2.0e-4: YAML reads 2e-4 as a string)" if isinstance(value, str) else ""
        raise UserError(f"{where} must be {'an integer' if kind is int else 'a number'}, got {value!r}{hint}")
    return kind(value)


def parse_space(space, where="params.yaml: search.space"):
    """Validate a space mapping; return {name: normalized spec}. Errors name the parameter."""
    if not isinstance(space, dict):
        raise UserError(f"{where}: expected a mapping of parameter -> {{type, ...}}, got {type(space).__name__}")
    specs = {}
    for name, raw in space.items():
        at = f"{where}.{name}"
        if not isinstance(raw, dict):
            raise UserError(f"{at}: expected a mapping like {{type: loguniform, low: ..., high: ...}}")
        kind = raw.get("type")
        if kind not in TYPES:
            raise UserError(f"{at}.type must be one of {list(TYPES)}, got {kind!r}")
        allowed = {"type", "values"} | ({"choices"} if kind == "categorical" else {"low", "high"})
        if kind == "int":
            allowed.add("step")
        extra = sorted(set(raw) - allowed)
        if extra:
            raise UserError(f"{at}: unknown field '{extra[0]}' for type {kind} (allowed: {', '.join(sorted(allowed))})")
        spec = {"type": kind}
        if kind == "categorical":
            choices = raw.get("choices")
            if not isinstance(choices, list) or not choices:
                raise UserError(f"{at}.choices must be a non-empty list")
            for choice in choices:
                if not (choice is None or isinstance(choice, (bool, int, float, str))):
                    raise UserError(f"{at}.choices: {choice!r} is not a number, string, bool or null")
            if len(set(map(repr, choices))) != len(choices):
                raise UserError(f"{at}.choices has duplicates: {choices}")
            spec["choices"] = list(choices)
        else:
            num = int if kind == "int" else float
            for field in ("low", "high"):
                if field not in raw:
                    raise UserError(f"{at}: missing field '{field}'")
            low, high = _number(raw["low"], f"{at}.low", num), _number(raw["high"], f"{at}.high", num)
            if low > high:
                raise UserError(f"{at}: low {low} is above high {high}")
            if kind == "loguniform" and low <= 0:
                raise UserError(f"{at}.low must be > 0 for loguniform, got {low}")
            spec.update(low=low, high=high)
            if kind == "int":
                step = _number(raw.get("step", 1), f"{at}.step", int)
                if step < 1:
                    raise UserError(f"{at}.step must be >= 1, got {step}")
                spec["step"] = step
        if "values" in raw:
            values = raw["values"]
            if not isinstance(values, list) or not values:
                raise UserError(f"{at}.values must be a non-empty list (the explicit grid)")
            for value in values:
                if not contains(spec, value):
                    raise UserError(f"{at}.values: {value!r} is outside the spec ({describe(spec)})")
            spec["values"] = list(values)
        specs[name] = spec
    return specs


def contains(spec, value):
    """Whether `value` is one the spec can produce."""
    kind = spec["type"]
    if kind == "categorical":
        return any(value == c and type(value) is type(c) for c in spec["choices"])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if not spec["low"] <= value <= spec["high"]:
        return False
    return kind != "int" or (isinstance(value, int) and (value - spec["low"]) % spec["step"] == 0)


def describe(spec):
    if spec["type"] == "categorical":
        return f"categorical {spec['choices']}"
    step = f" step {spec['step']}" if spec["type"] == "int" and spec["step"] != 1 else ""
    return f"{spec['type']} [{spec['low']}, {spec['high']}]{step}"


def corners(specs):
    """One value per distinct end or choice of each spec: the trial values to validate up front."""
    out = []
    for name, spec in specs.items():
        values = spec.get("values") or spec.get("choices") or [spec["low"], spec["high"]]
        out.extend({name: value} for value in values)
    return out


def suggest(trial, specs):
    """Ask the trial for one value of every parameter."""
    values = {}
    for name, spec in specs.items():
        kind = spec["type"]
        if kind == "categorical":
            values[name] = trial.suggest_categorical(name, spec["choices"])
        elif kind == "int":
            values[name] = trial.suggest_int(name, spec["low"], spec["high"], step=spec["step"])
        else:
            values[name] = trial.suggest_float(name, spec["low"], spec["high"], log=kind == "loguniform")
    return values


def grid_values(spec, grid_points):
    """The grid of one parameter (see the module docstring for the rule)."""
    if "values" in spec:
        return list(spec["values"])
    kind = spec["type"]
    if kind == "categorical":
        return list(spec["choices"])
    low, high = spec["low"], spec["high"]
    if kind == "int":
        steps = (high - low) // spec["step"]
        if steps + 1 <= grid_points:
            return [low + i * spec["step"] for i in range(steps + 1)]
        picks = sorted({round(i * steps / (grid_points - 1)) for i in range(grid_points)})
        return [low + i * spec["step"] for i in picks]
    if low == high or grid_points == 1:
        return [low] if low == high else [math.sqrt(low * high) if kind == "loguniform" else (low + high) / 2]
    if kind == "uniform":
        inner = [low + (high - low) * i / (grid_points - 1) for i in range(1, grid_points - 1)]
    else:
        ratio = math.log(high / low)
        inner = [low * math.exp(ratio * i / (grid_points - 1)) for i in range(1, grid_points - 1)]
    return [low] + [float(f"{v:.6g}") for v in inner] + [high]


def grid(specs, grid_points):
    return {name: grid_values(spec, grid_points) for name, spec in specs.items()}


def grid_size(specs, grid_points):
    return math.prod(len(v) for v in grid(specs, grid_points).values())


def make_sampler(mode, specs, seed, grid_points=3):
    """bayesian -> TPE, random -> RandomSampler, grid -> GridSampler over `grid(specs)`."""
    import optuna

    if mode == "bayesian":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    if mode == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if mode == "grid":
        return optuna.samplers.GridSampler(grid(specs, grid_points), seed=seed)
    raise UserError(f"search mode must be one of {list(MODES)}, got {mode!r}")


def make_pruner(settings):
    """{type: median|none, n_startup_trials, n_warmup_steps, interval_steps}; steps are the
    trainer's global steps at which eval_loss was reported."""
    import optuna

    if settings["type"] == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=settings["n_startup_trials"],
                                       n_warmup_steps=settings["n_warmup_steps"],
                                       interval_steps=settings["interval_steps"])


_SPLIT = re.compile(r"^train\[(?::(\d+(?:\.\d+)?)%|(\d+(?:\.\d+)?)%:)\]$")


def read_config(path):
    """The original's JSON config -> (specs, fixed overrides of the training keys)."""
    config = read_json(path)
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object with 'search_space' and fixed parameters")
    if "search_space" not in config:
        raise UserError(f"{path}: missing field 'search_space'")
    specs = parse_space(config["search_space"], f"{path}: search_space")
    fixed = {k: v for k, v in config.items() if k not in ("search_space", "train_split", "val_split")}
    ratios = []
    for field in ("train_split", "val_split"):
        if field in config:
            match = _SPLIT.match(str(config[field]).replace(" ", ""))
            if not match:
                raise UserError(f"{path}: {field} {config[field]!r} is not like 'train[:90%]' / 'train[90%:]'")
            share = float(match.group(1) or match.group(2)) / 100
            val = 1 - share if (field == "train_split") == (match.group(1) is not None) else share
            ratios.append(round(val, 6))
    if ratios:
        if len(set(ratios)) > 1:
            raise UserError(f"{path}: train_split and val_split disagree ({config.get('train_split')} vs {config.get('val_split')})")
        fixed["val_ratio"] = ratios[0]
    return specs, fixed

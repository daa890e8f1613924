"""A sweep's SPACE file: one declared JSON Schema (checked by the jsonschema library) for its
shape, value rules for what the generator and Caffe accept, and the study's identity (the space
and the data it ran on), which a study keeps so that a changed space can never join it.

    variants: [tiny, resnet_tiny]          # or one name
    lmdb_dir: data/lmdb                    # relative to the space file's folder, else the repo
    budget: {max_iter: 800, test_interval: 200}
    seed: 0
    params:                                # searchable values, each {type, low/high[, log] | choices}
      base_lr: {type: float, low: 0.001, high: 0.1, log: true}
      augment: {type: categorical, choices: [flip, colour]}
      recipe: {type: categorical, choices: [paper, modern]}
    pruner: {median: {n_startup_trials: 2}}
"""
import json
import os

from . import augment, gen, nets, repo_path, solver as solvers

GEN_PARAMS = ("batch_size", "augment", "solver", "crop", "recipe", "mixup", "cutmix",
              "random_erasing")  # through gen.GenConfig
SOLVER_PARAMS = ("base_lr", "weight_decay", "momentum", "gamma", "stepsize", "ema_decay")  # SolverParameter fields
KINDS = ("float", "int", "categorical")
PRUNERS = ("asha", "median", "threshold", "none")
SAMPLERS = ("tpe", "random", "grid")


class SweepError(Exception):
    """Bad space file or arguments: one line naming the file or field."""


# What each searchable value may be: (kind of value, check, what the check wants).
_number = augment.finite_number
_integer = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
VALUE_RULES = {
    "batch_size": ("int", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "crop": ("int", lambda v: _integer(v) and 1 <= v <= 64, "an integer 1..64"),
    "stepsize": ("int", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "augment": ("choice", lambda v: v in augment.PRESETS, "one of %s" % ", ".join(augment.PRESETS)),
    "solver": ("choice", lambda v: v in solvers.SOLVER_TYPES, "one of %s" % ", ".join(solvers.SOLVER_TYPES)),
    "base_lr": ("float", lambda v: _number(v) and v >= 0, "a number >= 0"),
    "weight_decay": ("float", lambda v: _number(v) and v >= 0, "a number >= 0"),
    "momentum": ("float", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "gamma": ("float", lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "recipe": ("choice", lambda v: v in solvers.RECIPES, "one of %s" % ", ".join(solvers.RECIPES)),
    "mixup": ("float", lambda v: _number(v) and v >= 0, "a number >= 0 (0: off)"),
    "cutmix": ("float", lambda v: _number(v) and v >= 0, "a number >= 0 (0: off)"),
    "random_erasing": ("float", lambda v: _number(v) and 0 <= v <= 1, "a probability in [0, 1] (0: off)"),
    "ema_decay": ("float", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1) (0: off)"),
}

# ---------------------------------------------------------------- the declared shape
PARAM_SCHEMA = {
    "type": "object",
    "properties": {"type": {"enum": list(KINDS)}, "low": {"type": "number"}, "high": {"type": "number"},
                   "log": {"type": "boolean"}, "choices": {"type": "array", "minItems": 1}},
    "required": ["type"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {
        "variants": {"type": "array", "minItems": 1, "items": {"enum": list(nets.VARIANTS)}},
        "lmdb_dir": {"type": "string", "minLength": 1},
        "budget": {"type": "object",
                   "properties": {"max_iter": {"type": "integer", "minimum": 1},
                                  "test_interval": {"type": "integer", "minimum": 1}},
                   "required": ["max_iter", "test_interval"], "additionalProperties": False},
        "seed": {"type": "integer", "minimum": 0, "maximum": 2 ** 31},  # + a worker's pid must stay < 2**32
        "params": {"type": "object", "propertyNames": {"enum": list(VALUE_RULES)},
                   "additionalProperties": PARAM_SCHEMA},
        "pruner": {"type": "object", "propertyNames": {"enum": list(PRUNERS)},
                   "additionalProperties": {"type": ["object", "null"]}},
    },
    "required": ["budget"],
    "additionalProperties": False,
}
_TYPE_WORDS = {"object": "a mapping", "array": "a list", "integer": "an integer", "number": "a number",
               "string": "a string", "boolean": "true or false", "null": "nothing"}


def schema_problem(path, space):
    """The first way `space` breaks SCHEMA, as one line naming the key path, or None."""
    import jsonschema
    validator = jsonschema.Draft202012Validator(SCHEMA)
    error = jsonschema.exceptions.best_match(validator.iter_errors(space))
    return None if error is None else "%s: %s" % (path, _explain(error))


def _explain(error):
    """jsonschema's error as `key.path: what was expected (valid: ...)`."""
    where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    kind, expected = error.validator, error.validator_value
    if kind == "additionalProperties":
        known = list(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(known))
        prefix = "" if where == "(top level)" else where + "."
        return "%s%s: unknown key (valid: %s)" % (prefix, extra[0], ", ".join(known))
    if "propertyNames" in error.absolute_schema_path:  # a key of a mapping whose keys are listed: the error's instance
        valid = error.validator_value if kind == "enum" else expected["enum"]
        return "%s.%s: unknown key (valid: %s)" % (where, error.instance, ", ".join(valid))
    if kind == "required":
        missing = [key for key in expected if key not in error.instance]
        return "%s: missing %s (required: %s)" % (where, missing[0] if missing else "?", ", ".join(expected))
    if kind == "enum":
        return "%s: unknown %r (valid: %s)" % (where, error.instance, ", ".join(map(str, expected)))
    if kind == "type":
        wanted = " or ".join(_TYPE_WORDS.get(t, t) for t in ([expected] if isinstance(expected, str) else expected))
        return "%s: expected %s, got %r%s" % (where, wanted, error.instance, _yaml_number_hint(error.instance))
    if kind in ("minimum", "maximum", "minItems", "minLength"):
        what = {"minimum": "a value >= %s", "maximum": "a value <= %s", "minItems": "at least %s item(s)",
                "minLength": "at least %s character(s)"}
        return "%s: expected %s, got %r" % (where, what[kind] % expected, error.instance)
    return "%s: %s" % (where, error.message)


def _yaml_number_hint(value):
    """YAML 1.1 (PyYAML) reads 1e-3 as text: say how to write it as a number."""
    try:
        float(value) if isinstance(value, str) else None
    except ValueError:
        return ""
    return " (YAML reads %s as text: write it with a point, e.g. 1.0e-3)" % value if isinstance(value, str) else ""


def _whole_numbers(path, space):
    """JSON Schema's integer takes 20.0; Caffe's fields do not."""
    for key in ("max_iter", "test_interval"):
        value = (space.get("budget") or {}).get(key)
        if isinstance(value, float):
            raise SweepError("%s: budget.%s: expected an integer, got %r" % (path, key, value))
    if isinstance(space.get("seed"), float):
        raise SweepError("%s: seed: expected an integer, got %r" % (path, space["seed"]))


# ---------------------------------------------------------------- reading a space
def parse_space(path):
    """Read SPACE and check it: the declared shape, then the values' own rules.
    -> dict with variants, lmdb_dir (absolute), budget, params, pruner, seed, path."""
    import yaml
    try:
        with open(path) as f:
            space = yaml.safe_load(f)  # JSON is YAML too
    except OSError as exc:
        raise SweepError("%s: %s" % (path, exc.strerror))
    except yaml.YAMLError as exc:
        raise SweepError("%s: not YAML/JSON (%s)" % (path, str(exc).splitlines()[0]))
    if isinstance(space, dict) and isinstance(space.get("variants"), str):
        space["variants"] = [space["variants"]]  # one name stands for a list of one
    problem = schema_problem(path, space)
    if problem:
        raise SweepError(problem)
    _whole_numbers(path, space)
    params = space.get("params") or {}
    for name, spec in params.items():
        _check_param(path, name, spec)
    lmdb_dir = resolve_lmdb_dir(space.get("lmdb_dir", gen.DEFAULT_LMDB_DIR), path)
    if not os.path.isfile(os.path.join(lmdb_dir, "manifest.json")):
        raise SweepError("%s: lmdb_dir %s has no manifest.json (run tools/make_lmdb.py first)" % (path, lmdb_dir))
    loaded = {"variants": space.get("variants", ["tiny"]), "lmdb_dir": lmdb_dir, "budget": space["budget"],
              "params": params, "pruner": space.get("pruner") or {}, "seed": space.get("seed", 0),
              "path": os.path.abspath(path)}
    _check_combinations(path, loaded)
    return loaded


def resolve_lmdb_dir(lmdb_dir, space_path):
    """A space's lmdb_dir made absolute: relative to the space file's folder where it is there, else to the repo."""
    if os.path.isabs(lmdb_dir):
        return lmdb_dir
    beside = os.path.join(os.path.dirname(os.path.abspath(space_path)), lmdb_dir)
    return beside if os.path.isdir(beside) else repo_path(lmdb_dir)


def _check_param(path, name, spec):
    """The rules a value's range or choices must meet beyond the schema's shape."""
    where = "%s: params.%s" % (path, name)
    kind, ok, wanted = VALUE_RULES[name]
    if spec["type"] == "categorical":
        if "choices" not in spec:
            raise SweepError("%s: categorical needs a non-empty list of choices" % where)
        bad = [c for c in spec["choices"] if not ok(c)]
        if bad:
            raise SweepError("%s: choice %r is not %s" % (where, bad[0], wanted))
        return
    if kind == "choice":
        raise SweepError("%s: a choice, so type: categorical with choices (%s)" % (where, wanted))
    if kind == "int" and spec["type"] != "int":
        raise SweepError("%s: an integer, so type: int (or categorical)" % where)
    low, high = spec.get("low"), spec.get("high")
    if not all(_number(v) for v in (low, high)) or not low < high:
        raise SweepError("%s: %s needs numbers low < high, got %r and %r" % (where, spec["type"], low, high))
    if not (ok(low) and ok(high)) and not (kind == "int" and ok(int(low)) and ok(int(high))):
        raise SweepError("%s: low and high must be %s, got %r and %r" % (where, wanted, low, high))
    if spec.get("log") and low <= 0:
        raise SweepError("%s: log scale needs low > 0, got %r" % (where, low))


def _check_combinations(path, space):
    """Values that can never work together: Caffe refuses momentum with AdaGrad."""
    solver_choices = space["params"].get("solver", {}).get("choices", [])
    if "adagrad" in solver_choices and "momentum" in space["params"]:
        raise SweepError("%s: params.momentum with solver adagrad: Caffe refuses momentum with AdaGrad; search "
                         "them in separate sweeps" % path)


# ---------------------------------------------------------------- one study, one experiment
def identity(space, sampler=None, pruner=None):
    """What makes a study one experiment: the space's values (a `log: false` as its absence; the
    options of the pruner in use only), the sampler and pruner, and the data it runs on (the
    manifest's fingerprint of the source images and the size they were made to, not the LMDB's
    path, which may move)."""
    with open(os.path.join(space["lmdb_dir"], "manifest.json")) as f:
        manifest = json.load(f)
    params = {name: {k: v for k, v in spec.items() if not (k == "log" and not v)}
              for name, spec in space["params"].items()}
    kept = {"variants": space["variants"], "budget": space["budget"], "params": params, "seed": space["seed"],
            "sampler": sampler, "pruner": {pruner: space["pruner"].get(pruner)} if pruner else space["pruner"],
            "data": manifest.get("source_fingerprint"), "image_size": (manifest.get("settings") or {}).get("size")}
    return json.loads(json.dumps(kept, sort_keys=True))  # what the storage gives back


def differences(stored, current, prefix=""):
    """Dotted key paths whose values differ between two identities."""
    found = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += differences(a, b, prefix + key + ".")
        elif a != b:
            found.append(prefix + key)
    return found

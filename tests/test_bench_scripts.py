"""bench/*.py against the library's current API, without running a benchmark.

The benchmark scripts run by hand, not in CI, so an API change breaks them silently (four
unpacked ``compress_samples`` as 5 values after it returned 6; speed.py wrapped
``onnxprune.api.write_text_atomic`` after writing moved to ``onnxprune.outputs``). Each script is
read, not imported (identity.py runs at import), and every use of onnxprune it names is checked:
``from onnxprune... import X`` (X exists), ``module.attr`` and ``f(module, "attr")`` on an onnxprune
module (the attribute exists), calls of onnxprune functions and classes (the arguments bind to
the signature) and tuple unpacking of a call's result (as many values as its ``tuple[...]``
return annotation). Imports inside ``except`` handlers are fallbacks for older versions and are
skipped; names rebound in a function are not followed.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import types
import typing
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))
_MISSING = object()
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _resolve(dotted: str):
    """The object ``dotted`` names (its longest importable module, then attributes), or _MISSING."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name, _MISSING)
            if obj is _MISSING:
                return _MISSING
        return obj
    return _MISSING


def _ours(dotted: str | None) -> bool:
    return dotted is not None and dotted.split(".")[0] == "onnxprune"


def _in_scope(owner: ast.AST):
    """The nodes of ``owner``'s own scope (not those of functions or classes defined in it)."""
    stack = list(ast.iter_child_nodes(owner))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, _SCOPES):
            stack.extend(ast.iter_child_nodes(node))


def _fixed_tuple_length(fn) -> int | None:
    """n for a ``tuple[A, B, ...]`` return annotation of n fixed items, else None."""
    if not isinstance(fn, (types.FunctionType, types.MethodType)):
        return None
    try:
        returned = typing.get_type_hints(fn).get("return")
    except Exception:       # an annotation that does not evaluate here: nothing to compare with
        return None
    args = typing.get_args(returned)
    if typing.get_origin(returned) is not tuple or not args or Ellipsis in args:
        return None
    return len(args)


def bench_problems(path: Path) -> list[str]:
    """What in the script at ``path`` does not fit the current onnxprune API, one line each."""
    tree = ast.parse(path.read_text(), str(path))
    fallback = {id(n) for h in ast.walk(tree) if isinstance(h, ast.ExceptHandler) for n in ast.walk(h)}
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    problems: list[str] = []

    def say(node, text):
        problems.append(f"{path.name}:{node.lineno}: {text}")

    def check_scope(owner, inherited: dict[str, str]) -> None:
        nodes = list(_in_scope(owner))
        bound = {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        bound |= {n.name for n in nodes if isinstance(n, _SCOPES)}
        if isinstance(owner, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = owner.args
            bound |= {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if x}
        aliases = {k: v for k, v in inherited.items() if k not in bound}
        for node in nodes:
            if id(node) in fallback:
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 0 and _ours(node.module):
                for alias in node.names:
                    if _resolve(f"{node.module}.{alias.name}") is _MISSING:
                        say(node, f"{node.module} has no {alias.name}")
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if _ours(alias.name):
                        if _resolve(alias.name) is _MISSING:
                            say(node, f"no module {alias.name}")
                        aliases[alias.asname or alias.name.split(".")[0]] = \
                            alias.name if alias.asname else alias.name.split(".")[0]

        def dotted(expr) -> str | None:
            if isinstance(expr, ast.Name):
                return aliases.get(expr.id)
            if isinstance(expr, ast.Attribute):
                base = dotted(expr.value)
                return base and f"{base}.{expr.attr}"
            return None

        def module(expr) -> types.ModuleType | None:
            name = dotted(expr)
            obj = _resolve(name) if _ours(name) else None
            return obj if isinstance(obj, types.ModuleType) else None

        for node in nodes:
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                owner_module = module(node.value)
                if owner_module is not None and not hasattr(owner_module, node.attr):
                    say(node, f"{owner_module.__name__} has no attribute {node.attr}")
            if not isinstance(node, ast.Call):
                continue
            # getattr(module, "name"), a wrapper or monkeypatch of module.name: it must exist
            if len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str) \
                    and not (isinstance(node.func, ast.Name) and node.func.id == "hasattr"):
                owner_module = module(node.args[0])
                if owner_module is not None and not hasattr(owner_module, node.args[1].value):
                    say(node, f"{owner_module.__name__} has no attribute {node.args[1].value}")
            name = dotted(node.func)
            if not _ours(name):
                continue
            fn = _resolve(name)
            if fn is _MISSING or not callable(fn):
                continue
            if not any(isinstance(a, ast.Starred) for a in node.args) and all(k.arg for k in node.keywords):
                try:
                    signature = inspect.signature(fn)
                except (TypeError, ValueError):
                    signature = None
                if signature is not None:
                    try:
                        signature.bind(*node.args, **{k.arg: k.value for k in node.keywords})
                    except TypeError as exc:
                        say(node, f"{name}{signature}: {exc}")
            target = parents.get(node)
            expected = _fixed_tuple_length(fn)
            if expected is not None and isinstance(target, ast.Assign) and len(target.targets) == 1 \
                    and isinstance(target.targets[0], (ast.Tuple, ast.List)):
                items = target.targets[0].elts
                starred = any(isinstance(e, ast.Starred) for e in items)
                fixed = len(items) - starred
                if fixed > expected or (not starred and fixed != expected):
                    say(node, f"unpacks {name}(...) into {len(items)}{' (starred)' if starred else ''}, "
                              f"it returns {expected} values")
        for node in nodes:
            if isinstance(node, _SCOPES):
                check_scope(node, aliases)

    check_scope(tree, {})
    return problems


def test_bench_scripts_found():
    assert len(SCRIPTS) > 10 and BENCH / "speed.py" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_bench_script_fits_the_api(script):
    assert bench_problems(script) == []


def test_the_check_finds_drift(tmp_path):
    """Each kind of drift the check exists for is reported (the check is not vacuous)."""
    script = tmp_path / "old.py"
    script.write_text("\n".join([
        "import onnxprune.api as api",
        "from onnxprune.api import compress_samples, nothing_here",
        "from onnxprune.pipeline import Recipe",
        "try:",
        "    from onnxprune.data.samples import open_samples",
        "except ImportError:",
        "    from onnxprune.calibration.readers import open_samples",   # a fallback: not reported
        "",
        "def run(model, recipe, data):",
        "    samples, held_out, _, calib, _ = compress_samples(model, recipe, data)",
        "    samples, *_ = compress_samples(model, recipe, data)",          # fine
        "    getattr(api, 'write_text_atomic')",
        "    api.no_such_function(model)",
        "    return Recipe(passes=(), no_such_field=1)",
        "",
        "def shadowed(api):",
        "    return api.anything",                                             # a parameter, not the module
    ]) + "\n")
    problems = bench_problems(script)
    assert len(problems) == 5, problems
    for line, text in ((2, "onnxprune.api has no nothing_here"), (10, "into 5, it returns 6 values"),
                       (12, "onnxprune.api has no attribute write_text_atomic"),
                       (13, "onnxprune.api has no attribute no_such_function"), (14, "no_such_field")):
        assert any(p.startswith(f"old.py:{line}: ") and text in p for p in problems), (line, problems)

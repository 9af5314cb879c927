"""The API tables (docs/api.md, linked from the README) cannot drift from the code: every signature
they list is the code's own.

Each table row's first cell lists one or more `name(params)` code spans; a name may be qualified
(`models.UNet`, `training.train_step`, `DiscreteSchedule.gamma_step`) and an unqualified name after
a qualified one in the same cell lives in the same module. `(...)` means "parameters not listed".
Parameters are compared by name, order and kind (`*`, `*args`, `**kw`); a default, where the README
gives one, must equal the code's.
"""
import ast
import importlib
import inspect
import pathlib
import re

import jax.numpy as jnp
import pytest

import vdm_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api.md"
WHERE = "docs/api.md"  # how failures name the file
SPAN = re.compile(r"`((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*)\(([^`]*)\)`")
MODULES = {"models": "vdm_jax.models", "training": "vdm_jax.training", "data": "vdm_jax.data",
           "xla_flags": "vdm_jax.xla_flags"}


def api_section() -> str:
    """docs/api.md, all of it: every table in it is an API table."""
    return API.read_text(encoding="utf-8")


def listed_signatures():
    """(qualified name, parameter text, docs/api.md line) for every signature in the API tables."""
    text = api_section()
    rows = []
    for match in re.finditer(r"^\| (.+?) \|", text, re.M):
        line = text.count("\n", 0, match.start()) + 1
        module = None
        for name, params in SPAN.findall(match.group(1)):
            head = name.split(".")[0]
            if head in MODULES:
                module = head
            elif module is not None and not hasattr(vdm_jax, head):
                name = f"{module}.{name}"
            rows.append((name, params, line))
    return rows


def resolve(name: str):
    parts = name.split(".")
    if parts[0] in MODULES:
        obj, parts = importlib.import_module(MODULES[parts[0]]), parts[1:]
    else:
        obj = vdm_jax
    for part in parts:
        obj = getattr(obj, part)
    return obj


def split_params(text: str) -> list[str]:
    """Top-level comma split (brackets and quotes respected)."""
    out, depth, current, quote = [], 0, "", None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(current.strip())
            current = ""
            continue
        current += ch
    return [p for p in out + [current.strip()] if p]


def code_params(obj) -> list[tuple[str, object]]:
    """[(token, default)] of the code's signature: names, '*' before keyword-only ones, '*args', '**kw'."""
    target = obj.__init__ if inspect.isclass(obj) and "Any" in str(inspect.signature(obj)) else obj
    sig = inspect.signature(target)
    params = list(sig.parameters.values())
    if params and params[0].name == "self":  # a constructor or a method looked up on its class
        params = params[1:]
    tokens, star = [], False
    for p in params:
        if p.kind is p.VAR_POSITIONAL:
            tokens.append((f"*{p.name}", p.empty))
            star = True
        elif p.kind is p.VAR_KEYWORD:
            tokens.append((f"**{p.name}", p.empty))
        else:
            if p.kind is p.KEYWORD_ONLY and not star:
                tokens.append(("*", p.empty))
                star = True
            tokens.append((p.name, p.default))
    return tokens


def same_default(readme: str, code) -> bool:
    if readme == "...":
        return code is not inspect.Parameter.empty
    try:
        return ast.literal_eval(readme) == code
    except (ValueError, SyntaxError):  # a name such as float32
        return getattr(jnp, readme, object()) == code


def test_the_api_tables_list_signatures():
    assert len(listed_signatures()) > 60


@pytest.mark.parametrize("name, params, line", listed_signatures(), ids=lambda v: str(v))
def test_listed_signature_is_the_codes(name, params, line):
    if params.strip() == "...":
        return
    try:
        obj = resolve(name)
    except AttributeError:
        pytest.fail(f"{WHERE}:{line}: `{name}` is not a public name of vdm_jax")
    code = code_params(obj)
    listed = [p.split("=", 1) for p in split_params(params)]
    want = [p[0].strip() for p in listed]
    got = [t for t, _ in code]
    assert want == got, f"{WHERE}:{line}: {name}({params}) but the code has {name}({', '.join(got)})"
    defaults = dict(code)
    for p in listed:
        if len(p) == 2:
            assert same_default(p[1].strip(), defaults[p[0].strip()]), (
                f"{WHERE}:{line}: {name}: {p[0].strip()}={p[1].strip()} but the code's default is "
                f"{defaults[p[0].strip()]!r}")


def test_every_public_name_is_in_the_api_tables():
    section = api_section()
    documented = set(re.findall(r"`(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*)[(`= ]", section))
    missing = sorted(set(vdm_jax.__all__) - documented)
    assert not missing, f"{WHERE}'s API tables do not list {missing}"
    models = {"UNet", "UNetConfig", "as_pred_fn", "count_params", "ddpm_cifar10", "vdm_cifar10", "tiny"}
    assert not sorted(models - documented), f"{WHERE}'s API tables do not list models.{sorted(models - documented)}"


def test_the_readme_links_to_the_api_tables():
    assert "](docs/api.md)" in (ROOT / "README.md").read_text(encoding="utf-8")

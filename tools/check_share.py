"""The share of the core's code lines that check arguments, counted from the syntax tree.

    python -m tools.check_share            # the working tree
    python -m tools.check_share --rev 57b5bd9

Code lines: lines holding a token that is neither a comment nor part of a docstring (blank lines
don't count). Check lines, among those:
- every line of a `raise` statement, and of the test of an `if`/`elif` whose body raises;
- the header line of an `except` clause whose body raises;
- every line of a call to `_checks.<anything>` or to a function named `check_*`/`_check_*`;
- the lines of decorators that are `_checks` calls;
- the whole of `vdm_jax/_checks.py`.
"""
from __future__ import annotations

import argparse
import ast
import io
import json
import re
import subprocess
import tokenize

FILES = ("vdm_jax/_checks.py", "vdm_jax/schedules.py", "vdm_jax/diffusion.py", "vdm_jax/pixels.py",
         "vdm_jax/losses.py", "vdm_jax/elbo.py", "vdm_jax/sampling.py", "vdm_jax/variance.py")
_CHECK_NAME = re.compile(r"_?check(_\w*)?$")
_SKIP = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
         tokenize.ENDMARKER, tokenize.ENCODING}


def _span(node) -> set[int]:
    return set(range(node.lineno, node.end_lineno + 1))


def _docstring_lines(tree) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                    first.value.value, str):
                lines |= _span(first)
    return lines


def _raises(body) -> bool:
    return any(isinstance(n, ast.Raise) for stmt in body for n in ast.walk(stmt))


def _is_check_call(node) -> bool:
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    if isinstance(f, ast.Attribute):
        return (isinstance(f.value, ast.Name) and f.value.id == "_checks") or bool(_CHECK_NAME.match(f.attr))
    return isinstance(f, ast.Name) and bool(_CHECK_NAME.match(f.id))


def _check_lines(tree) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) or _is_check_call(node):
            lines |= _span(node)
        elif isinstance(node, ast.If) and _raises(node.body):
            lines |= _span(node.test)
        elif isinstance(node, ast.ExceptHandler) and _raises(node.body):
            lines.add(node.lineno)
    return lines


def count(source: str, whole_file_is_checks: bool = False) -> tuple[int, int]:
    """(code lines, check lines) of one file's source."""
    tree = ast.parse(source)
    code = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in _SKIP:
            code |= set(range(tok.start[0], tok.end[0] + 1))
    code -= _docstring_lines(tree)
    checks = code if whole_file_is_checks else code & _check_lines(tree)
    return len(code), len(checks)


def _read(path: str, rev: str | None) -> str:
    if rev is None:
        with open(path) as f:
            return f.read()
    return subprocess.run(["git", "show", f"{rev}:{path}"], check=True, capture_output=True, text=True).stdout


def measure(rev: str | None = None) -> dict:
    per_file = {}
    for path in FILES:
        code, checks = count(_read(path, rev), whole_file_is_checks=path.endswith("_checks.py"))
        per_file[path] = {"code": code, "checks": checks}
    code = sum(v["code"] for v in per_file.values())
    checks = sum(v["checks"] for v in per_file.values())
    return {"rev": rev or "working tree", "code_lines": code, "check_lines": checks,
            "share": round(checks / code, 3), "files": per_file}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default=None, help="a git revision (default: the working tree)")
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON")
    args = parser.parse_args()
    result = measure(args.rev)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for path, v in result["files"].items():
        print(f"{path:28s} {v['checks']:4d} / {v['code']:4d} = {v['checks'] / max(v['code'], 1):5.1%}")
    print(f"{'core (' + result['rev'] + ')':28s} {result['check_lines']:4d} / {result['code_lines']:4d} = "
          f"{result['share']:5.1%}")


if __name__ == "__main__":
    main()

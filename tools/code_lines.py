"""Size of a package at a git revision: `wc -l` and code lines (not blank, not comments, not docstrings).

    python -m tools.code_lines [REV ...] [--package=vdm_jax/training]

For issue 15's "the training package is smaller": compare revisions of the same package.
"""
from __future__ import annotations

import argparse
import ast
import subprocess


def count(rev: str, package: str) -> tuple[int, int]:
    """(lines, code lines) of the package's .py files at `rev`."""
    names = subprocess.check_output(["git", "ls-tree", "--name-only", rev, package.rstrip("/") + "/"], text=True)
    total = code = 0
    for path in (n for n in names.split() if n.endswith(".py")):
        source = subprocess.check_output(["git", "show", f"{rev}:{path}"], text=True)
        docstrings = set()
        for node in ast.walk(ast.parse(source)):
            body = getattr(node, "body", None)
            if (isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body
                    and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
        lines = source.splitlines()
        total += len(lines)
        code += sum(1 for i, line in enumerate(lines, 1)
                    if line.strip() and not line.strip().startswith("#") and i not in docstrings)
    return total, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revs", nargs="*", default=["HEAD"])
    parser.add_argument("--package", default="vdm_jax/training")
    args = parser.parse_args()
    for rev in args.revs:
        total, code = count(rev, args.package)
        print(f"{rev}: {total} lines, {code} code lines")


if __name__ == "__main__":
    main()

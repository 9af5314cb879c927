"""The README's "Use the functions" example, run as written: the first ```python block under that heading.

    python tests/readme_example.py

CI runs this in an environment with only the core installed (`pip install -e .`); the tests run it
in the dev environment (tests/test_readme_example.py). A traceback names README.md and its lines.
"""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## Use the functions"


def example(readme: pathlib.Path = README, heading: str = HEADING) -> tuple[str, int]:
    """(code, line) of the first ```python block in the section `heading` of `readme`; `line` is
    the README line (from 1) where the code starts."""
    text = readme.read_text(encoding="utf-8")
    section = re.search(rf"^{re.escape(heading)}[ \t]*\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if section is None:
        raise ValueError(f"{readme} has no section {heading!r}")
    block = re.search(r"^```python[ \t]*\n(.*?)^```", section.group(1), re.M | re.S)
    if block is None:
        raise ValueError(f"the section {heading!r} of {readme} has no ```python block")
    start = section.start(1) + block.start(1)
    return block.group(1), text.count("\n", 0, start) + 1


def run(readme: pathlib.Path = README, heading: str = HEADING) -> dict:
    """Executes the example in a fresh namespace and returns that namespace."""
    code, line = example(readme, heading)
    namespace = {"__name__": "__readme__"}
    exec(compile("\n" * (line - 1) + code, str(readme), "exec"), namespace)  # README line numbers
    return namespace


if __name__ == "__main__":
    run()
    print(f"{README.name}: the {HEADING!r} example ran")

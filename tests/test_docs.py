"""The repository's references stay honest (no JAX; reads text files only).

- Every section citation (`§5`, `§5.3`, `§2–4`, `docs/math.md §5`) names a section that docs/math.md has.
- Nothing outside tests/ points outside the repository: no `../shared`, no old `MATH.md` name, no
  relative Markdown link (README.md, docs/*.md) to a file the repository lacks.
- Every "Checked by:" line of docs/math.md names test files (and tests) that exist, and every
  subsection has one.

The scanners take the repository root as an argument, so the sub-tests at the end run them on a
small tree built in tmp_path and check that they catch what they should.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MATH = Path("docs") / "math.md"
S = "\u00a7"  # the section sign, spelled as an escape so that this file's samples are not citations

# Where citations are looked for (README.md, and every .py/.md/.ipynb file under these folders).
CITING = ("README.md", "docs", "vdm_jax", "experiments", "notebooks", "benchmarks", "tests")
# Where nothing may point outside the repository (tests/ may read optional data from ../shared).
INSIDE = ("README.md", "docs", "vdm_jax", "experiments", "notebooks", "benchmarks")
SKIP_DIRS = {".git", "__pycache__", ".ipynb_checkpoints", ".pytest_cache"}
SKIP_UNDER = (Path("benchmarks") / "results",)
SUFFIXES = (".py", ".md", ".ipynb")

_HEADING = re.compile(r"^(#{2,6})[ \t]+(\d+(?:\.\d+)*)\.?[ \t]+\S")
_NUMBER = r"\d+(?:\.\d+)*"
_CITATION = re.compile(S + r"[ \t]?(?P<a>" + _NUMBER + r")(?:(?:[ \t]?[\u2013\u2014][ \t]?|-)(?P<b>" + _NUMBER + r"))?")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?(?P<target>[^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_LINK = re.compile(r"^[ \t]{0,3}\[[^\]\n]+\]:[ \t]*<?(?P<target>\S+?)>?(?:[ \t]+\"[^\"]*\")?[ \t]*$")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
_CHECKED = re.compile(r"^Checked by:(?P<rest>.*)$")
_BACKTICKED = re.compile(r"`([^`]+)`")


# ---------------------------------------------------------------------------------------------
# Parsers (pure functions of text)


def math_sections(text: str) -> list[str]:
    """Section numbers of docs/math.md's numbered headings ('## 5. Title' -> '5', '### 5.3 Title' -> '5.3')."""
    out, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        m = None if fence else _HEADING.match(line)
        if m:
            out.append(m.group(2))
    return out


def expand_range(a: str, b: str | None) -> list[str] | None:
    """The sections a citation names: '5' -> ['5']; '2', '4' -> ['2', '3', '4']; '5.2', '4' -> 5.2..5.4.

    A range whose ends differ above the last level ('4.3–5.2') names its two ends. Returns None for
    a reversed range.
    """
    if b is None:
        return [a]
    pa, pb = a.split("."), b.split(".")
    if len(pb) < len(pa):  # '5.2–4': the end replaces the start's last components
        pb = pa[: len(pa) - len(pb)] + pb
    if len(pa) == len(pb) and pa[:-1] == pb[:-1]:
        lo, hi = int(pa[-1]), int(pb[-1])
        if lo > hi:
            return None
        return [".".join(pa[:-1] + [str(k)]) for k in range(lo, hi + 1)]
    return [a, ".".join(pb)]


def citations(line: str) -> list[tuple[str, list[str] | None]]:
    """(citation as written, sections it names or None if malformed) for each citation in a line."""
    return [(m.group(0), expand_range(m.group("a"), m.group("b"))) for m in _CITATION.finditer(line)]


def outside_references(line: str) -> list[str]:
    """What in a line points outside the repository: '../shared' and the old name 'MATH.md'."""
    found = []
    if "../shared" in line:
        found.append("../shared")
    if "MATH.md" in line:  # case-sensitive: docs/math.md and math.md are the new names
        found.append("MATH.md")
    return found


def markdown_links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of the inline and reference links of a Markdown text, outside code."""
    out, fence = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
            continue
        if fence:
            continue
        line = _CODE_SPAN.sub(lambda m: "", line)
        out += [(n, m.group("target")) for m in _LINK.finditer(line)]
        ref = _REF_LINK.match(line)
        if ref:
            out.append((n, ref.group("target")))
    return out


def local_target(target: str) -> str | None:
    """The file part of a relative link target, or None for URLs and pure anchors."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "//")):
        return None
    path = target.split("#", 1)[0].split("?", 1)[0]
    return path or None


def checked_by_refs(line: str) -> list[str] | None:
    """The test references of a 'Checked by:' line (backticked items under tests/), or None if not one."""
    m = _CHECKED.match(line)
    if not m:
        return None
    return [item.strip() for item in _BACKTICKED.findall(m.group("rest")) if item.strip().startswith("tests/")]


# ---------------------------------------------------------------------------------------------
# Scanners (functions of a repository root)


def _files(root: Path, tops) -> list[Path]:
    out = []
    for top in tops:
        path = root / top
        if path.is_file():
            out.append(path)
            continue
        if not path.is_dir():
            continue
        for f in sorted(path.rglob("*")):
            rel = f.relative_to(root)
            if (f.is_file() and f.suffix in SUFFIXES and not SKIP_DIRS.intersection(rel.parts)
                    and not any(rel.is_relative_to(skip) for skip in SKIP_UNDER)):
                out.append(f)
    return out


def _lines(path: Path) -> list[tuple[str, str]]:
    """(location, text) of every line of a file; a notebook's lines are its cells' sources and text outputs."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".ipynb":
        return [(f"line {n}", line) for n, line in enumerate(text.splitlines(), 1)]
    out = []
    for c, cell in enumerate(json.loads(text).get("cells", []), 1):
        parts = [("source", cell.get("source", ""))]
        for output in cell.get("outputs", []):
            parts.append(("output", output.get("text", "")))
            for value in output.get("data", {}).values():
                if isinstance(value, (str, list)):
                    parts.append(("output", value))
        for kind, value in parts:
            value = "".join(value) if isinstance(value, list) else value
            out += [(f"cell {c} {kind} line {n}", line) for n, line in enumerate(value.splitlines(), 1)]
    return out


def bad_citations(root: Path) -> list[str]:
    """'path: location: citation: why' for every citation of a section docs/math.md does not have."""
    math = root / MATH
    have = set(math_sections(math.read_text(encoding="utf-8"))) if math.is_file() else set()
    bad = []
    for path in _files(root, CITING):
        for where, line in _lines(path):
            for written, sections in citations(line):
                if sections is None:
                    why = "a reversed range"
                else:
                    missing = [s for s in sections if s not in have]
                    if not missing:
                        continue
                    why = f"docs/math.md has no section {', '.join(missing)}"
                bad.append(f"{path.relative_to(root)}: {where}: {written!r}: {why}")
    return bad


def outside_pointers(root: Path) -> list[str]:
    """'path: location: what' for every '../shared' or 'MATH.md' outside tests/."""
    bad = []
    for path in _files(root, INSIDE):
        for where, line in _lines(path):
            for what in outside_references(line):
                bad.append(f"{path.relative_to(root)}: {where}: {what!r} in: {line.strip()[:120]}")
    return bad


def broken_links(root: Path) -> list[str]:
    """'path: line: target: why' for relative links in README.md and docs/*.md that leave the repository
    or name a file it does not have."""
    docs = [root / "README.md"] + sorted((root / "docs").glob("*.md"))
    bad, top = [], root.resolve()
    for doc in docs:
        if not doc.is_file():
            continue
        for n, target in markdown_links(doc.read_text(encoding="utf-8")):
            path = local_target(target)
            if path is None:
                continue
            resolved = (doc.parent / path).resolve()
            if not resolved.is_relative_to(top):
                why = "points outside the repository"
            elif not resolved.exists():
                why = "no such file in the repository"
            else:
                continue
            bad.append(f"{doc.relative_to(root)}: line {n}: link {target!r}: {why}")
    return bad


def _defines(text: str, names: list[str]) -> bool:
    return all(re.search(rf"^[ \t]*(?:async[ \t]+)?(?:def|class)[ \t]+{re.escape(name)}\b", text, re.M)
               for name in names)


def bad_checked_by(root: Path) -> list[str]:
    """Problems with docs/math.md's 'Checked by:' lines: a missing file or test, a line naming none,
    a numbered subsection without exactly one such line."""
    math = root / MATH
    bad, section, counts = [], None, {}
    for n, line in enumerate(math.read_text(encoding="utf-8").splitlines(), 1):
        heading = _HEADING.match(line)
        if heading:
            section = heading.group(2) if len(heading.group(1)) > 2 else None
            if section is not None:
                counts[section] = 0
            continue
        refs = checked_by_refs(line)
        if refs is None:
            continue
        if section is not None:
            counts[section] += 1
        if not refs:
            bad.append(f"{MATH}: line {n}: a 'Checked by:' line that names no test file under tests/")
        for ref in refs:
            path, *names = ref.split("::")
            names = [re.sub(r"\[.*\]$", "", name) for name in names]
            file = root / path
            if not file.is_file():
                bad.append(f"{MATH}: line {n}: Checked by {ref!r}: no file {path}")
            elif names and not _defines(file.read_text(encoding="utf-8"), names):
                bad.append(f"{MATH}: line {n}: Checked by {ref!r}: {path} defines no {'::'.join(names)}")
    bad += [f"{MATH}: section {s} has {k} 'Checked by:' lines (needs exactly one)" for s, k in counts.items() if k != 1]
    return bad


def _report(problems: list[str]) -> str:
    return f"{len(problems)} problem(s):\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# The repository


def test_math_md_has_the_seven_sections_and_consistent_numbers():
    text = (ROOT / MATH).read_text(encoding="utf-8")
    sections = math_sections(text)
    top = [s for s in sections if "." not in s]
    assert top == ["1", "2", "3", "4", "5", "6", "7"], top
    for s in sections:
        if "." in s:
            parent = s.rsplit(".", 1)[0]
            assert parent in sections, f"{MATH}: subsection {s} has no section {parent}"
    assert len(sections) == len(set(sections)), f"{MATH}: a section number is used twice: {sections}"
    for n, line in enumerate(text.splitlines(), 1):
        if re.match(r"^##[ \t]+\d", line):
            assert re.match(r"^## \d+\. \S", line), f"{MATH}: line {n}: write '## n. Title': {line!r}"
        if re.match(r"^###[ \t]+\d", line):
            assert re.match(r"^### \d+\.\d+ \S", line), f"{MATH}: line {n}: write '### n.m Title': {line!r}"


def test_every_citation_names_a_section_of_math_md():
    problems = bad_citations(ROOT)
    assert not problems, _report(problems)


def test_nothing_outside_tests_points_outside_the_repository():
    problems = outside_pointers(ROOT)
    assert not problems, _report(problems)


def test_relative_markdown_links_resolve_inside_the_repository():
    problems = broken_links(ROOT)
    assert not problems, _report(problems)


def test_checked_by_lines_name_existing_tests():
    problems = bad_checked_by(ROOT)
    assert not problems, _report(problems)


# ---------------------------------------------------------------------------------------------
# The parsers and scanners themselves


@pytest.mark.parametrize("line, expected", [
    (f"see {S}5", [("5", ["5"])]),
    (f"(docs/math.md {S}5.3)", [("5.3", ["5.3"])]),
    (f"math.md {S}1 and {S}6.", [("1", ["1"]), ("6", ["6"])]),
    (f"{S}2\u20134", [("2\u20134", ["2", "3", "4"])]),
    (f"{S}2-4", [("2-4", ["2", "3", "4"])]),
    (f"{S}4 \u2013 5", [("4 \u2013 5", ["4", "5"])]),
    (f"{S}5.2\u20135.4", [("5.2\u20135.4", ["5.2", "5.3", "5.4"])]),
    (f"{S}5.2-4", [("5.2-4", ["5.2", "5.3", "5.4"])]),
    (f"{S}4.3\u20135.1", [("4.3\u20135.1", ["4.3", "5.1"])]),
    (f"{S}4-2", [("4-2", None)]),
    (f"{S} 3", [(" 3", ["3"])]),
    (f"| {S} |", []),
    ("no citation 5.3 here", []),
])
def test_citation_parser(line, expected):
    assert [(w[1:], s) for w, s in citations(line)] == expected


def test_math_sections_parser():
    text = "# Title\n## Notation\n## 1. One\n### 1.1 Sub\n```\n## 9. in a code block\n```\n### 1.2 Two\n## 2. Two\n"
    assert math_sections(text) == ["1", "1.1", "1.2", "2"]


@pytest.mark.parametrize("line, expected", [
    ("data in ../shared/data", ["../shared"]),
    ("parents, e.g. ../../shared/data", ["../shared"]),
    (f"(MATH.md {S}5)", ["MATH.md"]),
    (f"(docs/math.md {S}5), math.md", []),
    ("shared/ folder", []),
])
def test_outside_reference_parser(line, expected):
    assert outside_references(line) == expected


def test_markdown_link_parser():
    text = ("[a](docs/math.md#five) ![img](pic.png \"t\") [u](https://x.org/a) [h](#anchor)\n"
            "`[code](not/a/link.md)` and [`MATH.md`](../shared/MATH.md)\n"
            "```\n[in](fence.md)\n```\n"
            "[ref]: notebooks/x.ipynb\n")
    links = markdown_links(text)
    assert links == [(1, "docs/math.md#five"), (1, "pic.png"), (1, "https://x.org/a"), (1, "#anchor"),
                     (2, "../shared/MATH.md"), (6, "notebooks/x.ipynb")]
    assert [local_target(t) for _, t in links] == ["docs/math.md", "pic.png", None, None, "../shared/MATH.md",
                                                   "notebooks/x.ipynb"]


def test_checked_by_parser():
    assert checked_by_refs("Checked by: `tests/test_a.py::test_b`, `tests/m/test_c.py` (`fn` untested)") == [
        "tests/test_a.py::test_b", "tests/m/test_c.py"]
    assert checked_by_refs("Checked by: nothing") == []
    assert checked_by_refs("Not a checked-by line `tests/x.py`") is None


def _write(root: Path, rel: str, text: str):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@pytest.fixture
def fake_repo(tmp_path):
    """A small repository with one problem of each kind (and as many things that are fine)."""
    _write(tmp_path, "docs/math.md",
           "## Notation\n## 1. One\n### 1.1 A\nChecked by: `tests/test_a.py::test_one`\n"
           "### 1.2 B\nChecked by: `tests/test_a.py::test_missing`, `tests/test_gone.py`\n"
           "### 1.3 C\n"
           "## 2. Two\n### 2.1 D\nChecked by: `tests/test_a.py`\nChecked by: `tests/test_a.py`\n"
           f"See {S}1.1 and [the tests](../tests/test_a.py) and [x](missing.md).\n")
    _write(tmp_path, "tests/test_a.py", f'"""Cites {S}1-2 and {S}3; may read ../shared."""\ndef test_one():\n    pass\n')
    _write(tmp_path, "vdm_jax/core.py", f'"""z (docs/math.md {S}2.1), x (MATH.md {S}1.2), y ({S}1.4)."""\n')
    _write(tmp_path, "benchmarks/results/old.md", f"{S}9 ../shared MATH.md\n")
    _write(tmp_path, "README.md", "[ok](docs/math.md#one) [out](../shared/MATH.md) [no](notebooks/none.ipynb)\n")
    nb = {"cells": [{"cell_type": "markdown", "source": [f"# Intro ({S}2)\n", f"more ({S}7)\n"]},
                    {"cell_type": "code", "source": "print(1)", "outputs": [{"text": ["../shared/data\n"]}]}]}
    _write(tmp_path, "notebooks/n.ipynb", json.dumps(nb, ensure_ascii=True))
    return tmp_path


def test_scanners_catch_each_kind_of_problem(fake_repo):
    assert bad_citations(fake_repo) == [
        "vdm_jax/core.py: line 1: '\u00a71.4': docs/math.md has no section 1.4",
        "notebooks/n.ipynb: cell 1 source line 2: '\u00a77': docs/math.md has no section 7",
        "tests/test_a.py: line 1: '\u00a73': docs/math.md has no section 3",
    ]
    assert [p.split(" in: ")[0] for p in outside_pointers(fake_repo)] == [
        "README.md: line 1: '../shared'",
        "README.md: line 1: 'MATH.md'",
        "vdm_jax/core.py: line 1: 'MATH.md'",
        "notebooks/n.ipynb: cell 2 output line 1: '../shared'",
    ]
    assert broken_links(fake_repo) == [
        "README.md: line 1: link '../shared/MATH.md': points outside the repository",
        "README.md: line 1: link 'notebooks/none.ipynb': no such file in the repository",
        "docs/math.md: line 12: link 'missing.md': no such file in the repository",
    ]
    assert bad_checked_by(fake_repo) == [
        "docs/math.md: line 6: Checked by 'tests/test_a.py::test_missing': tests/test_a.py defines no test_missing",
        "docs/math.md: line 6: Checked by 'tests/test_gone.py': no file tests/test_gone.py",
        "docs/math.md: section 1.3 has 0 'Checked by:' lines (needs exactly one)",
        "docs/math.md: section 2.1 has 2 'Checked by:' lines (needs exactly one)",
    ]


def test_scanners_pass_a_clean_repository(fake_repo):
    _write(fake_repo, "docs/math.md", "## 1. One\n### 1.1 A\nChecked by: `tests/test_a.py::test_one`\n"
                                      f"## 2. Two\n### 2.1 B\nChecked by: `tests/test_a.py`\nSee {S}1\u20132.\n")
    _write(fake_repo, "tests/test_a.py", f'"""Cites {S}1-2, {S}2.1; may read ../shared."""\ndef test_one():\n    pass\n')
    _write(fake_repo, "vdm_jax/core.py", f'"""z (docs/math.md {S}2.1)."""\n')
    _write(fake_repo, "README.md", "[ok](docs/math.md#one) [web](https://example.org)\n")
    (fake_repo / "notebooks" / "n.ipynb").unlink()
    assert bad_citations(fake_repo) == []
    assert outside_pointers(fake_repo) == []
    assert broken_links(fake_repo) == []
    assert bad_checked_by(fake_repo) == []

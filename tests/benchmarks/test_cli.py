"""`python -m benchmarks`: one parser over every subcommand; each documented, and every documented
command parses."""
import pathlib
import re
import shlex

import pytest

from benchmarks.__main__ import parser
from benchmarks.common import COMMANDS, MODELS, unet

_ROOT = pathlib.Path(__file__).resolve().parents[2]
_DOCS = [_ROOT / "README.md", *sorted((_ROOT / "docs").glob("*.md"))]
_COMMAND = re.compile(r"python -m benchmarks ([a-z_]+(?: --?[^\s`#]+)*)")


def _documented() -> list[str]:
    return [m.group(1) for path in _DOCS for m in _COMMAND.finditer(path.read_text())]


def test_every_subcommand_is_in_the_table_of_docs_benchmarks_md():
    table = (_ROOT / "docs" / "benchmarks.md").read_text()
    parser()  # (imports every subcommand's module)
    assert len(COMMANDS) == 14
    for name, (fn, _) in COMMANDS.items():
        assert f"| `{name}` |" in table, name
        assert fn.__doc__, name  # (its --help)


@pytest.mark.parametrize("command", sorted(set(_documented())))
def test_every_documented_command_parses(command):
    """Placeholders (`--model=M`, `--convolutions=xla|ynnpack`, `--batches=...`) are left out."""
    words = [w for w in shlex.split(command) if not re.search(r"=([A-Z]|\.\.\.|.*\|)", w)]
    args = parser().parse_args(words)
    assert args.command == words[0]


def test_the_docs_name_most_subcommands_by_their_command():
    assert len({c.split()[0] for c in _documented()}) >= 10


def test_the_registry_builds_every_model():
    sizes = {name: (unet(name).image_size, unet(name).in_channels) for name in MODELS}
    assert sizes["tiny8"] == (8, 1) and sizes["vdm32"] == (32, 3)
    assert unet("vdm32").base_channels == 32 and unet("tiny32", dropout=0.0).dropout == 0.0

"""The README's "Use the functions" example runs as written (tests/readme_example.py, which CI also
runs with only the core installed)."""
import pathlib
import runpy
import subprocess
import sys

import pytest

_RUNNER = pathlib.Path(__file__).resolve().parent / "readme_example.py"
readme_example = runpy.run_path(str(_RUNNER))  # a plain script (tests/ is not a package)

_README = """# Project

## Install

```python
raise AssertionError("another section's block")
```

## Use the functions

Some text.

```bash
echo not python
```

```python
import math
value = math.sqrt(16)
```

```python
raise AssertionError("only the first block runs")
```

## API

```python
raise AssertionError("the next section's block")
```
"""


def test_the_first_python_block_of_the_section_runs(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(_README)
    code, line = readme_example["example"](readme)
    assert code == "import math\nvalue = math.sqrt(16)\n"
    assert _README.splitlines()[line - 1] == "import math"
    assert readme_example["run"](readme)["value"] == 4.0


def test_errors_name_the_readme_and_its_line(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(_README.replace("value = math.sqrt(16)", "value = undefined_name"))
    with pytest.raises(NameError) as info:
        readme_example["run"](readme)
    frame = info.traceback[-1]
    assert pathlib.Path(str(frame.path)) == readme
    assert frame.lineno == _README.splitlines().index("value = math.sqrt(16)")  # pytest counts from 0


def test_a_missing_section_or_block_is_an_error(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n\n## Use the functions\n\nNo code.\n\n## API\n\n```python\npass\n```\n")
    with pytest.raises(ValueError, match="has no ```python block"):
        readme_example["example"](readme)
    with pytest.raises(ValueError, match="has no section '## Nowhere'"):
        readme_example["example"](readme, "## Nowhere")


@pytest.mark.slow(19)
def test_the_readme_example_runs():
    """As CI runs it: `python tests/readme_example.py`, in a fresh interpreter."""
    done = subprocess.run([sys.executable, str(_RUNNER)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

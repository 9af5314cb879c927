"""The notebooks as a user gets them.

- `notebooks/colab_cifar10.ipynb` runs top to bottom in its QUICK mode (8 fake CPU devices, the project's
  smallest run on the offline digits), then a second time on the same work directory, which resumes from
  the first run's checkpoint instead of starting again (as *Run all* does after a Colab disconnect).
- Every notebook's install cell installs vdm_jax with the extras that what the notebook imports needs
  (`vdm_jax.training`, `vdm_jax.data` and `experiments/` need `[train]`: grain, orbax, tensorboardX, ...),
  and checks for a module only `[train]` brings before deciding that nothing is missing.
- The README's "Open in Colab" badge and the notebook's own open the notebook, and its `REPO` default is
  the repository the badge names.

(Every notebook also executes once under `--nbmake`, pyproject.toml; these tests check what that cannot.)
"""
from __future__ import annotations

import ast
import json
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
COLAB = NOTEBOOKS / "colab_cifar10.ipynb"
COLAB_URL = re.compile(r"https://colab\.research\.google\.com/github/(?P<repo>[\w.-]+/[\w.-]+)"
                       r"/blob/(?P<branch>[\w.-]+)/notebooks/colab_cifar10\.ipynb")

# What each extra of pyproject.toml makes importable (distribution -> import name), and what a Colab
# runtime has already (and the project does not install).
IMPORT_NAMES = {"orbax-checkpoint": "orbax", "tensorflow-datasets": "tensorflow_datasets", "grain": "grain",
                "ml-collections": "ml_collections", "absl-py": "absl", "tensorboardX": "tensorboardX",
                "tqdm": "tqdm", "pillow": "PIL", "scikit-learn": "sklearn", "jax": "jax", "flax": "flax",
                "optax": "optax", "chex": "chex", "numpy": "numpy", "diffrax": "diffrax"}
# The project's own modules that need the `[train]` extra (vdm_jax.data and vdm_jax.training import grain, ...).
NEEDS_TRAIN = ("vdm_jax.training", "vdm_jax.data", "experiments")
ON_COLAB = {"matplotlib", "IPython", "google"}


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _distribution(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)


def _cells(path: Path) -> list[str]:
    """The sources of a notebook's code cells."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return ["".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in cells
            if c["cell_type"] == "code"]


def _python(source: str) -> ast.Module:
    """A cell's code as Python: IPython's magics and shell escapes (`%x`, `!x`) become `pass`."""
    return ast.parse(re.sub(r"^([ \t]*)[%!].*$", r"\1pass", source, flags=re.M))


def _text(node) -> str | None:
    """A string literal's text, an f-string's with `{}` for each formatted value; None otherwise."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def imported_modules(sources: list[str]) -> set[str]:
    """Every module a notebook imports: its import statements, the `python -m MODULE` it runs, and the
    imports in the code strings it runs (`python -c "..."`)."""
    found = set()
    for source in sources:
        tree = _python(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.add(node.module)
            elif isinstance(node, (ast.List, ast.Tuple)):
                texts = [_text(e) for e in node.elts]
                found |= {b for a, b in zip(texts, texts[1:]) if a == "-m" and b and b != "pip"}
            text = _text(node)
            if text and isinstance(node, ast.Constant):
                found |= {m for pair in re.findall(r"^\s*(?:import ([\w.]+)|from ([\w.]+) import)", text, re.M)
                          for m in pair if m}
                found |= {m for m in re.findall(r"(?:^|;)\s*import ([\w.]+)", text)}
    return found


def install_cell(sources: list[str]) -> tuple[str, list[str]]:
    """(the install cell's source, the pip targets it installs), for the first code cell that runs pip."""
    for source in sources:
        targets = []
        for node in ast.walk(_python(source)):
            if isinstance(node, (ast.List, ast.Tuple)):
                texts = [_text(e) for e in node.elts]
                if "pip" in texts and "install" in texts:
                    targets.append(texts[-1])
        if targets:
            return source, targets
    raise AssertionError("no code cell runs `pip install`")


def extras_of(target: str | None) -> set[str] | None:
    """The extras a pip target gives vdm_jax: 'vdm-jax[train] @ git+{}' or '{}[train]' (a checkout) -> {'train'};
    None for a target that is not vdm_jax."""
    m = re.match(r"^(?:vdm-jax|\{\})(?:\[(?P<extras>[^\]]*)\])?(?:\s*@\s*git\+\{\}.*)?$", target or "")
    if m is None:
        return None
    return {e.strip() for e in (m.group("extras") or "").split(",") if e.strip()}


def needed_extras(modules: set[str]) -> tuple[set[str], list[str]]:
    """(the extras of vdm_jax the modules need, the modules nothing the install provides)."""
    project = _pyproject()
    core = {IMPORT_NAMES[_distribution(r)] for r in project["dependencies"]}
    train = {IMPORT_NAMES[_distribution(r)] for r in project["optional-dependencies"]["train"]}
    extras, unknown = set(), []
    for module in sorted(modules):
        top = module.split(".")[0]
        if module.startswith(NEEDS_TRAIN) or top in train:
            extras.add("train")
        elif top in core or top == "vdm_jax" or top in ON_COLAB or top in sys.stdlib_module_names:
            continue
        else:
            unknown.append(module)
    return extras, unknown


def _notebooks():
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def test_the_import_table_knows_every_dependency():
    """A dependency added to pyproject.toml's core or `[train]` needs its import name above."""
    project = _pyproject()
    for requirement in project["dependencies"] + project["optional-dependencies"]["train"]:
        assert _distribution(requirement) in IMPORT_NAMES, f"add {requirement!r}'s import name to IMPORT_NAMES"


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.name)
def test_the_install_cell_installs_what_the_notebook_imports(path):
    sources = _cells(path)
    extras, unknown = needed_extras(imported_modules(sources))
    assert not unknown, f"{path.name} imports {unknown}, which neither vdm_jax's install nor Colab provides"
    source, targets = install_cell(sources)
    given = [extras_of(t) for t in targets]
    assert any(g is not None for g in given), f"{path.name}: the install cell installs {targets}, not vdm_jax"
    installed = set().union(*(g for g in given if g is not None))
    assert extras <= installed, (f"{path.name} imports what the extras {sorted(extras)} bring, but its install cell "
                                 f"installs {targets}")
    if "train" in extras:  # `import vdm_jax` works with the core alone, so it cannot tell that [train] is missing
        assert re.search(r"\bgrain\b|\btensorboardX\b", source), (
            f"{path.name}: the install cell must check for a module of [train] (grain, tensorboardX), not only vdm_jax")


def test_the_checks_catch_a_core_only_install():
    """The issue's case: `pip install "vdm-jax @ git+{REPO}"` in a notebook that imports vdm_jax.data."""
    sources = ['REPO = "x"\nimport subprocess, sys\nif "google.colab" in sys.modules:\n'
               '    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"vdm-jax @ git+{REPO}"])',
               "from vdm_jax.data import load_source\n%matplotlib inline"]
    extras, unknown = needed_extras(imported_modules(sources))
    assert (extras, unknown) == ({"train"}, [])
    assert extras_of(install_cell(sources)[1][0]) == set()
    assert extras_of('vdm-jax[train] @ git+{}') == {"train"} and extras_of("{}[train,tf]") == {"train", "tf"}
    assert extras_of("numpy") is None
    assert imported_modules(['run(["-m", "experiments.evaluate", "--fid"])\nPROBE = "import jax; print(1)"']) == {
        "experiments.evaluate", "jax"}


def test_the_badges_open_the_colab_notebook_from_the_repository_of_repo():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    sources = json.loads(COLAB.read_text(encoding="utf-8"))["cells"]
    first = "".join(sources[0]["source"])
    links = [COLAB_URL.search(text) for text in (readme, first)]
    assert all(links), "README.md and the notebook's first cell each need the 'Open in Colab' link"
    assert links[0].group(0) == links[1].group(0)
    repo = re.search(r'REPO = os\.environ\.get\("VDM_JAX_REPO", "https://github\.com/([\w.-]+/[\w.-]+)"\)',
                     install_cell(_cells(COLAB))[0])
    assert repo and repo.group(1) == links[0].group("repo"), "REPO's default is not the badge's repository"


def _execute(path: Path) -> str:
    """Executes a notebook in a fresh kernel (in its folder, as nbmake does); returns its text outputs."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    return "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)


def _train_steps(workdir: Path) -> list[int]:
    records = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
    return [r["step"] for r in records if "steps_per_sec" in r]  # (the training logs')


@pytest.mark.slow(30)
def test_the_colab_notebook_runs_quick_and_a_second_run_resumes(tmp_path, monkeypatch):
    """Two executions of the notebook (each a kernel, a `python -c` probe of JAX and a training process of
    the micro config): 30 s with an empty compilation cache, 20 s with a warm one, on 2 busy cores."""
    workdir = tmp_path / "run"
    monkeypatch.setenv("VDM_JAX_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("VDM_JAX_NOTEBOOK_WORKDIR", str(workdir))

    def checkpoints():
        return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())

    monkeypatch.setenv("VDM_JAX_NOTEBOOK_STEPS", "2")  # a run cut short (a disconnect) ...
    first = _execute(COLAB)
    assert "checkpoints before: none: a new run" in first and "resuming from step" not in first
    assert checkpoints() == [2]
    assert re.search(r"step 2: test bits/dim \d", first), first[-2000:]

    monkeypatch.setenv("VDM_JAX_NOTEBOOK_STEPS", "4")  # ... and Run all again, on the same work directory
    second = _execute(COLAB)
    assert "checkpoints before: [2]: resuming from step 2" in second
    assert f"resuming from step 2 in {workdir}" in second, second[-2000:]  # (what train_and_evaluate says)
    assert checkpoints() == [2, 4]
    assert re.search(r"step 4: test bits/dim \d", second)
    assert "samples at step 4" in second
    steps = _train_steps(workdir)
    assert steps == sorted(set(steps)) and steps[-1] == 4, steps  # steps 3 and 4 continued the run, none was redone


def _cell_defining(name: str) -> str:
    return next(s for s in _cells(COLAB) if re.search(rf"^def {name}\b", s, re.M))


def test_the_colab_settings_table_sizes_the_batch_for_each_runtime():
    """The full (not QUICK) settings, which only a Colab runtime runs: the table's rows and the rule for
    other devices give a global batch that divides over the devices, and every `--config.` key the notebook
    passes is one the schema has."""
    from vdm_jax.training.config import check_key

    namespace = {}
    exec(_cell_defining("runtime_settings"), namespace)  # (defines SETTINGS and runtime_settings only)
    settings = namespace["runtime_settings"]
    assert settings("ddpm", "TPU v2", 8, 7.5)[:3] == (128, False, "auto")  # 16 per core × 8 cores
    assert settings("vdm", "TPU v5 lite", 1, 15.7)[:3] == (128, True, "auto")
    assert settings("vdm", "Tesla T4", 1, 14.7)[:3] == (64, True, "float32")
    assert settings("ddpm", "NVIDIA A100-SXM4-40GB", 1, 39.4)[:3] == (128, False, "auto")
    assert settings("vdm", "NVIDIA H100 80GB HBM3", 1, 79.1)[:3] == (128, False, "auto")  # by the rule
    assert settings("ddpm", "some 8 GiB device", 2, 8.0)[:3] == (32, False, "auto")
    assert settings("small", "TPU v2", 8, 7.5)[:3] == (32, False, "auto")
    for kind, (_, rows, _) in namespace["SETTINGS"].items():
        for variant in ("ddpm", "vdm"):
            batch = settings(variant, kind, 8, 8.0)[0]
            assert batch % 8 == 0 and batch >= 8, (kind, variant, batch)

    keys = set()
    for source in _cells(COLAB):
        for node in ast.walk(_python(source)):
            if isinstance(node, ast.Dict) and any(_text(k) and "." in _text(k) for k in node.keys):
                keys |= {_text(k) for k in node.keys}
            elif isinstance(node, ast.Subscript) and getattr(node.value, "id", None) == "OVERRIDES":
                keys.add(_text(node.slice))
    assert {"data.source", "training.batch_size", "model.remat", "model.dtype", "training.num_steps"} <= keys
    for key in sorted(keys):
        check_key(key)

"""The README and docs/ say what the code does: their examples run, their links resolve, and
docs/cli.md names every flag of every script.

Which python blocks run: every ```python block of README.md, docs/own_model.md (in order,
in one namespace), docs/deployment.md and docs/export.md (against a freshly exported
file). A ```python block anywhere else fails :func:`test_every_python_block_is_run`; write
sketches that cannot run as ```text.
"""

from __future__ import annotations

import ast
import re
import shutil
import unicodedata
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
#: Markdown pages whose python blocks the tests below run.
RUN_PAGES = ("README.md", "docs/own_model.md", "docs/deployment.md", "docs/export.md")


def _pages() -> list[Path]:
    """Every markdown page of the project's documentation."""
    return [README, ROOT / "CHANGELOG.md", *sorted(DOCS.rglob("*.md"))]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def _run(blocks: list[str], path: Path, namespace: dict | None = None) -> dict:
    """Run ``blocks`` in order in one namespace, as a reader pasting them would."""
    namespace = {} if namespace is None else namespace
    with jax.numpy_dtype_promotion("standard"):  # optax.adam, see conftest.py
        for block in blocks:
            exec(compile(block, str(path), "exec"), namespace)  # noqa: S102
    return namespace


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the rest belongs in docs/"


@pytest.mark.slow
def test_readme_constrained_update_example_runs():
    blocks = _python_blocks(README)
    assert len(blocks) == 2, "the README's python: the constrained_update loop, a BatchNorm model"
    assert all(len(b.splitlines()) <= 30 for b in blocks), "the README's examples are short"
    namespace = _run(blocks[:1], README)
    specs, params, cost = namespace["specs"], namespace["params"], namespace["cost"]
    assert cost.exact_bops(params, specs) <= 2e6
    assert namespace["certificate"]["within_budget"]
    assert namespace["opt_state"][-1].infeasible_steps > 0  # it started over budget
    # The user's model with BatchNorm, after the loop (it reuses its images and imports).
    namespace = _run(blocks[1:], README, namespace)
    folded = namespace["params"]
    assert "stem_bn" not in folded and {"kernel", "bias"} <= set(folded["stem"])
    assert [spec.name for spec in namespace["specs"]] == ["stem", "head"]
    assert namespace["certificate"]["within_budget"]


@pytest.mark.slow
def test_own_model_examples_run():
    page = DOCS / "own_model.md"
    blocks = _python_blocks(page)
    assert len(blocks) >= 2, "own_model.md: the optax chain and the several-limits example"
    namespace = _run(blocks[:1], page)
    specs, params, cost = namespace["specs"], namespace["params"], namespace["cost"]
    assert cost.exact_bops(params, specs) <= 2e6
    namespace = _run(blocks[1:], page, namespace)  # several limits, on the same model
    state = namespace["opt_state"][-1]
    assert set(state.cost) == {"bops", "weight_memory_bits", "activation_bits"}


@pytest.fixture(scope="module")
def exported_file(tmp_path_factory) -> Path:
    """A real integer file, from an untrained MLP (cheap), where the docs' snippets look."""
    from cgmq_jax import certify, cost, export, models

    model = models.MLP()
    x = jax.numpy.zeros((1, 28, 28, 1))
    params = model.init(jax.random.key(0), x)["params"]
    specs = cost.layer_specs(model, x)
    root = tmp_path_factory.mktemp("docs_export")
    path = root / "runs" / "mnist" / "model_int.npz"
    path.parent.mkdir(parents=True)
    with jax.numpy_dtype_promotion("standard"):
        export.export(params, model, path, certificate=certify.cost_report(params, specs, 2e7))
    # docs/export.md reads it from a headline run's directory.
    (root / "runs" / "headline_2e6_seed0").mkdir()
    shutil.copy(path, root / "runs" / "headline_2e6_seed0" / "model_int.npz")
    return root


@pytest.mark.parametrize("page", ["docs/deployment.md", "docs/export.md"])
@pytest.mark.slow
def test_numpy_reader_examples_run(page, exported_file, monkeypatch, capsys):
    blocks = _python_blocks(ROOT / page)
    assert blocks, f"{page} has no python example"
    monkeypatch.chdir(exported_file)
    namespace = _run(blocks, ROOT / page)
    assert namespace["bops"] == namespace["header"]["certificate"]["bops"]
    assert "BOPs" in capsys.readouterr().out


def test_every_python_block_is_run():
    unrun = [
        str(page.relative_to(ROOT))
        for page in _pages()
        if _python_blocks(page) and str(page.relative_to(ROOT)) not in RUN_PAGES
    ]
    assert not unrun, f"python blocks no test runs (run them here, or mark them text): {unrun}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in ("L", "N"))
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def _links(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans are not links
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_relative_links_resolve():
    broken = []
    for page in _pages():
        for target in _links(page):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            resolved = (page.parent / file).resolve() if file else page
            where = f"{page.relative_to(ROOT)}: ({target})"
            if ROOT not in resolved.parents and resolved != ROOT:
                broken.append(f"{where} points outside the repository")
            elif not resolved.exists():
                broken.append(f"{where} does not exist")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{where} names no heading of {resolved.name}")
    assert not broken, "\n".join(broken)


def test_docs_name_no_file_outside_the_repository():
    for page in _pages():
        text = page.read_text()
        for outside in ("CGMQ.md", "../shared", "shared/design"):
            assert outside not in text, f"{page.relative_to(ROOT)} mentions {outside}"


def _flags(path: Path) -> set[str]:
    """The ``--flag`` strings of every ``add_argument`` call in a script."""
    flags = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            for arg in node.args:
                if isinstance(arg, ast.Constant) and str(arg.value).startswith("--"):
                    flags.add(arg.value)
    return flags


def _sections(page: Path) -> dict[str, str]:
    """``{heading: text}`` of a page's ``## `` sections."""
    parts = re.split(r"^## (.+)$", page.read_text(), flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _section_name(script: Path) -> str:
    """The docs/cli.md heading of a script: its path, or ``python -m PACKAGE``."""
    if script.name == "__main__.py":
        return "python -m " + ".".join(script.parent.relative_to(ROOT).parts)
    return str(script.relative_to(ROOT))


def test_cli_doc_names_every_flag():
    sections = _sections(DOCS / "cli.md")
    scripts = [
        *sorted((ROOT / "experiments").glob("*.py")),
        *sorted((ROOT / "benchmarks").glob("*.py")),
        *sorted((ROOT / "cgmq_jax").rglob("__main__.py")),
    ]
    missing = []
    for script in scripts:
        flags = _flags(script)
        if not flags:
            continue
        text = sections.get(_section_name(script))
        if text is None:
            missing.append(f"no section '## {_section_name(script)}'")
            continue
        missing += [
            f"{_section_name(script)} {flag}" for flag in sorted(flags) if f"`{flag}`" not in text
        ]
    assert not missing, f"docs/cli.md does not name these flags (add them): {missing}"

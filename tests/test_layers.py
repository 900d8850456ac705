"""The design's layering rules, read from the source with ``ast`` (every import, also those inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mavilt"
MODEL_OR_TRAINING = ("mavilt.tokenizer", "mavilt.llm", "mavilt.train", "mavilt.eval", "mavilt.bundle", "mavilt.pipeline")

# (package folder, imports it must not make, why)
RULES = [
    ("data", MODEL_OR_TRAINING, "the data layer knows no model, no bundle and no training code"),
    ("llm", ("mavilt.train", "mavilt.eval", "mavilt.bundle", "mavilt.pipeline"), "models do not know their trainer"),
    ("tokenizer", ("mavilt.train", "mavilt.eval", "mavilt.llm", "mavilt.bundle", "mavilt.pipeline"),
     "the image tokenizer stands alone"),
    ("", ("jobs", "tune", "serve"), "entry points are thin: the library never imports them"),
]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from mavilt import bundle` imports the submodule mavilt.bundle
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _forbidden(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("folder, forbidden, why", RULES, ids=[r[0] or "library" for r in RULES])
def test_layer_imports(folder, forbidden, why):
    files = sorted((PACKAGE / folder).rglob("*.py"))
    assert files
    bad = [f"{f.relative_to(PACKAGE.parent)} imports {name}" for f in files for name in sorted(imported_modules(f))
           if _forbidden(name, forbidden)]
    assert not bad, f"{why}:\n" + "\n".join(bad)


def test_the_rules_catch_a_violation(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("def g():\n    from mavilt.tokenizer.model import VQGAN\n    import jobs.stage2\n")
    names = imported_modules(f)
    assert _forbidden("mavilt.tokenizer.model", MODEL_OR_TRAINING) and "jobs.stage2" in names


def test_the_checkouts_folders_are_resolved_in_one_module():
    """Only mavilt/paths.py turns this package's location into paths of the checkout (configs, cache)."""
    offenders = []
    for f in sorted(PACKAGE.rglob("*.py")):
        if f.name == "paths.py" and f.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Name) and node.id == "__file__":
                offenders.append(str(f.relative_to(PACKAGE.parent)))
    assert not offenders, offenders


def test_no_library_file_is_over_700_lines():
    long = {str(f.relative_to(PACKAGE.parent)): n for f in PACKAGE.rglob("*.py")
            if (n := len(f.read_text().splitlines())) > 700}
    assert not long, long


def test_files_on_stores_are_opened_in_one_module():
    """Only mavilt/storage.py opens a filesystem (``pyarrow.fs``) or a Parquet file by path: everything else
    takes local paths and URIs alike through it."""
    offenders = [f"{f.relative_to(PACKAGE.parent)} imports {name}" for f in sorted(PACKAGE.rglob("*.py"))
                 if f != PACKAGE / "storage.py"
                 for name in sorted(imported_modules(f)) if _forbidden(name, ("pyarrow.fs", "pyarrow.parquet"))]
    assert not offenders, offenders

"""docs/architecture.md against the code: the module map, the modules it names, and the
feature file's schema-2 names. Fast (no TensorFlow): it reads the source (the attribute
names the writers set, found with :mod:`ast`) and writes one tiny feature file through the
real :class:`featcache.cache.writer.FeatureWriter`.

A new module fails ``test_every_module_is_in_the_module_map`` with its path in the message:
add its row to the module map."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from featcache.cache.reader import PROVENANCE_KEYS
from featcache.cache.writer import FeatureWriter, SplitSpec
from featcache.config import cache_key_fields

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "architecture.md"
PACKAGE = ROOT / "featcache"
#: The modules that put attributes into feature files.
WRITERS = ("extract/run", "cache/writer", "cache/merge", "cache/upgrade", "cache/reader",
           "data/datasets", "data/folders", "cache/activations")


def _page() -> str:
    return PAGE.read_text(encoding="utf-8")


def _section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section (up to the next ``## ``)."""
    m = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"docs/architecture.md has no '## {heading}' section"
    return m.group(1)


def _first_column_names(section: str) -> list[str]:
    """Backticked names in the first column of the section's tables (header rows skipped)."""
    names = []
    for line in section.splitlines():
        if not line.startswith("|") or set(line) <= set("|- "):
            continue
        first = line.split("|")[1]
        names += re.findall(r"`([^`]+)`", first)
    return names


def _modules() -> list[str]:
    return sorted(p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")
                  if "__pycache__" not in p.parts)


def test_every_module_is_in_the_module_map():
    mapped = set(_first_column_names(_section(_page(), "Module map")))
    missing = [m for m in _modules() if m not in mapped]
    assert not missing, (
        "modules missing from the module map of docs/architecture.md (add a row each: "
        "what it does, reads -> writes, may import): " + ", ".join(missing))


def _named_modules(text: str) -> set[str]:
    """Every module the page names: ``featcache/x.py`` paths and dotted ``featcache.x`` names
    (the longest prefix that is a module; a following part must be defined in it)."""
    named = set(re.findall(r"\bfeatcache/[\w/]+\.py\b", text))
    for dotted in re.findall(r"(?<![\w/.])featcache(?:\.\w+)+", text):
        parts = dotted.split(".")
        for i in range(len(parts), 1, -1):
            base = PACKAGE.joinpath(*parts[1:i])
            path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
            if path.is_file():
                rel = path.relative_to(ROOT).as_posix()
                if i < len(parts):   # module.attr: the attribute must be defined there
                    attr = parts[i]
                    src = path.read_text(encoding="utf-8")
                    if not re.search(rf"^\s*(def|class)\s+{attr}\b|^{attr}\s*[:=]|"
                                     rf"^from \S+ import .*\b{attr}\b", src, re.M):
                        named.add(f"{rel} (attribute {attr!r} of {dotted})")
                        break
                named.add(rel)
                break
        else:
            named.add(f"featcache/{parts[1]}.py")
    return named


def test_every_module_the_page_names_exists():
    text = _page()
    bad = sorted(n for n in _named_modules(text) if not (ROOT / n).is_file())
    assert not bad, f"docs/architecture.md names modules that do not exist: {', '.join(bad)}"
    # bare module names in the map's first column are paths too
    mapped = _first_column_names(_section(text, "Module map"))
    assert all(m.startswith("featcache/") and m.endswith(".py") for m in mapped), mapped


def _schema_names() -> set[str]:
    """The page's schema-2 names: backticked first-column entries of the feature-file tables
    (a path counts by its last part; placeholders such as ``<split>`` are skipped)."""
    names = set()
    for entry in _first_column_names(_section(_page(), "The feature file (schema 2)")):
        last = entry.rstrip("/").rsplit("/", 1)[-1]
        if last and "<" not in last:
            names.add(last)
    return names


def _tiny_file(tmp_path) -> Path:
    """A complete two-split feature file with mirrors: index ids and path ids."""
    path = tmp_path / "tiny.h5"
    splits = {"train": SplitSpec(6), "test": SplitSpec(4, ids=[f"c{i}/x{i}.png" for i in range(4)])}
    with FeatureWriter.open(path, attrs={"config_sha256": "0" * 64}, classes=["a", "b"],
                            splits=splits, dim=3, flip=True) as w:
        for split, spec in splits.items():
            X = np.zeros((spec.rows, 3), np.float32)
            w.write(split, X, np.arange(spec.rows) % 2, X)
        w.mark_complete()
    return path


def _file_names(path: Path) -> set[str]:
    """Every dataset, group (but the split groups) and attribute name the file has."""
    names: set[str] = set()
    with h5py.File(path, "r") as f:
        names.update(f.attrs)
        splits = {str(s) for s in f.attrs["splits"]}

        def visit(name, obj):
            leaf = name.rsplit("/", 1)[-1]
            if leaf not in splits:
                names.add(leaf)
            names.update(obj.attrs)
        f.visititems(visit)
    return names


def _source_strings() -> set[str]:
    """Identifiers that occur in the package as string literals or keyword arguments."""
    found: set[str] = set()
    for p in PACKAGE.rglob("*.py"):
        src = p.read_text(encoding="utf-8")
        found.update(re.findall(r"""["'](\w+)["']""", src))
        found.update(re.findall(r"[(,\s](\w+)=", src))
    return found


def _written_attrs() -> set[str]:
    """Attribute names the writers set with a constant name: ``<x>.attrs["name"] = …``,
    ``attrs["name"] = …``, ``attrs.update(name=…)`` and a dataset's ``extra_attrs = {…}``."""
    names: set[str] = set()
    for module in WRITERS:
        tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant) \
                            and isinstance(t.slice.value, str) and (
                                (isinstance(t.value, ast.Attribute) and t.value.attr == "attrs")
                                or (isinstance(t.value, ast.Name) and t.value.id == "attrs")):
                        names.add(t.slice.value)
                    if isinstance(t, ast.Attribute) and t.attr == "extra_attrs" \
                            and isinstance(node.value, ast.Dict):
                        names.update(k.value for k in node.value.keys
                                     if isinstance(k, ast.Constant))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "update" and isinstance(node.func.value, ast.Name) \
                    and node.func.value.id == "attrs":
                names.update(k.arg for k in node.keywords if k.arg)
    return names


def test_schema_names_on_the_page_are_in_the_code(tmp_path):
    page = _schema_names()
    assert {"features", "labels", "ids", "classes", "config_sha256"} <= page, page
    known = (_file_names(_tiny_file(tmp_path)) | set(PROVENANCE_KEYS) | set(cache_key_fields())
             | _written_attrs() | _source_strings())
    stale = sorted(page - known)
    assert not stale, (f"docs/architecture.md lists feature-file names that the code never "
                       f"writes: {', '.join(stale)}")


def test_every_name_a_feature_file_has_is_on_the_page(tmp_path):
    page = _schema_names()
    real = (_file_names(_tiny_file(tmp_path)) | set(PROVENANCE_KEYS) | set(cache_key_fields())
            | _written_attrs())
    assert {"featcache_version", "merged_from", "source_dir"} <= real  # the scan works
    missing = sorted(real - page)
    assert not missing, (f"feature-file names missing from the schema tables of "
                         f"docs/architecture.md: {', '.join(missing)}")


@pytest.mark.parametrize("doc", ["README.md", "docs/architecture.md", "featcache/cache/reader.py"])
def test_no_reference_to_the_missing_design_note(doc):
    assert "DESIGN.md" not in (ROOT / doc).read_text(encoding="utf-8")


def test_readme_links_the_page():
    assert "(docs/architecture.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


# ---------------------------------------------------------------- the map's imports column

#: third-party packages the module map names where a module imports them
NOTABLE = {"h5py": "h5py", "tensorflow": "TensorFlow", "keras": "Keras", "openvino": "OpenVINO",
           "ray": "Ray", "matplotlib": "matplotlib", "scipy": "scipy", "sklearn": "scikit-learn",
           "joblib": "joblib", "threadpoolctl": "threadpoolctl", "PIL": "Pillow", "nncf": "NNCF"}


def _dotted(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_column(path: Path) -> str:
    """What the map's "imports" column says of a module, from its source: the featcache
    modules and notable packages it imports at import time, then (in brackets) those it
    imports only inside functions. ``featcache.`` is left out of the names."""
    modules = {_dotted(p) for p in PACKAGE.rglob("*.py")}
    me = _dotted(path)

    def resolve(name: str) -> str | None:
        if name.split(".")[0] == "featcache":
            while name and name not in modules:
                name = name.rpartition(".")[0]
            return None if name in ("", "featcache", me) else name.removeprefix("featcache.")
        return NOTABLE.get(name.split(".")[0])

    top: set[str] = set()
    lazy: set[str] = set()

    def visit(node, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                 ast.ClassDef, ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [f"{child.module}.{a.name}" for a in child.names]
            for n in names:
                (lazy if inner else top).add(resolve(n))
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    top.discard(None)
    lazy = lazy - top - {None}
    text = ", ".join(sorted(top))
    if lazy:
        text += (", " if text else "") + "(" + ", ".join(sorted(lazy)) + ")"
    return text or "—"


def _map_rows() -> dict[str, list[str]]:
    rows = {}
    for line in _section(_page(), "Module map").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.fullmatch(r"`(featcache/[\w/]+\.py)`", cells[0]) if cells else None
        if m:
            rows[m.group(1)] = cells
    return rows


def test_the_module_maps_imports_are_the_codes():
    """Each row's "imports" column is what the module imports (generated by
    :func:`imports_column`: rewrite the cell with its output when a module's imports change)."""
    wrong = {f: (cells[3], want) for f, cells in _map_rows().items()
             if cells[3] != (want := imports_column(ROOT / f))}
    assert not wrong, "module map rows whose imports column is not the code's " \
        "(row: (page, code)): " + "; ".join(f"{f}: {v}" for f, v in wrong.items())


def test_the_layer_order_is_the_lint_contracts():
    """The Layout section's tree lists the rooms in the order of pyproject.toml's layers
    contract (the one make lint enforces)."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    [layers] = [c["layers"] for c in config["tool"]["importlinter"]["contracts"]
                if c["type"] == "layers"]
    want = [[m.strip().removeprefix("featcache.") for m in layer.split("|")]
            for layer in layers]
    tree = re.search(r"```\nfeatcache/\n(.*?)```", _section(_page(), "Layout"), re.S).group(1)
    got = [[r.strip().rstrip("/").removesuffix(".py")
            for r in re.split(r"\s{2,}", line.strip())[0].split("|")]
           for line in tree.splitlines() if line.strip()]
    assert got == want, f"Layout tree {got} != the layers contract {want}"


# ---------------------------------------------------------------- the README and the links

README_SECTIONS = ["Install", "The two commands", "Your own images", "Fine-tuning",
                   "Python API", "Ship a model", "Results", "Documentation", "Development"]


def test_the_readme_is_short_and_in_the_order_a_user_reads_it():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    assert re.findall(r"^## (.+)$", text, re.M) == README_SECTIONS
    results = _section(text, "Results")
    # its numbers come from one run: the date, the machine and the command are named
    assert re.search(r"Measured on \d{4}-\d\d-\d\d on a .*(CPU|GPU|VM)", results, re.S)
    assert "`/usr/bin/time -v make features heads" in results


@pytest.mark.parametrize("doc", ["README.md", "BENCHMARKS.md",
                                 *sorted(p.relative_to(ROOT).as_posix()
                                         for p in (ROOT / "docs").glob("*.md"))])
def test_relative_links_point_at_files_that_exist(doc):
    path = ROOT / doc
    text = path.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    missing = [t for t in targets if "://" not in t and not (path.parent / t).exists()]
    assert not missing, f"{doc} links to missing files: {missing}"

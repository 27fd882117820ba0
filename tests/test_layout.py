"""The package layout follows the planes of the design: imports run down the planes, never up.

`cli` -> `serve`, `train`, `eval` -> `pipeline` -> `safety`, `metrics` -> `models` -> `core`, `data` -> helpers.
A package may import its own plane and the planes below it; the core math imports nothing of ours but helpers.
"""

import ast
import subprocess
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "unnoise"
PLANES = {
    "checks": 0, "files": 0, "usage": 0,  # helpers that import nothing of ours
    "core": 1, "data": 1,
    "models": 2,
    "metrics": 3, "safety": 3,
    "pipeline": 4,
    "train": 5, "eval": 5, "serve": 5,
    "cli": 6, "cli_safety": 6, "cli_convert": 6, "__init__": 6, "weights": 6,
}  # fmt: skip


def imported_planes(path: Path) -> set[str]:
    """The top-level unnoise modules or packages that ``path`` imports (at any depth in the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "unnoise":
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("unnoise.")}
    return found


def plane_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


FILES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_plane():
    assert {plane_of(path) for path in FILES} <= set(PLANES)
    assert {plane for path in FILES for plane in imported_planes(path)} <= set(PLANES)


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PACKAGE)) for p in FILES])
def test_imports_run_down_the_planes(path):
    mine = plane_of(path)
    upward = {other for other in imported_planes(path) if PLANES[other] > PLANES[mine]}
    assert not upward, f"{path.relative_to(PACKAGE)} ({mine}) imports up into {sorted(upward)}"
    if mine == "core":  # samplers see only D(x, sigma): no network, no data, no pipeline
        assert imported_planes(path) <= {"core", "checks"}


def test_the_check_catches_an_upward_import(tmp_path):
    """The rule can fail: a core module that imports the pipeline is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from unnoise.pipeline import Pipeline\nimport unnoise.serve.app\n")
    assert imported_planes(bad) == {"pipeline", "serve"}
    assert PLANES["pipeline"] > PLANES["core"]


def test_what_make_demo_writes_is_not_tracked():
    """`make demo` writes PNGs into outputs/ of the checkout: git must not offer them for a commit."""
    root = PACKAGE.parent
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "outputs/00000-1.png"], cwd=root, check=False)
    assert ignored.returncode == 0

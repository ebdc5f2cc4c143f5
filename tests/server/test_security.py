"""Security rules: weights are never unpickled, the server binds to loopback by default,
and API keys are compared without short-circuiting."""

import ast
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from server.config import ServerConfig

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [p for pkg in ("engine", "tasks", "server", "compress", "memory_model", "clients") for p in (ROOT / pkg).rglob("*.py")]


def _calls(name: str):
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(name):
                yield path.relative_to(ROOT), node


def test_no_unpickling_anywhere():
    assert SOURCES
    for path, node in _calls("torch.load"):
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        assert kw.get("weights_only") == "True", f"{path}:{node.lineno} torch.load without weights_only=True"
    assert not list(_calls("pickle.load")) and not list(_calls("pickle.loads"))
    for path, node in _calls("AutoModelForCausalLM.from_pretrained"):
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        # a GGUF file is parsed, not unpickled; anything else must be safetensors
        assert "gguf_file" in kw or kw.get("use_safetensors") == "True", f"{path}:{node.lineno}"


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickled_object_in_a_training_state_is_refused(tmp_path):
    from memory_model.checkpoint import load_train_state

    with open(tmp_path / "train_state.pt", "wb") as f:
        pickle.dump({"step": 1, "x": Evil()}, f)
    with pytest.raises(pickle.UnpicklingError):
        load_train_state(tmp_path)
    torch.save({"step": 3, "t": torch.ones(2)}, tmp_path / "train_state.pt")
    assert load_train_state(tmp_path)["step"] == 3


def test_loopback_by_default_and_constant_time_key_compare():
    assert ServerConfig().host == "127.0.0.1"
    from server.__main__ import parse_args

    assert parse_args([])[1].host == "127.0.0.1"
    src = (ROOT / "server" / "app.py").read_text()
    assert "hmac.compare_digest" in src and not re.search(r"token\s*(==|in)\s*cfg\.api_keys", src)

"""Power profiles: the manager's switching rules, and a server whose battery profile serves
the primary model from a second artifact, with fewer threads and fewer hybrid loops."""

import httpx
import pytest
import torch

from clients.bench import main as bench_main
from engine.power import PowerState
from server.config import ServerConfig
from server.profiles import Profile, ProfileManager
from tests.live_server import LiveServer

PLUGGED = Profile("plugged", threads=2, model=None, hybrid_loops=None)
BATTERY = Profile("battery", threads=1, model="small", hybrid_loops=1)


class FakePower:
    def __init__(self, source):
        self.source, self.calls = source, 0

    def __call__(self):
        self.calls += 1
        return PowerState(self.source)


def test_auto_follows_the_power_source_and_polls_lazily():
    power, seen = FakePower("ac"), []
    m = ProfileManager("auto", PLUGGED, BATTERY, poll_s=0.0, detect=power, on_change=lambda a, p: seen.append(a))
    assert m.active.name == "plugged"
    power.source = "battery"
    assert m.refresh().name == "battery" and m.switches == 1
    power.source = "unknown"  # desktop / VM: full power
    assert m.refresh().name == "plugged" and seen[-1] == "plugged"
    slow = ProfileManager("auto", PLUGGED, BATTERY, poll_s=3600, detect=power)
    calls = power.calls
    power.source = "battery"
    assert slow.refresh().name == "plugged" and power.calls == calls  # not re-read within poll_s
    assert slow.set_mode("auto").name == "battery"  # an explicit set re-reads at once


def test_fixed_modes_ignore_the_power_source_and_bad_modes_are_refused():
    m = ProfileManager("battery", PLUGGED, BATTERY, detect=FakePower("ac"))
    assert m.refresh().name == "battery"
    assert m.set_mode("plugged").name == "plugged"
    with pytest.raises(ValueError, match="plugged, battery, auto"):
        m.set_mode("eco")
    with pytest.raises(ValueError):
        ProfileManager("turbo", PLUGGED, BATTERY)


@pytest.fixture(scope="module")
def prof_srv(llama_artifact, gemma_artifact, mm_checkpoint):
    threads = torch.get_num_threads()
    srv = LiveServer(ServerConfig(artifacts=[f"tiny-chat={llama_artifact}"], battery_artifact=f"small={gemma_artifact}",
                                  memory_model=str(mm_checkpoint), max_model_len=1024, threads=2,
                                  battery_threads=1, battery_hybrid_loops=1)).wait()
    yield srv
    srv.close()
    torch.set_num_threads(threads)  # the server ran in this process


def _threads(url) -> int:
    """The worker's torch threads as /metrics reports them (the count is per thread)."""
    line = next(x for x in httpx.get(url + "/metrics").text.splitlines() if x.startswith("hybrid_torch_threads "))
    return int(float(line.split()[1]))


def _chat(url, **extra):
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "What is 2+3?"}], "max_tokens": 4,
            "temperature": 0, **extra}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_battery_profile_switches_artifact_threads_and_loops(prof_srv):
    url = prof_srv.url
    assert httpx.get(url + "/profile").json()["active"] == "plugged"
    r = _chat(url)
    assert r["model"] == "tiny-chat" and r["system_fingerprint"] == "hybrid-llm-plugged"
    assert _threads(url) == 2
    full = _chat(url, hybrid={"loops": 3, "cot_groups": 1, "cot_group_tokens": 4, "condense_tokens": 4})
    assert full["usage"]["hybrid"]["loops"] == 3

    d = httpx.post(url + "/profile", json={"mode": "battery"}).json()
    assert d["mode"] == "battery" and d["active"] == "battery" and d["profiles"]["battery"]["model"] == "small"
    r = _chat(url)
    assert r["model"] == "small" and r["system_fingerprint"] == "hybrid-llm-battery"
    assert _threads(url) == 1
    cards = {c["id"]: c["meta"] for c in httpx.get(url + "/v1/models").json()["data"]}
    assert cards["tiny-chat"]["profile"] == "battery" and cards["tiny-chat"]["served_by"] == "small"
    metrics = httpx.get(url + "/metrics").text
    assert 'hybrid_power_profile{profile="battery"} 1.0' in metrics
    assert 'hybrid_power_profile{profile="plugged"} 0.0' in metrics
    # on battery the hybrid loop runs on the battery artifact, with its loops capped
    capped = _chat(url, hybrid={"loops": 3, "cot_groups": 1, "cot_group_tokens": 4, "condense_tokens": 4})
    assert capped["usage"]["hybrid"]["loops"] == 1

    d = httpx.post(url + "/profile", json={"mode": "plugged"}).json()
    assert d["active"] == "plugged" and _chat(url)["model"] == "tiny-chat" and _threads(url) == 2


def test_profile_endpoint_errors_and_bench_tags(prof_srv, tmp_path):
    r = httpx.post(prof_srv.url + "/profile", json={"mode": "eco"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "mode"
    out = tmp_path / "battery.json"
    try:
        assert bench_main(["--url", prof_srv.url, "--num-prompts", "2", "--input-len", "16", "--output-len", "4",
                           "--warmup", "1", "--profile", "battery", "--out", str(out)]) == 0
    finally:
        httpx.post(prof_srv.url + "/profile", json={"mode": "plugged"})
    import json

    meta = json.loads(out.read_text())["meta"]
    assert meta["profile_requested"] == "battery" and meta["server_profile"]["active"] == "battery"
    assert meta["server_profile"]["power"]["source"] in ("ac", "battery", "unknown")


def test_cli_refuses_a_bad_battery_artifact(llama_artifact, tmp_path, capsys):
    from server.__main__ import main

    assert main(["--artifact", str(llama_artifact), "--battery-artifact", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    clash = f"{llama_artifact.name}={tmp_path}"
    assert main(["--artifact", str(llama_artifact), "--battery-artifact", clash]) == 2
    assert "already used" in capsys.readouterr().err

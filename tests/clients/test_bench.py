"""clients.bench: metric definitions on synthetic streams, arrival processes, power detection,
and full runs (sweep, JSON, PNG, --compare) against the live server."""

import json
import subprocess
import sys

import numpy as np
import pytest

from clients.bench import main as bench_main
from clients.bench_stats import StreamTimer, arrivals, percentile, summarize
from engine.power import from_pmset, from_sysfs


def _chat(content=None, reasoning=None, role=None):
    delta = {k: v for k, v in (("role", role), ("content", content), ("reasoning_content", reasoning)) if v is not None}
    return {"choices": [{"index": 0, "delta": delta}]}


def test_stream_timer_follows_vllm_definitions():
    t = StreamTimer(sent=10.0)
    t.chunk(_chat(role="assistant", content=""), 10.05)  # role chunk before prefill: not a token
    t.chunk(_chat(reasoning="think"), 10.5)  # first token of any kind
    t.chunk(_chat(content="Hel"), 10.7)  # first answer content
    t.chunk(_chat(content=""), 10.8)  # empty delta (held-back bytes): not a token
    t.chunk(_chat(content="lo"), 11.0)
    t.chunk({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5}}, 11.1)
    r = t.finish(11.2)
    assert r.ok and r.text == "Hello"
    assert r.ttft == pytest.approx(0.5) and r.ttft_content == pytest.approx(0.7)
    assert r.itl == pytest.approx([0.2, 0.3])
    assert r.e2el == pytest.approx(1.2)
    assert (r.prompt_tokens, r.output_tokens, r.output_tokens_from_usage) == (7, 5, True)
    assert r.tpot == pytest.approx((1.2 - 0.5) / 4)


def test_stream_timer_counts_chunks_without_usage_and_reports_errors():
    t = StreamTimer(sent=0.0)
    t.chunk({"choices": [{"index": 0, "text": "a"}]}, 0.1)  # /v1/completions shape
    t.chunk({"choices": [{"index": 0, "text": "b"}]}, 0.3)
    r = t.finish(0.4)
    assert r.ok and r.output_tokens == 2 and not r.output_tokens_from_usage and r.tpot == pytest.approx(0.3)
    t = StreamTimer(sent=0.0)
    t.chunk({"error": {"message": "generation failed: boom"}}, 0.1)
    r = t.finish(0.2)
    assert not r.ok and r.error == "generation failed: boom"
    r = StreamTimer(sent=0.0).finish(0.1)
    assert not r.ok and "without a token" in r.error


def test_arrivals_poisson_rate_and_burstiness():
    assert arrivals(5, float("inf")) == [0.0] * 5
    for shape, cv in ((1.0, 1.0), (4.0, 0.5)):
        t = arrivals(4000, rate=10.0, burstiness=shape, seed=1)
        gaps = np.diff(t)
        assert t[0] == 0.0 and gaps.mean() == pytest.approx(0.1, rel=0.05)
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)  # gamma: CV = 1/sqrt(shape)
    assert arrivals(3, 2.0, seed=5) == arrivals(3, 2.0, seed=5)
    with pytest.raises(ValueError):
        arrivals(3, 0.0)


def test_percentile_matches_numpy_and_summary_counts_failures():
    xs = [0.3, 0.1, 0.9, 0.4, 0.5, 0.2, 0.7]
    for p in (0, 50, 90, 99, 100):
        assert percentile(xs, p) == pytest.approx(np.percentile(xs, p))
    good = StreamTimer(0.0)
    good.chunk(_chat(content="x"), 0.2)
    good.chunk({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 4}}, 0.5)
    bad = StreamTimer(0.0)
    bad.r.error = "HTTP 429: busy"
    s = summarize([good.finish(0.5), bad.finish(0.1)], duration=2.0, percentiles=[50, 99])
    assert (s["completed"], s["failed"], s["errors"]) == (1, 1, {"HTTP 429: busy": 1})
    assert s["output_throughput"] == 2.0 and s["total_token_throughput"] == 7.0 and s["request_throughput"] == 0.5
    assert s["ttft_s"]["median"] == pytest.approx(0.2) and s["tpot_s"]["p99"] == pytest.approx(0.1)


def _supply(root, name, **files):
    d = root / name
    d.mkdir(parents=True)
    for k, v in files.items():
        (d / k).write_text(v + "\n")


def test_power_source_from_sysfs(tmp_path):
    laptop = tmp_path / "laptop"
    _supply(laptop, "AC", type="Mains", online="1")
    _supply(laptop, "BAT0", type="Battery", status="Charging", capacity="81", present="1")
    assert from_sysfs(laptop).source == "ac" and from_sysfs(laptop).battery_percent == 81
    (laptop / "AC" / "online").write_text("0\n")
    (laptop / "BAT0" / "status").write_text("Discharging\n")
    assert from_sysfs(laptop).source == "battery"
    mouse = tmp_path / "desktop"  # a wireless mouse's battery is not the machine's
    _supply(mouse, "hidpp_battery_0", type="Battery", status="Discharging", scope="Device", capacity="50")
    assert from_sysfs(mouse).source == "unknown"
    empty = tmp_path / "vm"
    empty.mkdir()
    assert from_sysfs(empty).source == "unknown" and from_sysfs(tmp_path / "missing").source == "unknown"


def test_power_source_from_pmset():
    on_ac = "Now drawing from 'AC Power'\n -InternalBattery-0 (id=123)\t100%; charged; 0:00 remaining present: true"
    on_bat = "Now drawing from 'Battery Power'\n -InternalBattery-0 (id=123)\t64%; discharging; 3:12 remaining"
    assert (from_pmset(on_ac).source, from_pmset(on_ac).battery_percent) == ("ac", 100)
    assert (from_pmset(on_bat).source, from_pmset(on_bat).battery_percent) == ("battery", 64)
    assert from_pmset("").source == "unknown"


def test_bench_sweep_writes_json_and_plot_then_compares(live, tmp_path, capsys):
    out, png = tmp_path / "a.json", tmp_path / "a.png"
    args = ["--url", live.url, "--model", "tiny-chat", "--num-prompts", "3", "--input-len", "24",
            "--output-len", "6", "--concurrency", "1,2", "--warmup", "1", "--label", "tiny"]
    assert bench_main(args + ["--out", str(out), "--plot", str(png)]) == 0
    res = json.loads(out.read_text())
    assert png.stat().st_size > 10_000
    assert [r["concurrency"] for r in res["runs"]] == [1, 2] and res["runs"][0]["request_rate"] == "inf"
    assert [r["prompt_seed"] for r in res["runs"]] == [0, 1]  # new prompts per level: no prefix-cache replay
    assert res["meta"]["client_power"]["source"] in ("ac", "battery", "unknown")
    assert res["meta"]["server_profile"]["active"] == "plugged"
    for run in res["runs"]:
        s = run["summary"]
        assert s["completed"] == 3 and s["failed"] == 0 and s["output_tokens_from_usage"]
        assert s["total_output_tokens"] == 3 * 6  # ignore_eos: exactly output_len each
        for r in run["requests"]:
            assert 0 < r["ttft"] <= r["e2el"] and len(r["itl"]) <= 5
        # prompts sized from the warm-up's measured tokens/word: near the asked 24 tokens
        assert 12 <= s["total_input_tokens"] / 3 <= 48
    # a second result on completions, compared with the first: ratios per shared run
    out_b = tmp_path / "b.json"
    assert bench_main(args[:-1] + ["b", "--endpoint", "completions", "--model", "tiny-base", "--out", str(out_b)]) == 0
    capsys.readouterr()
    assert bench_main(["--compare", str(out), str(out_b), "--plot", str(tmp_path / "cmp.png")]) == 0
    table = capsys.readouterr().out
    assert "A = tiny (server profile plugged" in table and "B = b (" in table
    assert table.count("| TPOT median ms |") == 2 and (tmp_path / "cmp.png").is_file()


def test_bench_cli_errors_are_one_line(tmp_path, live):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "clients.bench", *args], capture_output=True, text=True,
                              timeout=60)

    r = run("--url", "http://127.0.0.1:9", "--num-prompts", "1")
    assert r.returncode == 1 and r.stderr.startswith("error: cannot reach") and r.stderr.count("\n") == 1
    r = run("--url", live.url, "--model", "nope", "--num-prompts", "1")
    assert r.returncode == 1 and "model 'nope' is not served" in r.stderr
    (tmp_path / "x.json").write_text("{}")
    r = run("--compare", str(tmp_path / "x.json"))
    assert r.returncode == 1 and "not a clients.bench result" in r.stderr
    assert run("--concurrency", "0").returncode == 2


def test_empty_run_summary():
    s = summarize([], 1.0, [50])
    assert s["completed"] == 0 and s["ttft_s"] == {"n": 0} and s["output_throughput"] == 0.0

"""Bounded load on loopback: more streaming clients than the queue admits, for a few seconds,
against a server in its own process (so its memory can be read from /proc)."""

import json

from clients.load import main as load_main


def test_concurrent_streams_lose_nothing_and_overflow_is_429(llama_artifact, tmp_path):
    out = tmp_path / "load.json"
    rc = load_main(["--spawn", str(llama_artifact), "--clients", "8", "--seconds", "6", "--max-tokens", "16",
                    "--max-queue", "2", "--max-num-seqs", "2", "--out", str(out)])
    r = json.loads(out.read_text())
    assert rc == 0, r.get("error_samples")  # the samples first: pytest truncates a long dict
    assert r["errors"] == 0 and r["lost"] == 0 and r["error_samples"] == [], r["error_samples"]
    assert r["completed"] >= 5 and r["rejected"] > 0 and r["retry_after_missing"] == 0  # 8 > 2 rows + 2 queued
    assert r["sent"] == r["completed"] + r["rejected"]
    assert r["health_after"] == 200
    assert r["queue_after"] == {"hybrid_requests_waiting": 0.0, "hybrid_requests_running": 0.0}
    # SIGTERM: uvicorn shuts down gracefully, then re-raises the signal (hence -15), no crash
    assert r["server_exit_code"] in (0, -15)
    assert r["rss_mb"]["max"] < r["rss_mb"]["first"] + 100, r["rss_mb"]  # no runaway growth under load

"""One server process against two Ray Serve replicas on this machine, same client, one run.

    python benchmarks/cluster_scaleout.py --artifact artifacts/smollm2-135m-instruct-int8 \
        --out results/cluster_scaleout.json

Both sides get the same totals: `python -m server --threads T --max-num-seqs S` against
`python -m server.cluster --replicas 2 --threads T/2 --max-num-seqs S/2` (Ray's proxy in front).
Runs `clients.bench` (concurrency 1, 4, 8) and a bounded `clients.load` against each, then a
third load run on the cluster during which one replica process is killed (SIGKILL) after a
few seconds: every request must end as completed, 429 or a reported error, none lost, and
the replica must be back afterwards. Last, autoscaling: 1 to 2 replicas under sustained load.
Prints the ratio table (cluster / single).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clients.bench import write_json  # noqa: E402
from clients.launch import ServerProcess  # noqa: E402
from vs_llamacpp import bench_metric, run_bench  # noqa: E402  (this directory is on sys.path)

REPLICA_TITLE = "ServeReplica:hybrid-llm"  # Ray's process title for a replica of server.cluster's app


class ClusterProcess(ServerProcess):
    """`python -m server.cluster ARGS` on a free loopback port (healthy = every replica loaded)."""

    def command(self, args: list[str], log_level: str) -> list[str]:
        return [sys.executable, "-m", "server.cluster", "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", log_level, *args]


def replica_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", REPLICA_TITLE], capture_output=True, text=True).stdout
    return sorted(int(x) for x in out.split())


def load(url: str, a, out: Path) -> dict:
    # exit code 1 means errors or lost requests: recorded in the JSON, judged in the table
    subprocess.run([sys.executable, "-m", "clients.load", "--url", url, "--clients", str(a.clients),
                    "--seconds", str(a.seconds), "--max-tokens", "32", "--out", str(out)], cwd=ROOT)
    return json.loads(out.read_text())


def load_with_kill(url: str, a, out: Path) -> dict:
    """The load run with one replica SIGKILLed `kill_after` seconds in; when it came back."""
    before = replica_pids()
    event: dict = {"replicas_before": before}

    def killer():
        time.sleep(a.kill_after)
        os.kill(before[0], signal.SIGKILL)
        t0 = time.perf_counter()
        event["killed_pid"], event["killed_at_s"] = before[0], a.kill_after
        while time.perf_counter() - t0 < 120:  # Ray starts a replacement replica process
            now = replica_pids()
            if len(now) == len(before) and before[0] not in now:
                event["replacement_process_after_s"] = round(time.perf_counter() - t0, 2)
                break
            time.sleep(0.1)

    t = threading.Thread(target=killer)
    t.start()
    res = load(url, a, out)
    t.join()
    deadline = time.time() + 180
    while len(replica_pids()) < len(before) and time.time() < deadline:
        time.sleep(1)
    event["replicas_after"] = replica_pids()
    ok = [httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": res["model"], "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}).status_code
        for _ in range(8)]
    event["after_recovery_status"] = ok
    return {**res, "fault": event}


def autoscale(a, common: list[str], work: Path) -> dict:
    """`--min-replicas 1 --max-replicas 2 --target-ongoing 1` under a load of `a.clients` streams
    for `a.autoscale_seconds`: when the second replica process appeared, and the load's counts."""
    one = ["--threads", str(max(1, a.threads // 2)), "--max-num-seqs", str(max(1, a.slots // 2))]
    res: dict = {}
    with ClusterProcess([*common, "--min-replicas", "1", "--max-replicas", "2", "--target-ongoing", "1", *one],
                        timeout=600) as srv:
        res["replicas_idle"] = len(replica_pids())
        t0, seen = time.perf_counter(), {}

        def watch():
            while time.perf_counter() - t0 < a.autoscale_seconds:
                if len(replica_pids()) >= 2 and "second_replica_after_s" not in seen:
                    seen["second_replica_after_s"] = round(time.perf_counter() - t0, 1)
                time.sleep(0.5)

        t = threading.Thread(target=watch)
        t.start()
        seconds = a.seconds
        a.seconds = a.autoscale_seconds
        res["load"] = load(srv.url, a, work / "autoscale.json")
        a.seconds = seconds
        t.join()
        res |= seen
        res["replicas_under_load"] = len(replica_pids())
    return res


def table(r: dict, concurrency: list[int]) -> str:
    one, two = r["bench"]["single"], r["bench"]["cluster"]
    rows = ["| | single process | 2 Ray Serve replicas | replicas / single |", "|---|---:|---:|---:|"]
    for c in concurrency:
        for key, name, scale, unit in [("ttft_s.median", "TTFT median", 1000, " ms"),
                                       ("tpot_s.median", "TPOT median", 1000, " ms"),
                                       ("output_throughput", "output tok/s", 1, "")]:
            x, y = bench_metric(one, c, key), bench_metric(two, c, key)
            if x is not None and y is not None:
                rows.append(f"| concurrency {c}: {name} | {x * scale:.1f}{unit} | {y * scale:.1f}{unit} | {y / x:.2f}x |")
    for name in ("single", "cluster", "cluster, one replica killed"):
        ld = r["load"][name]
        rows.append(f"| load {name}: completed / 429 / errors / lost | {ld['completed']} / {ld['rejected']} / "
                    f"{ld['errors']} / {ld['lost']} | tok/s {ld['output_tokens_per_s']:.1f} | |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", default="artifacts/smollm2-135m-instruct-int8")
    p.add_argument("--threads", type=int, default=2, help="total torch threads (split over the replicas)")
    p.add_argument("--slots", type=int, default=8, help="total rows (--max-num-seqs, split over the replicas)")
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--clients", type=int, default=8, help="load test clients")
    p.add_argument("--seconds", type=float, default=40.0, help="each load run")
    p.add_argument("--kill-after", type=float, default=10.0, help="seconds into the fault run")
    p.add_argument("--autoscale-seconds", type=float, default=90.0,
                   help="the autoscaling run's load (Ray waits 30 s of sustained load before scaling up)")
    p.add_argument("--autoscale-only", action="store_true",
                   help="run only the autoscaling check and add it to an existing --out file")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "cluster_scaleout.json")
    a = p.parse_args(argv)
    if replica_pids():
        p.error("replicas of another server.cluster run are alive; stop them first")
    work = Path(tempfile.mkdtemp(prefix="cluster-"))
    conc = [int(x) for x in a.concurrency.split(",")]
    common = ["--artifact", f"m={a.artifact}", "--memory-model", "none", "--max-queue", "16"]
    if a.autoscale_only:
        r = json.loads(a.out.read_text())
        r["autoscale"] = autoscale(a, common, work)
        print("autoscale:", json.dumps({k: v for k, v in r["autoscale"].items() if k != "load"}))
        write_json(r, a.out)
        return 0
    r: dict = {"settings": {k: str(v) for k, v in vars(a).items()}, "bench": {}, "load": {}}
    with ServerProcess([*common, "--threads", str(a.threads), "--max-num-seqs", str(a.slots)]) as one:
        r["bench"]["single"] = run_bench(one.url, "single", conc, a, work / "b1.json")
        r["load"]["single"] = load(one.url, a, work / "l1.json")
    half = ["--threads", str(max(1, a.threads // 2)), "--max-num-seqs", str(max(1, a.slots // 2))]
    t0 = time.perf_counter()
    with ClusterProcess([*common, "--replicas", "2", *half], timeout=600) as two:
        r["cluster_start_s"] = time.perf_counter() - t0
        r["bench"]["cluster"] = run_bench(two.url, "cluster", conc, a, work / "b2.json")
        r["load"]["cluster"] = load(two.url, a, work / "l2.json")
        r["load"]["cluster, one replica killed"] = load_with_kill(two.url, a, work / "l3.json")
    r["autoscale"] = autoscale(a, common, work)
    r["table"] = table(r, conc)
    print(r["table"])
    print("fault:", json.dumps(r["load"]["cluster, one replica killed"]["fault"]))
    write_json(r, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

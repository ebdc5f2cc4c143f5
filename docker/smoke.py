"""Smoke test of the built image (`make docker-smoke`, after `make docker`): runs the container
as it should run in production - non-root, read-only root filesystem with a tmpfs for /tmp
and the home directory, artifacts on a named volume, port on loopback only - waits for
/health, checks that `make serve`'s reasoning LoRA adapter is listed over the default model,
sends one chat completion with the official openai client and one hybrid-loop request, checks
both answers, stops and removes the container. Prints and records the image
size and the start-to-ready time.

    python docker/smoke.py --image hybrid-llm:latest --json results/docker_smoke.json
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

NAME = "hybrid-llm-smoke"


def sh(*cmd: str, check: bool = True) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode:
        raise SystemExit(f"error: {' '.join(cmd[:3])} ...: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if sh("docker", "inspect", "-f", "{{.State.Running}}", NAME, check=False) != "true":
            raise SystemExit(f"error: the container exited:\n{sh('docker', 'logs', NAME, check=False)}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"error: not healthy after {timeout:.0f} s:\n{sh('docker', 'logs', NAME, check=False)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", default="hybrid-llm:latest")
    p.add_argument("--volume", default="hybrid-llm-artifacts")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    from openai import OpenAI

    size = int(sh("docker", "image", "inspect", "-f", "{{.Size}}", a.image))
    port = free_port()
    sh("docker", "rm", "-f", NAME, check=False)
    t_start = time.perf_counter()
    sh("docker", "run", "-d", "--name", NAME, "--read-only", "--tmpfs", "/tmp", "--tmpfs", "/home/app",
       "--user", "10001", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
       "-v", f"{a.volume}:/opt/artifacts", "-p", f"127.0.0.1:{port}:8000", a.image)
    try:
        url = f"http://127.0.0.1:{port}"
        ready_s = wait_ready(url, a.timeout)
        startup_s = time.perf_counter() - t_start
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        models = client.models.list().data
        model = models[0].id
        adapters = [m.id for m in models if (m.model_extra or {}).get("parent") == model]
        if not adapters:  # `make serve`'s setup: the reasoning LoRA adapter over the default model
            raise SystemExit(f"error: no LoRA adapter is served over {model}: {[m.id for m in models]}")
        chat = client.chat.completions.create(model=model, temperature=0, max_tokens=20, messages=[
            {"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
        direct = chat.choices[0].message.content
        if "Paris" not in direct:
            raise SystemExit(f"error: unexpected answer {direct!r}")
        hybrid = client.chat.completions.create(
            model=model, temperature=0, max_tokens=16,
            messages=[{"role": "user", "content": "Sam has 3 apples and buys 4 more. How many apples does he have?"}],
            extra_body={"hybrid": {"loops": 1, "cot_groups": 1, "cot_group_tokens": 24, "condense_tokens": 32}})
        h = hybrid.usage.model_extra.get("hybrid") or {}
        reasoning = getattr(hybrid.choices[0].message, "reasoning_content", None) or ""
        if h.get("loops") != 1 or "[loop 1]" not in reasoning or not hybrid.choices[0].message.content:
            raise SystemExit(f"error: the hybrid request did not run one loop: {hybrid.model_dump()}")
        user = sh("docker", "exec", NAME, "id", "-u")
        writable = subprocess.run(["docker", "exec", NAME, "touch", "/opt/venv/x"], capture_output=True).returncode == 0
    finally:
        logs = sh("docker", "logs", NAME, check=False)
        sh("docker", "rm", "-f", NAME, check=False)
    result = {"image": a.image, "image_size_mb": round(size / 2**20, 1), "start_to_ready_s": round(startup_s, 2),
              "health_wait_s": round(ready_s, 2), "uid": user, "root_fs_writable": writable,
              "adapters": adapters, "direct_answer": direct, "hybrid_answer": hybrid.choices[0].message.content,
              "hybrid_usage": h, "log_tail": logs.splitlines()[-5:]}
    print(json.dumps({k: v for k, v in result.items() if k != "log_tail"}, indent=2))
    if user != "10001" or writable:
        raise SystemExit("error: the container must run as uid 10001 on a read-only root filesystem")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

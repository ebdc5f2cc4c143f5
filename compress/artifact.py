"""Writing the serving artifact (the directory shared by `compress`, the server and the
benchmarks); reading it is `engine.artifact`'s, re-exported here for the writers' callers.

Layout: `model.safetensors` (HF tensor names; float recipes load in plain transformers,
int8 recipes add `<name>_scale` tensors), `config.json`, tokenizer files, and
`manifest.json` with the source, every step and its parameters, dtype/kernel, parameter
count, size, evaluation results and a sha256 per file (tensor names: engine/naming.py). Artifacts are written into a
temp directory next to the target and renamed into place, so readers never see a
half-written one; loading verifies every checksum first.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from engine import naming
from engine.artifact import (  # noqa: F401  (re-exported: compress's callers read and write)
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, FORMAT_VERSION, MANIFEST, PEFT_PREFIX, WEIGHTS, ArtifactError, load_engine_model,
    load_state, read_manifest, sha256_file, verify)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _owner(p: Path, kind: str) -> int | None:
    """The writer pid in `.NAME.tmp-PID-xxxx` / `.NAME.old-PID`, or None."""
    try:
        return int(p.name.rsplit(f".{kind}-", 1)[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def recover_interrupted(out: Path) -> list[str]:
    """Clean up after a writer that was killed (SIGKILL, power loss) mid-way: its temp
    directories are removed; if it died between moving the old artifact aside and moving the
    new one in, the old one is put back. Live writers' files are left alone. Returns what
    was done."""
    done = []
    if not out.parent.is_dir():
        return done
    for p in sorted(out.parent.glob(f".{out.name}.old-*")):
        pid = _owner(p, "old")
        if pid is None or _pid_alive(pid):
            continue
        if not out.exists() and (p / MANIFEST).is_file():
            os.replace(p, out)
            done.append(f"restored {out} from {p.name}")
        else:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name}")
    for p in sorted(out.parent.glob(f".{out.name}.tmp-*")):
        pid = _owner(p, "tmp")
        if pid is not None and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name}")
    return done


def write_artifact(out: Path, fill: Callable[[Path], dict], force: bool = False) -> dict:
    """Create artifact `out` atomically. `fill(tmpdir)` writes the files and returns the
    manifest body; checksums and sizes are added here. Returns the final manifest. A build
    killed earlier leaves only a temp directory, removed here before starting again."""
    out = Path(out)
    recover_interrupted(out)
    if out.exists() and not force:
        raise ArtifactError(f"{out} already exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        manifest = fill(tmp)
        # mkdtemp/safetensors create owner-only modes; artifacts are read by other users
        # (e.g. the non-root server in the Docker image).
        os.chmod(tmp, 0o755)
        written = _files(tmp)
        for p in written:
            os.chmod(p, 0o644)
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in written}
        manifest = {"format_version": FORMAT_VERSION, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    **manifest, "size_bytes": sum(p.stat().st_size for p in written), "files": files}
        _write_json(tmp / MANIFEST, manifest)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def update_manifest(root: Path, **fields) -> dict:
    """Merge fields (e.g. eval results) into the manifest, atomically."""
    manifest = read_manifest(root)
    for k, v in fields.items():
        if isinstance(v, dict) and isinstance(manifest.get(k), dict):
            manifest[k] = {**manifest[k], **v}
        else:
            manifest[k] = v
    _write_json(Path(root) / MANIFEST, manifest)
    return manifest


def split_adapter(state: dict) -> tuple[dict, dict]:
    """(base tensors, adapter tensors) of a recipe state."""
    adapter = {k: v for k, v in state.items() if naming.is_adapter(k)}
    return {k: v for k, v in state.items() if k not in adapter}, adapter


def write_peft_adapter(root: Path, adapter: dict, dtype: str = "float32") -> None:
    """Adapter tensors as PEFT's LoRA files, in the artifact's float dtype. The scaling is
    already folded into B, so every module gets lora_alpha = its rank (scaling 1); ranks may
    differ per module (rank_pattern)."""
    import torch
    from safetensors.torch import save_file

    save_file({PEFT_PREFIX + k: v.to(getattr(torch, dtype)).contiguous() for k, v in adapter.items()},
              str(Path(root) / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    ranks = {naming.adapter_module(k): v.shape[0] for k, v in adapter.items() if k.endswith(naming.ADAPTER_A)}
    r = max(ranks.values())
    pattern = {m: n for m, n in ranks.items() if n != r}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "lora_dropout": 0.0,
              "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}), "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": None,
              "rank_pattern": pattern, "alpha_pattern": pattern}
    (Path(root) / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


ADAPTER_KIND = "lora-adapter"  # manifest `kind` of an exported adapter directory


def export_adapter(artifact: Path, out: Path, force: bool = False) -> dict:
    """The LoRA adapter an artifact keeps (`lora(..., merge=false)`) as a PEFT directory of its own
    (adapter_config.json + adapter_model.safetensors, loadable by peft and by `server
    --lora-modules`), with a manifest: checksums, the source model and the recipe it was trained
    in, and the recipe of the base it is served over (the artifact's steps without the lora one).
    Written atomically, like an artifact."""
    artifact = Path(artifact)
    manifest = verify(artifact)
    if not (artifact / ADAPTER_WEIGHTS).is_file():
        raise ArtifactError(f"{artifact} keeps no adapter: build it with lora(..., merge=false)")
    steps = manifest.get("steps", [])

    def fill(tmp: Path) -> dict:
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            shutil.copyfile(artifact / name, tmp / name)
        return {"kind": ADAPTER_KIND, "source": manifest.get("source"), "recipe": manifest.get("recipe"),
                "base_steps": [s["name"] for s in steps if s.get("name") != "lora"],
                "lora": [s for s in steps if s.get("name") == "lora"], "adapter": manifest.get("adapter"),
                "exported_from": artifact.name}
    return write_artifact(out, fill, force)


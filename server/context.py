"""What every endpoint shares: the loaded models, the one generation worker, metrics,
power profiles and the optional memory model; plus model lookup and the model list."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.batching import BatchConfig
from engine.prefix_cache import PrefixCache
from engine.runner import LoadedModel

from . import protocol as P
from .config import ServerConfig
from .errors import APIError
from .metrics import Metrics
from .profiles import Profile, ProfileManager
from .scheduler import Scheduler


def default_profiles(cfg: ServerConfig, metrics: Metrics | None = None) -> ProfileManager:
    """plugged = the configured threads (or torch's startup count), the primary artifact, the
    configured loops; battery = half the threads, the battery artifact, `battery_hybrid_loops`."""
    full = cfg.threads or torch.get_num_threads()
    plugged = Profile("plugged", threads=full, model=None, hybrid_loops=None)
    battery = Profile("battery", threads=cfg.battery_threads or max(1, full // 2), model=cfg.battery_model(),
                      hybrid_loops=cfg.battery_hybrid_loops or None)
    return ProfileManager(cfg.profile, plugged, battery, cfg.power_poll_s,
                          on_change=metrics.set_profile if metrics else (lambda a, p: None))


@dataclass
class ServingContext:
    models: dict[str, LoadedModel]  # name -> artifact; the first is the primary model
    cfg: ServerConfig
    metrics: Metrics
    profiles: ProfileManager
    scheduler: Scheduler
    memory: object = None  # memory_model.condense.MemoryModel, or None: no hybrid loop

    @classmethod
    def create(cls, models: dict[str, LoadedModel], cfg: ServerConfig, metrics: Metrics, memory=None,
               profiles: ProfileManager | None = None) -> ServingContext:
        prefix = PrefixCache(cfg.prefix_cache_mb * 2**20) if cfg.prefix_cache_mb > 0 else None
        metrics.watch_prefix_cache(prefix)
        batch = BatchConfig(cfg.max_num_seqs, cfg.prefill_chunk, cfg.compile)
        return cls(models, cfg, metrics, profiles or default_profiles(cfg, metrics),
                   Scheduler(cfg.max_queue, metrics.set_queue_state, batch, prefix), memory)

    @property
    def default_model(self) -> str:
        return next(iter(self.models))

    def model_for(self, name: str) -> LoadedModel:
        """The artifact serving `name`: on battery, requests for the primary model go to the
        battery artifact when one is configured (the response's `model` names it, as OpenAI
        names the snapshot that answered)."""
        prof = self.profiles.refresh()  # one read: a concurrent switch cannot split it
        if name == self.default_model and prof.model:
            return self.models[prof.model]
        if name in self.models:
            return self.models[name]
        raise APIError(404, f"The model '{name}' does not exist; available: {', '.join(self.models)}",
                       param="model", code="model_not_found")

    def hybrid_model(self, lm: LoadedModel) -> LoadedModel:
        """The model the hybrid loop's large-model stages run on: with --hybrid-adapter, the
        default model's weights through that adapter (under the same name); else `lm`."""
        name = self.cfg.hybrid_adapter
        if name is None or lm.adapter is not None or name not in getattr(lm.model, "adapter_bank", ()):
            return lm
        return lm.with_adapter(lm.name, name)

    def model_list(self) -> P.ModelList:
        prof, adapters = self.profiles.refresh(), self.cfg.adapter_paths()
        return P.ModelList(data=[
            P.ModelCard(id=name, created=int(lm.path.stat().st_mtime), max_model_len=lm.max_model_len,
                        parent=self._base_name(lm),
                        meta={"arch": lm.manifest.get("arch"), "model_type": lm.manifest.get("model_type"),
                              "recipe": lm.manifest.get("recipe"), "quantization": _quantization(lm.manifest),
                              "source": _source(lm.manifest),
                              "backend": lm.manifest.get("backend", "torch"),
                              "dtype": lm.manifest.get("dtype"), "chat_template": lm.has_chat_template,
                              "n_params": lm.manifest.get("n_params"), "profile": prof.name,
                              "profile_mode": self.profiles.mode,
                              "served_by": (prof.model or name) if name == self.default_model else name,
                              **({"adapter": str(adapters[name])} if lm.adapter else {})})
            for name, lm in self.models.items()])

    def _base_name(self, lm: LoadedModel) -> str | None:
        """vLLM's `parent`: the model an adapter's name runs on; None for a model itself."""
        if lm.adapter is None:
            return None
        return next(n for n, m in self.models.items() if m.model is lm.model and m.adapter is None)


def _quantization(manifest: dict) -> str:
    """What the weights are stored as: the recipe's last precision step (with the int8 kernel,
    or GPTQ's bits), else the float dtype."""
    kernel = manifest.get("int8_kernel")
    for st in reversed(manifest.get("steps", [])):
        name = str(st.get("name", ""))
        if name == "gptq":
            return f"gptq-int{st.get('params', {}).get('bits', 4)}"
        if name.startswith("int8") or name == "chai-quant":
            return f"{name} ({kernel})" if kernel else name
    return manifest.get("dtype") or "float32"


def _source(manifest: dict) -> dict:
    """Where the weights came from: the packaged or local GGUF file (name + sha256) or HF directory."""
    src = manifest.get("source") or {}
    keys = ("name", "distribution", "version", "gguf_file", "gguf_sha256", "model_dir")
    return {k: src[k] for k in keys if src.get(k)}

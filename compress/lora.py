"""LoRA recovery fine-tune (Hu et al. 2021) with peft, optionally distilled from the source model.

`lora(r=8, alpha=16, dropout=0.1, targets=attn, steps=100, lr=2e-4, kd=0.0, merge=true)`
trains rank-r adapters on the selected projections of the model as it stands in the recipe
(after depth/width pruning, to win back what pruning lost) on the calibration split (never
the held-out evaluation text), with the base weights frozen:

- loss: next-token cross-entropy, or with kd > 0 the mix (1-kd)·CE + kd·T²·KL(teacher‖student)
  at temperature T against the unpruned source model's logits (knowledge distillation);
- merge=true folds W += (alpha/r)·B·A into the weights for serving. If the base is sparse
  (WANDA), the update is masked to the kept weights (keep_mask=true), so an N:M pattern
  survives the merge; keep_mask=false densifies the matrices instead;
- merge=false keeps the adapter: stored as PEFT's adapter_model.safetensors next to the
  base weights (loadable by peft), and added by the engine at serving time.

`data=svamp-train` fine-tunes on a task instead (compress/task_data.py): each SVAMP training
problem's chain-of-thought, written from its equation, as the reply to the CoT prompt the
server sends, with the loss on the reply only (the large model learns to reason in the
style the hybrid loop cuts into groups). svamp-dev and GSM8K are refused: never trained on.

The model is trained as a plain transformers model wrapped by peft (what a user of peft
would do), then the adapters are read back into the recipe's state dict.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine import naming

from .calibration import training_windows
from .chai import hf_chai_model
from .select import layer_set
from .sensitivity import layer_sensitivity, select_layers
from .step import RecipeError, Step
from .task_data import TASKS, collate, task_examples, whole_sentences
from .wanda import pruned_mask

TARGET_GROUPS = {"attn": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}
TARGET_GROUPS["all"] = TARGET_GROUPS["attn"] + TARGET_GROUPS["mlp"]


def hf_model_from_state(config: dict, state: dict[str, torch.Tensor]):
    """A transformers causal LM with this config and (float) state, on the CPU in fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.get("model_type") == "phi3":  # transformers' Phi-3 fuses qkv / gate_up; our state splits them
        raise RecipeError("lora: Phi-3 is not supported by the LoRA / KD steps (transformers' Phi3 modules fuse "
                          "qkv_proj and gate_up_proj, which the engine's artifacts store split)")
    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k not in ("quantization_config",)})
    cfg.dtype = torch.float32
    if config.get("chai_representatives"):  # CHAI-Target / CHAI-KD: train the clustered model itself
        model = hf_chai_model(cfg, config["chai_representatives"])
    else:
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise RecipeError(f"lora: state does not match the architecture (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    model.tie_weights()
    return model


def _kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                    reduction="batchmean") * t * t


@dataclass
class LoRAStep(Step):
    r: int = 8  # adapter rank
    alpha: float = 16.0  # scaling alpha / r
    dropout: float = 0.1
    targets: str = "attn"  # attn, mlp, all, or projection names joined by '+'
    steps: int = 100
    batch: int = 2
    seq_len: int = 256
    lr: float = 2e-4
    kd: float = 0.0  # weight of the distillation term (0 = plain cross-entropy)
    temperature: float = 2.0  # distillation temperature
    merge: bool = True  # fold into the weights (True) or keep as an adapter
    keep_mask: bool = True  # when merging into a sparse base, keep its zeros
    layers: str = "all"  # "all", explicit ("0-5", "2+7"), or a sensitivity band: high, medium, low (CHAI-Target)
    fraction: float = 0.3  # with a band: the share of layers trained
    metric: str = "perturb"  # with a band: perturb, attention or clusters (compress/sensitivity.py)
    precision: str = "auto"  # "auto" (bf16 autocast where the CPU runs bf16 natively), "bf16" or "fp32"
    seed: int = 0
    data: str = "calibration"  # or a task's training split (svamp-train): supervised CoT replies
    stats: dict = field(default_factory=dict, repr=False)

    name = "lora"

    def _targets(self) -> list[str]:
        names = []
        for t in self.targets.replace("+", ",").split(","):
            names += TARGET_GROUPS.get(t.strip(), [t.strip()])
        unknown = [n for n in names if n not in TARGET_GROUPS["all"]]
        if unknown:
            raise RecipeError(f"lora: unknown target {unknown[0]!r}; use attn, mlp, all or projection names")
        return names

    def _layers(self, state, ctx) -> list[int] | None:
        """None (every layer) or the layer indices to train (CHAI-Target's sensitivity bands)."""
        if self.layers == "all":
            return None
        if self.layers in ("high", "medium", "low"):
            scores = layer_sensitivity(state, ctx, self.metric)
            chosen = select_layers(scores, self.fraction, self.layers)
            self.stats = {"sensitivity": [round(x, 6) for x in scores]}
        else:
            try:
                chosen = sorted(layer_set(self.layers))
            except ValueError:
                raise RecipeError(f"lora: layers must be all, high, medium, low or a list like 0-5; "
                                  f"got {self.layers!r}") from None
        n = ctx["config"]["num_hidden_layers"]
        if not chosen or chosen[-1] >= n:
            raise RecipeError(f"lora: layers {self.layers!r} outside 0..{n - 1}")
        return chosen

    def _check(self, state):
        if self.r < 1 or self.steps < 1 or self.batch < 1:
            raise RecipeError("lora: r, steps and batch must be >= 1")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise RecipeError("lora: precision must be auto, bf16 or fp32")
        if self.data != "calibration" and not all(p in TASKS for p in self.data.split("+")):
            raise RecipeError(f"lora: data must be calibration or one or more of {', '.join(TASKS)} joined "
                              f"by '+'; got {self.data!r}")
        if not 0 <= self.kd <= 1 or not 0 <= self.dropout < 1:
            raise RecipeError("lora: kd must be in [0, 1] and dropout in [0, 1)")
        if any(naming.is_scale(k) or naming.is_gptq_weight(k) or naming.is_lowrank(k) or naming.is_adapter(k)
               for k in state):
            raise RecipeError("lora trains on float weights: put it before int8/gptq/svd/eora "
                              "(e.g. depth -> wanda -> lora -> gptq -> eora)")

    def apply(self, state, ctx):
        from peft import LoraConfig, get_peft_model

        from engine.hardware import autocast

        targets = self._targets()
        self._check(state)
        torch.manual_seed(self.seed)
        config = ctx["config"]
        float_state = {k: v.float() for k, v in state.items()}
        layers = self._layers(state, ctx)
        model = get_peft_model(hf_model_from_state(config, float_state),
                               LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                                          target_modules=targets, bias="none", layers_to_transform=layers))
        teacher = None
        if self.kd > 0:
            from transformers import AutoModelForCausalLM

            teacher = AutoModelForCausalLM.from_pretrained(str(ctx["model_dir"]), dtype=torch.float32,
                                                            use_safetensors=True).eval()
        batches = self._batches(ctx, model)  # before training: chat-replay replies are the model's own
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        model.train()
        losses, t0 = [], time.perf_counter()
        for step in tqdm(range(self.steps), desc="lora", disable=not ctx.get("progress", True)):
            x, mask, labels = batches(step)
            for g in opt.param_groups:  # short warm-up, then cosine decay
                warm = min(1.0, (step + 1) / max(1, self.steps // 10))
                g["lr"] = self.lr * warm * 0.5 * (1 + math.cos(math.pi * step / self.steps))
            with autocast(torch.device("cpu"), self.precision):
                logits = model(input_ids=x, attention_mask=mask).logits[:, :-1].float()
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(input_ids=x, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:].reshape(-1)
            logits = logits.reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(logits, target, ignore_index=-100)
            if teacher is not None:
                keep = target != -100  # distil where the loss is taken (the reply, for task data)
                loss = (1 - self.kd) * loss + self.kd * _kd_loss(logits[keep],
                                                                 t_logits.reshape(-1, t_logits.shape[-1])[keep],
                                                                 self.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
        sensitivity = self.stats.get("sensitivity")
        data_stats = {k: self.stats[k] for k in ("examples", "skipped", "epochs") if k in self.stats}
        state = self._collect(model, dict(state))
        k = max(1, len(losses) // 5)
        self.stats = {**self.stats, **({"sensitivity": sensitivity, "layers_trained": layers} if layers else {}),
                      "data": self.data, **data_stats,
                      "loss_first": round(sum(losses[:k]) / k, 4),
                      "loss_last": round(sum(losses[-k:]) / k, 4), "seconds": round(time.perf_counter() - t0, 1),
                      "tokens": self.steps * self.batch * self.seq_len if self.data == "calibration" else None,
                      "trainable_params": sum(p.numel() for p in params)}
        return state

    def _batches(self, ctx, model) -> Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """step -> (ids, attention mask, labels): calibration windows (loss everywhere), or a
        task's supervised examples (loss on the replies), cycled in a seeded order."""
        if self.data == "calibration":
            seqs = training_windows(ctx, self.steps * self.batch, self.seq_len)

            def window(step):
                x = torch.tensor([seqs[(step * self.batch + i) % len(seqs)] for i in range(self.batch)])
                return x, torch.ones_like(x), x
            return window
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(ctx["model_dir"]))
        examples, skipped = task_examples(tok, self.data, lambda prompts: own_replies(model, tok, prompts))
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(self.seed)).tolist()
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.stats = {**self.stats, "examples": len(examples), "skipped": skipped,
                      "epochs": round(self.steps * self.batch / len(examples), 2)}

        def batch(step):
            rows = [examples[order[(step * self.batch + i) % len(order)]] for i in range(self.batch)]
            return collate(rows, pad)
        return batch

    @torch.no_grad()
    def _collect(self, model, state: dict) -> dict:
        """Read every trained adapter back: merged into the weight, or kept (scaling folded into B)."""
        zeros_before = zeros_after = total = 0
        for path, module in model.named_modules():
            if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
                continue
            mod = path.removeprefix("base_model.model.")
            a = module.lora_A["default"].weight.detach().float()  # (r, in)
            b = module.lora_B["default"].weight.detach().float() * module.scaling["default"]  # (out, r)
            if not self.merge:
                a_name, b_name = naming.adapter_names(mod)
                state[a_name], state[b_name] = a.contiguous(), b.contiguous()
                continue
            key = naming.weight_of(mod)
            w = state[key]
            delta = b @ a
            kept = pruned_mask(w)
            if self.keep_mask and kept is not None:
                delta = delta * kept
            merged = (w.float() + delta).to(w.dtype)
            zeros_before += int((w == 0).sum())
            zeros_after += int((merged == 0).sum())
            total += w.numel()
            state[key] = merged.contiguous()
        if self.merge:
            self.stats = {"merged": True, "sparsity_before": round(zeros_before / max(total, 1), 4),
                          "sparsity_after": round(zeros_after / max(total, 1), 4)}
        else:
            self.stats = {"merged": False}
        return state


@torch.no_grad()
def own_replies(model, tok, prompts: list[str], max_new: int = 96, batch: int = 16) -> list[str | None]:
    """The model's greedy replies to chat prompts, as served (engine.runner.encode_chat), cut to
    whole sentences. peft initialises B = 0, so before training this is the base model."""
    from engine.runner import encode_chat

    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = []
    for i in range(0, len(prompts), batch):
        rows = [encode_chat(tok, [{"role": "user", "content": p}])[0] for p in prompts[i:i + batch]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # left-padded
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             pad_token_id=pad)
        out += [whole_sentences(tok.decode(g[width:], skip_special_tokens=True)) for g in gen]
    model.train()
    return out

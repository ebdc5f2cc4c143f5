"""The interface every compression technique implements, and the error recipes raise.

A step takes an HF-named state dict and returns a new one (gpt-fast's QuantHandler idea:
`apply` creates the compressed state dict; the engine's loader converts it for runtime).
Steps chain left to right (compress/recipes.py parses `--recipe prune,int8`); each records
its parameters in the manifest. This module imports no step, so every step can import it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


class RecipeError(ValueError):
    pass


@dataclass
class Step:
    name = "none"

    @classmethod
    def recipe_names(cls) -> dict[str, dict]:
        """The recipe names this class answers to, each with the fixed keyword arguments it
        implies (int8 -> kernel=weight_only); the registry is built from these."""
        return {cls.name: {}}

    def apply(self, state: dict[str, torch.Tensor], ctx: dict) -> dict[str, torch.Tensor]:
        return state

    def record(self) -> dict:
        params = asdict(self)
        result = params.pop("stats", None)  # what a step measured while running (sparsity, ranks...)
        return {"name": self.name, "params": params, **({"result": result} if result is not None else {})}

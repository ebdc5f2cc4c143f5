"""Recipes: `--recipe 'prune(n_masks=200,layers=0-3),svd(rank=8),int8'` -> a list of steps.

Parsing, the registry of step names and the checks on step order live here; the steps
themselves live in their technique's module (compress/step.py has their interface). The
registry is built from the step classes: each answers to the names its `recipe_names()`
lists, so adding a step means writing its class in one of STEP_MODULES.
"""

from __future__ import annotations

from dataclasses import fields

from . import chai, channels, depth, eora, gptq, lora, precision, prune, qat, smooth, step, wanda
from .chai import ChaiQuantStep
from .gptq import GPTQStep
from .precision import CastStep, Int8StaticStep, Int8Step
from .step import RecipeError, Step

__all__ = ["RecipeError", "Step", "parse_recipe", "registry"]

# Modules whose Step subclasses are recipe steps. Their order (then each module's own class
# order) is the order names are listed in errors, independent of which module was imported first.
STEP_MODULES = (step, precision, prune, channels, depth, wanda, smooth, qat, lora, gptq, eora, chai)


def _subclasses(cls: type) -> list[type]:
    """cls and its subclasses, depth first in definition order."""
    return [cls] + [c for sub in cls.__subclasses__() for c in _subclasses(sub)]


def registry() -> dict[str, tuple[type[Step], dict]]:
    """Recipe name -> (step class, the fixed keyword arguments the name implies)."""
    rank = {m.__name__: i for i, m in enumerate(STEP_MODULES)}
    classes = sorted((c for c in _subclasses(Step) if c.__module__ in rank), key=lambda c: rank[c.__module__])
    return {name: (cls, fixed) for cls in classes for name, fixed in cls.recipe_names().items()}


def _split_top(text: str) -> list[str]:
    """Split on commas outside parentheses: 'prune(n_masks=200,layers=0-3),svd' -> 2 items."""
    parts, level, cur = [], 0, ""
    for ch in text:
        level += ch == "("
        level -= ch == ")"
        if level < 0:
            raise RecipeError(f"unbalanced parentheses in recipe {text!r}")
        if ch == "," and level == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if level:
        raise RecipeError(f"unbalanced parentheses in recipe {text!r}")
    return [p.strip() for p in parts + [cur] if p.strip()]


def _parse_bool(text: str) -> bool:
    # bool("false") is True: spell the accepted words out
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise ValueError(text)


def _make(name: str, args: str, cls: type[Step], fixed: dict) -> Step:
    kwargs = {}
    probe = cls(**fixed)
    # a parameter the step's name already fixes (int8 -> kernel) is not settable
    types = {f.name: type(getattr(probe, f.name)) for f in fields(probe) if f.name not in fixed}
    for item in _split_top(args):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in types or key == "stats":
            raise RecipeError(f"step {name}: unknown parameter {key!r}; known: "
                              f"{', '.join(k for k in types if k != 'stats') or 'none'}")
        try:
            kwargs[key] = _parse_bool(value.strip()) if types[key] is bool else types[key](value.strip())
        except ValueError as e:
            raise RecipeError(f"step {name}: {key}={value.strip()!r} is not a valid {types[key].__name__}") from e
    return cls(**fixed, **kwargs)


def parse_recipe(recipe: str) -> list[Step]:
    """'prune(n_masks=200,layers=0-3),svd(rank=8),int8' -> steps; lists inside a value use '+'."""
    items = _split_top(recipe)
    if not items:
        raise RecipeError("empty recipe")
    steps_by_name = registry()
    steps = []
    for item in items:
        name, _, rest = item.partition("(")
        name = name.strip()
        if name not in steps_by_name:
            raise RecipeError(f"unknown recipe step(s) {name}; known: {', '.join(steps_by_name)}")
        if rest and not rest.endswith(")"):
            raise RecipeError(f"malformed step {item!r}")
        steps.append(_make(name, rest[:-1], *steps_by_name[name]))
    check_order(steps)
    return steps


def check_order(steps: list[Step]) -> None:
    """Refuse step sequences whose result would be wrong or unservable."""
    quant = [s for s in steps if isinstance(s, (CastStep, Int8Step, GPTQStep, ChaiQuantStep))]
    if len(quant) > 1:
        raise RecipeError("a recipe can hold only one precision step (fp16, bf16, int8, int8-dynamic, int8-static, "
                          "gptq or chai-quant)")
    adapter_at = [i for i, s in enumerate(steps) if s.name == "eora" or (s.name == "lora" and not s.merge)]
    if adapter_at and any(not (isinstance(s, (CastStep, Int8Step)) and not isinstance(s, Int8StaticStep))
                          for s in steps[adapter_at[0] + 1:]):
        raise RecipeError("after a step that keeps an adapter (eora, lora(merge=false)) only fp16, bf16, int8 or "
                          "int8-dynamic may follow")
    if any(isinstance(s, Int8StaticStep) for s in steps[:-1]):
        raise RecipeError("int8-static must be the last step: its activation scales are calibrated on the final model")

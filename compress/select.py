"""Which weights a step works on: module and layer selectors shared by the steps.

`modules` names projections ("mlp", "attn", "all" or names like "up_proj+down_proj");
`layers` names blocks ("all", "3", "0-5", "1+4").
"""

from __future__ import annotations

from engine import naming

from .step import RecipeError

PROJECTION_GROUPS = {"mlp": ["gate_proj", "up_proj", "down_proj"], "attn": ["q_proj", "k_proj", "v_proj", "o_proj"]}
PROJECTION_GROUPS["all"] = PROJECTION_GROUPS["attn"] + PROJECTION_GROUPS["mlp"]


def layer_set(spec: str) -> set[int]:
    """'0-2+5' (or '0-2,5') -> {0, 1, 2, 5}; ValueError on anything else."""
    out: set[int] = set()
    for part in spec.replace("+", ",").split(","):
        a, _, b = part.partition("-")
        out |= set(range(int(a), int(b or a) + 1))
    return out


def select_weights(state: dict, modules: str, layers: str) -> list[str]:
    """HF weight names matching a module selector ("mlp", "attn", "all" or projection
    names like "up_proj+down_proj") and a layer selector ("all", "3", "0-5", "1+4")."""
    projs: list[str] = []
    for m in modules.replace("+", ",").split(","):
        projs += PROJECTION_GROUPS.get(m.strip(), [m.strip()])
    keep_layer = (lambda i: True) if layers == "all" else layer_set(layers).__contains__
    names = [k for k in state if k.endswith(naming.WEIGHT) and naming.in_layer(k) and not naming.is_adapter(k)
             and naming.projection_of(k) in projs and keep_layer(naming.layer_index(k))]
    if not names:
        raise RecipeError(f"no weights match modules={modules!r} layers={layers!r}")
    return sorted(names, key=lambda k: (naming.layer_index(k), k))

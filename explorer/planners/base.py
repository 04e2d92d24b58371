"""How an operation is chosen, beside what it does (``explorer.ops``): its planners (recipe name -> planner), the
app's preset and its method choices, and its ``explorer plan`` option. One ``Planning`` per operation, registered
by the operation's name; operations that users add may bring theirs."""
from __future__ import annotations

from typing import Callable

from ..ops.base import add_to_registry


class Planning:
    """An operation's planners, preset and command-line option. Hooks an operation has nothing to say for keep
    these defaults."""

    op: str = ""  # the operation's registry name (``explorer.ops.OPS``)
    planners: dict[str, Callable] = {}  # recipe name -> planner(stats, ..., view=...) -> Plan
    needs_view: tuple[str, ...] = ()  # planners that need the model's view
    preset: str | None = None  # the app's and widgets' preset name
    methods: tuple[str, ...] = ()  # the preset's "method" choices (merge: mc-smoe, ...)

    # the preset's own controls: what its amount means, its range on this model, which shared controls apply
    amount_label: str = "amount"
    uses: tuple[str, ...] = ()  # of "criterion", "method", "mode", "protect_super"

    def amount_range(self, view) -> tuple[float, float, float, float]:
        """(least, most, step, default) of the preset's amount on the model of ``view``."""
        return (0.05, 0.95, 0.05, 0.25)

    def usable_methods(self, view) -> tuple[str, ...]:
        """The method choices that make sense on this model (offered, never offered and then refused)."""
        return self.methods

    def preset_args(self, amount: float, opts: dict, session) -> dict:
        """The planner's arguments for the app's preset controls: ``amount`` and ``opts`` (criterion, method, mode,
        protect_super); a choice that makes no sense is a PlanError in words."""
        return {}

    cli_flag: str = ""  # the dest of the operation's option in the mutually exclusive group

    def add_cli(self, parser, choice) -> None:
        """Options of ``explorer plan``: ``choice`` is the group of mutually exclusive operations."""

    def cli_needs_stats(self, args) -> bool:
        """Whether the planner ``explorer plan`` runs for this option needs router statistics."""
        return True

    def from_cli(self, args, skip: list[int], view) -> tuple[str, dict] | None:
        """(planner, arguments) ``explorer plan`` runs when this operation's option was given, else None."""
        return None


class LayerListPlanning(Planning):
    """Layer Drop and Block Drop: the preset's amount is a number of layers."""

    amount_label = "how many"

    def count_of(self, view) -> int:
        return len(view)

    def amount_range(self, view):
        n = self.count_of(view)
        return (1, max(1, n - 1), 1, 1)

    def preset_args(self, amount, opts: dict, session) -> dict:
        return dict(n=int(amount))


PLANNING: dict[str, Planning] = {}  # operation name -> how it is chosen, in registration order


def register_planning(p: Planning) -> Planning:
    add_to_registry(PLANNING, p.op, p, p.planners, lambda q: q.planners, "planner name(s)")
    return p


def planner_owner(name: str) -> Planning | None:
    """The planning that holds planner ``name``."""
    for p in PLANNING.values():
        if name in p.planners:
            return p
    return None


def all_planners() -> dict[str, Callable]:
    return {n: f for p in PLANNING.values() for n, f in p.planners.items()}


def presets() -> dict[str, Planning]:
    return {p.preset: p for p in PLANNING.values() if p.preset}


def preset_methods() -> tuple[str, ...]:
    """Every preset's method choices, for the app's and widgets' method menu."""
    return tuple(m for p in PLANNING.values() for m in p.methods)


def stats_meta(stats) -> dict:
    """What a plan made from ``stats`` was made for (``Plan.model``)."""
    return {"num_experts": list(stats.num_experts), "top_k": stats.top_k,
            "model_type": stats.info.get("model_type"), "moe_layer_indices": stats.moe_layer_indices}

"""How quantise is chosen: its planner, the app's preset and the command-line option."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import PlanError
from ..ops.quantise import (GROUP_SIZES, QUANTISE, QUANTISE_METHODS, avg_bits_budget, bits_per_weight, fake_quant,
                            gptq_fallbacks, in_dims, packable_group, parse_bits, quantise_error)
from ..plan import Plan, fingerprint
from .base import Planning, register_planning


def quant_errors(view, choices, group_size: int, stats=None) -> list[np.ndarray]:
    """[E, len(choices)] per MoE layer: each expert's relative output error at each bit width, its weights'
    error weighted by the size of the inputs they see (‖(W − Q(W))·diag(‖x‖)‖² / ‖W·diag(‖x‖)‖², x from the
    statistics' per-channel energies when given, else plain weight error)."""
    out = []
    with torch.no_grad():
        for lay in view:
            d_gu, d_dn = in_dims(lay)
            err = np.zeros((lay.num_experts, len(choices)))
            for e in range(lay.num_experts):
                gu, dn, _, _ = lay.expert_tensors(e)
                ws = []
                for w, d, key in ((gu, d_gu, "in_sq"), (dn, d_dn, "neuron_sq")):
                    a = None
                    if stats is not None and key in stats.layers[lay.index]:
                        a = torch.as_tensor(np.asarray(stats.layers[lay.index][key][e]), dtype=torch.float32)
                        a = a.clamp_min(0).sqrt()
                    ws.append((w, d, a))
                for j, b in enumerate(choices):
                    num = den = 0.0
                    for w, d, a in ws:
                        diff = (w.float() - fake_quant(w, b, group_size, d).float()).movedim(d, -1)
                        base = w.float().movedim(d, -1)
                        if a is not None:
                            diff, base = diff * a, base * a
                        num += float((diff ** 2).sum())
                        den += float((base ** 2).sum())
                    err[e, j] = num / max(den, 1e-30)
            out.append(err)
    return out


def quantise_plan(stats, view, bits=4, group_size: int = 128, budget_bytes: float | None = None,
                  choices=None, criterion: str = "reap", attention=None, shared=None, method: str = "rtn",
                  damp: float = 0.01):
    """A quantisation plan: every expert at ``bits``, or, with ``budget_bytes`` (bytes of all routed experts,
    scales included), bits per expert chosen by a mixed-integer programme that minimises Σ importance × measured
    error under the budget (MC-MoE's allocation; importance by ``criterion``, normalised per layer). ``method``:
    round-to-nearest (``rtn``) or GPTQ (``gptq``, with each expert's input Hessian; ``damp`` its dampening)."""
    plan = _quantise_plan(stats, view, bits, group_size, budget_bytes, choices, criterion, attention, shared)
    if method == "rtn":
        return plan
    if method not in QUANTISE_METHODS:
        raise quantise_error(f"method must be one of {', '.join(QUANTISE_METHODS)}, got {method!r}")
    spec = QUANTISE.parse({**QUANTISE.dump(plan.ops["quantise"]), "method": method, "damp": damp})
    spec["per_expert"] = plan.ops["quantise"]["per_expert"]
    plan.ops["quantise"] = spec
    plan.recipe[0].update(method=method, damp=damp)
    notes = plan.notes.replace("quantise experts", "quantise experts by GPTQ", 1)
    few = gptq_fallbacks(spec, stats, view)
    if few:
        notes += (f"; {len(few)} expert(s) saw fewer than 16 calibration tokens and are rounded to nearest "
                  f"({', '.join(f'L{i}:e{e}' for i, e in few[:8])}{' ...' if len(few) > 8 else ''})")
    plan.notes = notes
    return plan


def _quantise_plan(stats, view, bits, group_size, budget_bytes, choices, criterion, attention, shared):
    from ..saliency import expert_scores

    bits = parse_bits(bits)
    if group_size not in GROUP_SIZES:
        raise PlanError(f"quantise: group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    recipe = [{"planner": "quantise", "bits": bits, "group_size": group_size, "budget_bytes": budget_bytes,
               "criterion": criterion, "attention": attention, "shared": shared}]
    more = {k: v for k, v in (("attention", attention), ("shared", shared)) if v is not None}
    if budget_bytes is None:
        spec = QUANTISE.parse({"bits": bits, "group_size": group_size, **more})
        return Plan(ops={"quantise": spec}, model=fingerprint(view), recipe=recipe,
                    notes=QUANTISE.describe(spec))
    if stats is None:
        raise PlanError("quantise with a budget weighs experts by their statistics: collect them first")
    top = 8 if bits == "fp8" else bits
    choices = list(choices or [b for b in (2, 3, 4, 8) if b <= top])
    sizes = [lay.expert_weight_params() for lay in view]
    need = [bits_per_weight(min(choices), group_size) / 8 * s * lay.num_experts for s, lay in zip(sizes, view)]
    if budget_bytes < sum(need):
        raise PlanError(f"quantise: a budget of {budget_bytes / 1e9:.4g} GB is below what {min(choices)}-bit "
                        f"experts take ({sum(need) / 1e9:.4g} GB); raise it or allow fewer bits")
    errs = quant_errors(view, choices, group_size, stats)
    scores = expert_scores(stats, criterion)
    cost, size, owner = [], [], []
    for li, (lay, err, sc) in enumerate(zip(view, errs, scores)):
        imp = np.asarray(sc, dtype=float)
        imp = imp / max(imp.mean(), 1e-30)
        for e in range(lay.num_experts):
            for j, b in enumerate(choices):
                cost.append(imp[e] * err[e, j])
                size.append(bits_per_weight(b, group_size) / 8 * sizes[li])
                owner.append((li, e, b))
    pick, gap = _solve(np.array(cost), np.array(size), budget_bytes, len(choices))
    per: dict[int, dict[int, Any]] = {}
    for x, (li, e, b) in zip(pick, owner):
        if x:
            per.setdefault(li, {})[e] = b
    spec = QUANTISE.parse({"bits": bits, "group_size": group_size, **more})
    spec["per_expert"] = per
    used = sum(s for x, s in zip(pick, size) if x)
    avg = 8 * used / sum(s * lay.num_experts for s, lay in zip(sizes, view))
    return Plan(ops={"quantise": spec}, model=fingerprint(view), recipe=recipe,
                notes=f"quantise experts by {criterion} under {budget_bytes / 1e9:.4g} GB: {avg:.2f} bits a weight "
                      f"on average, widths {sorted({b for v in per.values() for b in v.values()}, key=str)}; "
                      f"allocation within {100 * gap:.2g}% of the least error any allocation reaches (LP bound)")


def _solve(cost: np.ndarray, size: np.ndarray, budget: float, k: int) -> tuple[np.ndarray, float]:
    """One choice per expert (consecutive runs of ``k``), least total cost within ``budget``, and the relative gap
    to the best any allocation could reach (the LP bound).

    A multiple-choice knapsack: its LP optimum leaves at most one expert between two choices, so walking every
    expert's convex hull of (bytes, cost) steps by cost saved per byte gives an integral allocation and the bound
    at once, in milliseconds at DeepSeek-V3's 58 x 256 experts (scipy's milp stopped at its time limit there, 3.5x
    above the bound, unread). Where the walk's gap is not negligible, milp tries to close it and the better answer
    is kept."""
    pick, gap = _hull_walk(cost.reshape(-1, k), size.reshape(-1, k), budget)
    if gap > 1e-4:
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import csr_matrix

        n = len(cost) // k
        one = csr_matrix((np.ones(len(cost)), (np.repeat(np.arange(n), k), np.arange(len(cost)))),
                         shape=(n, len(cost)))
        res = milp(cost, integrality=np.ones(len(cost)), bounds=Bounds(0, 1),
                   constraints=[LinearConstraint(one, 1, 1), LinearConstraint(size[None, :], 0, budget)],
                   options={"time_limit": 20})
        if res.x is not None:
            x = np.round(res.x).astype(bool)
            if cost[x].sum() < cost[pick].sum() and size[x].sum() <= budget * (1 + 1e-9):
                bound = cost[pick].sum() / (1 + gap) if gap < np.inf else 0.0
                pick, gap = x, (cost[x].sum() - bound) / max(bound, 1e-30)
    return pick, gap


def _hull_walk(cost: np.ndarray, size: np.ndarray, budget: float) -> tuple[np.ndarray, float]:
    """Greedy on the experts' lower convex hulls (``cost``, ``size``: [experts, choices]): the allocation and its
    relative gap to the LP bound."""
    n, k = cost.shape
    choice = np.empty(n, dtype=int)
    steps = []  # (cost saved per byte, expert, step number, to choice, bytes added, cost change)
    for i in range(n):
        order = sorted(range(k), key=lambda j: (size[i, j], cost[i, j]))
        hull = [order[0]]
        for j in order[1:]:
            if cost[i, j] >= cost[i, hull[-1]]:
                continue  # more bytes, no less cost: never worth taking
            while len(hull) >= 2:  # keep the hull convex: efficiencies must fall along it
                a, b = hull[-2], hull[-1]
                e_ab = (cost[i, a] - cost[i, b]) / max(size[i, b] - size[i, a], 1e-30)
                e_bj = (cost[i, b] - cost[i, j]) / max(size[i, j] - size[i, b], 1e-30)
                if e_bj >= e_ab:
                    hull.pop()
                else:
                    break
            hull.append(j)
        choice[i] = hull[0]
        for t in range(1, len(hull)):
            a, b = hull[t - 1], hull[t]
            ds, dc = size[i, b] - size[i, a], cost[i, b] - cost[i, a]
            steps.append((-dc / max(ds, 1e-30), i, t, b, ds, dc))
    left = budget - size[np.arange(n), choice].sum()
    if left < 0:
        raise PlanError("quantise: no bit allocation fits the budget")
    total = cost[np.arange(n), choice].sum()
    bound = None
    blocked = set()
    for eff, i, t, b, ds, dc in sorted(steps, key=lambda x: (-x[0], x[1], x[2])):
        if i in blocked:
            continue
        if ds <= left:
            choice[i], left, total = b, left - ds, total + dc
        else:
            if bound is None:
                bound = total + dc * left / ds  # the LP takes this step in part: nothing can do better
            blocked.add(i)  # its later hull steps depend on this one
    bound = total if bound is None else bound
    pick = np.zeros((n, k), dtype=bool)
    pick[np.arange(n), choice] = True
    gap = 0.0 if total <= bound else (total - bound) / max(abs(bound), 1e-30)
    return pick.reshape(-1), gap


class QuantisePlanning(Planning):
    op = "quantise"

    cli_flag = "quantise"
    def add_cli(self, parser, choice) -> None:
        choice.add_argument("--quantise", metavar="BITS", help="quantise experts: 2, 3, 4, 8 or fp8 (with "
                            "--budget-gb or --avg-bits: the most bits a budget planner may give an expert)")
        parser.add_argument("--group-size", type=int, default=128, help="quantise: inputs per scale (32/64/128)")
        parser.add_argument("--budget-gb", type=float, default=None, help="quantise: bytes of the routed experts, "
                            "in GB; bits per expert chosen by importance and measured error (MC-MoE)")
        parser.add_argument("--avg-bits", type=float, default=None, help="quantise: the same budget as average "
                            "bits per expert weight (scales included)")
        parser.add_argument("--quantise-attention", default=None, metavar="BITS", help="quantise: attention "
                            "projections too, at BITS (2, 3, 4, 8 or fp8)")
        parser.add_argument("--quantise-shared", default=None, metavar="BITS", help="quantise: shared experts "
                            "too, at BITS")
        parser.add_argument("--quantise-method", default="rtn", choices=QUANTISE_METHODS, help="quantise: "
                            "round-to-nearest (rtn) or GPTQ (gptq: each expert's columns rounded in order, the error "
                            "spread through the Hessian of the tokens routed to it; needs statistics, collected "
                            "with their Hessians when the plan is previewed or applied)")
        parser.add_argument("--damp", type=float, default=0.01, help="quantise --quantise-method gptq: dampening, "
                            "a share of the Hessian's mean diagonal")
    def cli_needs_stats(self, args) -> bool:
        return args.budget_gb is not None or args.avg_bits is not None
    def from_cli(self, args, skip, view):
        if getattr(args, "quantise", None) is None:
            return None
        bits = parse_bits(args.quantise, "--quantise")
        budget = None
        if args.budget_gb is not None and args.avg_bits is not None:
            raise quantise_error("--budget-gb and --avg-bits are two ways to give one budget: give one of them")
        if args.budget_gb is not None:
            if not 0 < args.budget_gb < math.inf:
                raise quantise_error(f"--budget-gb must be a positive number of GB, got {args.budget_gb}")
            budget = args.budget_gb * 1e9
        elif args.avg_bits is not None:
            budget = avg_bits_budget(args.avg_bits, view, "--avg-bits")
        return "quantise", dict(bits=bits, group_size=args.group_size, budget_bytes=budget, criterion=args.criterion,
                                attention=args.quantise_attention, shared=args.quantise_shared,
                                method=args.quantise_method, damp=args.damp)
    preset = "quantise"
    needs_view = ("quantise",)
    methods = ("experts only", "experts only, by GPTQ", "+ attention 8-bit", "+ attention & shared 8-bit")
    amount_label = "bits per expert weight: 2, 3, 4 or 8 for all, or an average such as 3.5 (chosen per expert)"
    uses = ("criterion", "method")

    def amount_range(self, view):
        return (2, 8, 0.1, 4)

    def usable_methods(self, view):
        return self.methods if any(lay.shared for lay in view) else self.methods[:3]
    def preset_args(self, amount, opts: dict, session) -> dict:
        """Whole bits (2, 3, 4, 8) or fp8 quantise every expert alike; a fraction (3.7) is an average: bits per
        expert chosen under that budget, never rounded away in silence."""
        text = str(amount).strip().lower()
        if text == "fp8":
            kw = {"bits": "fp8"}
        else:
            try:
                v = float(text)
            except ValueError:
                raise quantise_error(f"bits: 2, 3, 4, 8, fp8 or an average such as 3.5, got {amount!r}") from None
            if v == int(v) and int(v) in (2, 3, 4, 8):
                kw = {"bits": int(v)}
            else:
                top = next((b for b in (2, 3, 4, 8) if b >= v), None)
                if top is None or v < 2:
                    raise quantise_error(f"bits: an average between 2 and 8, got {amount!r}")
                kw = {"bits": top, "budget_bytes": avg_bits_budget(v, session.view, "bits")}
        kw["criterion"] = opts["criterion"]
        kw["group_size"] = packable_group(session.view)
        m = opts.get("method")
        if m == self.methods[1]:
            kw["method"] = "gptq"
        if m in self.methods[2:]:
            kw["attention"] = 8
        if m == self.methods[3]:
            if not any(lay.shared for lay in session.view):
                raise quantise_error(f"shared: {session.view.model_type} has no shared experts; choose "
                             f"'{self.methods[1]}'")
            kw["shared"] = 8
        return kw


QuantisePlanning.planners = {"quantise": quantise_plan}
register_planning(QuantisePlanning())

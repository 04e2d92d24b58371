"""Which MoE families of the installed transformers the explorer supports, measured rather than claimed.

``walk(model_type)`` builds a tiny seeded model of the type and runs the explorer's whole chain on it: the view's
self-check, statistics, preview = apply (logits) for expert drop, merge, slimming, Layer Drop and Block Drop (the
last block and a middle one), export and reload, and the out-of-core apply of each plan reloaded to the in-memory
model's logits. A family either passes, or is refused in words at load (the self-check, or a layout the view does
not know), or its tiny config cannot be built from the installed transformers' defaults. ``python -m explorer
families`` prints the table the README carries; a test walks every type and checks the README says what it finds.
"""
from __future__ import annotations

import inspect
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

PLAN_KINDS = ("drop", "merge", "slim", "layer-drop", "block-drop", "block-drop-mid")


def moe_model_types() -> list[str]:
    """Causal-LM model types whose modeling code routes tokens to experts (``experts`` and a top-k)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for mt, cls_name in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()):
        try:
            src = inspect.getsource(sys.modules[getattr(transformers, cls_name).__module__])
        except Exception:  # noqa: BLE001 - a type whose module does not import here is not ours to judge
            continue
        if re.search(r"\bexperts\b", src) and re.search(r"top_?k", src):
            out.append(mt)
    return out


@dataclass
class FamilyResult:
    model_type: str
    status: str  # "supported" | "refused" | "no tiny model"
    reason: str = ""
    refused_plans: dict[str, str] = field(default_factory=dict)  # plan kind -> why preview/apply refuses it
    max_diff: dict[str, float] = field(default_factory=dict)  # plan kind -> max |preview - apply| in logits
    out_of_core: str = ""  # the expert drop out of core tensor for tensor: "exact", or why it is refused
    out_of_core_refused: dict[str, str] = field(default_factory=dict)  # plan kind -> why the out-of-core apply refuses

    def wrong(self, why: str) -> "FamilyResult":
        self.status, self.reason = "wrong", why
        return self

    def row(self) -> str:
        if self.status != "supported":
            return f"| `{self.model_type}` | {self.status} | {_short(self.reason)} |"
        notes = [f"{k}: {_short(v, 90)}" for k, v in sorted(self.refused_plans.items())]
        if self.out_of_core and self.out_of_core != "exact":
            notes.append(f"out of core: {_short(self.out_of_core, 90)}")
        notes += [f"{k} out of core: {_short(v, 90)}" for k, v in sorted(self.out_of_core_refused.items())]
        return f"| `{self.model_type}` | supported | {'; '.join(notes) or 'every step'} |"


def _short(text: str, n: int = 240) -> str:
    text = re.sub(r"\s+", " ", str(text)).replace("|", "/")
    text = re.sub(r"/tmp/\S+", "<folder>", text)
    return text if len(text) <= n else text[: n - 1] + "…"


def _blocks(vocab: int, n: int = 4, length: int = 24, seed: int = 0):
    from .data import TokenBlocks

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(vocab, 256), (n, length), generator=g)
    lengths = torch.full((n,), length)
    return TokenBlocks(ids, lengths, torch.arange(n) % 2, ["a", "b"], (lengths - 1).double(), length)


def _logits(model, blocks) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=blocks.input_ids, attention_mask=blocks.attention_mask()).logits.float()


def _plans(view) -> dict:
    from .selfcheck import check_kept_ids
    from .plan import Plan

    n = len(view)
    lay = view[0]
    kept = check_kept_ids(lay)
    drop = [e for e in range(lay.num_experts) if e not in kept]
    E = lay.num_experts
    plans = {"drop": Plan(drop_experts={i: drop for i in range(n)})}
    g, _ = lay.groups
    if g == 1:
        plans["merge"] = Plan(merge={i: [[1, 2], [4, 6]] for i in range(n)})
    else:  # one merge inside each group keeps the group sizes equal
        size = E // g
        plans["merge"] = Plan(merge={i: [[size * j, size * j + 1] for j in range(g)] for i in range(n)})
    plans["slim"] = Plan(slim=0.5)
    plans["layer-drop"] = Plan(drop_layers=[n - 1])
    plans["block-drop"] = Plan(drop_blocks=[len(view.decoder_layers) - 1])
    plans["block-drop-mid"] = Plan(drop_blocks=[len(view.decoder_layers) // 2])  # the layers after it renumbered
    return plans


def walk(model_type: str, seed: int = 3, out_of_core: bool = True) -> FamilyResult:
    """Run the explorer's chain on a tiny ``model_type`` model and say what holds."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        return _walk(model_type, seed, out_of_core)
    except Exception as err:  # noqa: BLE001 - the walk reports, it does not stop
        import traceback

        tb = traceback.extract_tb(err.__traceback__)[-1]
        return FamilyResult(model_type, "fails", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
                                                 f"({Path(tb.filename).name}:{tb.lineno})")


def _walk(model_type: str, seed: int, out_of_core: bool) -> FamilyResult:
    from .apply import apply_plan, export
    from .loading import load_model
    from .layout import NoMoELayersError
    from .moe import MoEModel
    from .plan import PlanError
    from .preview import previewing
    from .stats import collect_stats
    from .tiny import tiny_model

    res = FamilyResult(model_type, "supported")
    try:
        model = tiny_model(model_type, seed=seed)
    except Exception as err:  # noqa: BLE001
        return FamilyResult(model_type, "no tiny model",
                            f"its default config does not build small here ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''})")
    try:
        view = MoEModel(model)
    except NoMoELayersError as err:
        return FamilyResult(model_type, "refused", str(err))
    blocks = _blocks(model.config.get_text_config().vocab_size)
    stats = collect_stats(model, view, blocks)
    base = _logits(model, blocks)
    with tempfile.TemporaryDirectory(prefix="explorer-walk-") as tmp:
        src = Path(tmp) / "model"
        model.save_pretrained(src)
        for kind, plan in _plans(view).items():
            try:
                with previewing(model, view, plan, stats):
                    pv = _logits(model, blocks)
            except (PlanError, NotImplementedError) as err:
                res.refused_plans[kind] = f"preview refused: {err}"
                continue
            try:
                new, _, layout = apply_plan(model, view, plan, stats)
            except (PlanError, NoMoELayersError) as err:
                res.refused_plans[kind] = f"apply refused: {err}"
                continue
            res.max_diff[kind] = float((_logits(new, blocks) - pv).abs().max())
            if not res.max_diff[kind] < 1e-3:
                return res.wrong(f"{kind}: preview and apply differ by {res.max_diff[kind]:.3g} in logits")
            if (pv - base).abs().max() < 1e-6:
                return res.wrong(f"{kind}: the plan changes nothing")
            out = export(new, None, plan, Path(tmp) / kind, layout=layout)
            try:
                back, _, _ = load_model(out, with_tokenizer=False, device="cpu")
            except Exception as err:  # noqa: BLE001
                return res.wrong(f"{kind}: the export does not reload ({type(err).__name__}: {err})")
            if not (_logits(back, blocks) - pv).abs().max() < 1e-3:
                return res.wrong(f"{kind}: the reloaded export computes something else")
            if out_of_core:  # the same plan cut shard by shard must be the same model, or refused in words
                why = _out_of_core_kind(src, plan, stats, Path(tmp) / f"ooc-{kind}", pv, blocks)
                if why.startswith("wrong: "):
                    return res.wrong(f"{kind} out of core: {why[7:]}")
                if why != "exact":
                    res.out_of_core_refused[kind] = why
        if out_of_core:  # the expert drop, tensor for tensor: the two folders the loop above wrote
            ooc, mem = Path(tmp) / "ooc-drop", Path(tmp) / "drop"
            res.out_of_core = (_same_tensors(ooc, mem) if ooc.exists() and mem.exists()
                               else res.out_of_core_refused.pop("drop", ""))
    return res


def _out_of_core_kind(src: Path, plan, stats, out: Path, want: torch.Tensor, blocks) -> str:
    """"exact" when the out-of-core cut reloads to ``want`` (the in-memory model's logits), the refusal in words, or
    "wrong: ..." when it writes another model."""
    from .checkpoint import apply_checkpoint
    from .loading import load_model
    from .plan import PlanError

    try:
        ooc = apply_checkpoint(src, plan, out, stats=stats)
    except PlanError as err:
        return str(err)
    try:
        back, _, _ = load_model(ooc, with_tokenizer=False, device="cpu")
    except Exception as err:  # noqa: BLE001
        return f"wrong: it does not reload ({type(err).__name__}: {str(err)[:200]})"
    diff = float((_logits(back, blocks) - want).abs().max())
    return "exact" if diff < 1e-3 else f"wrong: it reloads {diff:.3g} apart from the in-memory apply in logits"


def _same_tensors(ooc: Path, mem: Path) -> str:
    """"exact" when the out-of-core folder holds the in-memory export's tensors bit for bit, else the first that
    differs."""
    from safetensors.torch import load_file

    a = {k: v for f in sorted(ooc.glob("*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in sorted(mem.glob("*.safetensors")) for k, v in load_file(f).items()}
    if a.keys() != b.keys():
        diff = sorted(set(a) ^ set(b))
        return f"different tensors from the in-memory apply ({diff[0]})"
    bad = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    return "exact" if not bad else f"tensor {bad[0]} differs from the in-memory apply"


def table(results: list[FamilyResult]) -> str:
    head = "| model type | status | notes |\n|---|---|---|"
    return "\n".join([head] + [r.row() for r in results])


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("types", nargs="*", help="model types (default: every MoE type of the installed transformers)")
    p.add_argument("--no-out-of-core", action="store_true")
    p.add_argument("--write-readme", action="store_true", help="replace the README's family table with this walk")
    a = p.parse_args()
    results = [walk(t, out_of_core=not a.no_out_of_core) for t in (a.types or moe_model_types())]
    text = table(results)
    print(text)
    if a.write_readme:
        import transformers

        readme = Path(__file__).resolve().parent.parent / "README.md"
        body = readme.read_text()
        new = f"<!-- families:begin transformers={transformers.__version__} -->\n{text}\n<!-- families:end -->"
        pat = re.compile(r"<!-- families:begin[^>]*-->\n(?:.*?\n)?<!-- families:end -->", re.S)
        if not pat.search(body):
            raise SystemExit("README.md has no <!-- families:begin --> ... <!-- families:end --> section")
        readme.write_text(pat.sub(lambda _: new, body))


if __name__ == "__main__":
    main()

"""Which engines load an export of a plan, said before it is written, and the exact forms that let them.

Users serve pruned models with vLLM, SGLang and llama.cpp, and score them with lm-eval. Those engines build every
MoE layer from the config's one expert count and one width, so a plan with different counts per layer (global
planners, Layer Drop, per-layer slimming) cannot be served as it stands. Two forms of such an export load without
the explorer:

- ``per-layer`` (the default): the config records what differs per layer and the export ships
  ``modeling_explorer.py`` (``explorer.perlayer``); transformers and lm-eval load it with ``trust_remote_code``.
- ``padded``: every MoE layer padded to the largest kept count and width with zero experts the router can never
  select (their selection bias is PAD_BIAS), zero neurons, and zero blocks for dropped sub-layers: a stock model,
  exactly the plan's function, which every engine loads; it costs the padding's memory. Only where the router has
  a bias that decides selection (DeepSeek-V3 / Kimi-K2 / GLM-4.5 / dots1 ``e_score_correction_bias``, gpt-oss's
  router bias) can padded experts be made unselectable; widths and dropped sub-layers pad exactly in any family.

What the engines accept was read from their published code (the versions are in ``READ_FROM``); transformers and
lm-eval claims are checked by loading exports in the tests.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

PAD_BIAS = -1.0e4  # a padded expert's selection bias: below any real score, representable in bf16 and fp16
READ_FROM = {
    "vLLM": "vllm/model_executor/models/registry.py at commit 0002bff0b6cb (one num_experts and width per model)",
    "llama.cpp": "convert_hf_to_gguf.py at commit 0024aa7417ef (one expert_count per GGUF; compressed-tensors "
                 "pack-quantized with one config group dequantised while converting)",
}
# vLLM's text-generation MoE architectures (registry, commit above); SGLang's model files build MoE layers the same way
VLLM_ARCHS = frozenset("""
MixtralForCausalLM Qwen2MoeForCausalLM Qwen3MoeForCausalLM Qwen3NextForCausalLM OlmoeForCausalLM FlexOlmoForCausalLM
PhiMoEForCausalLM DeepseekV2ForCausalLM DeepseekV3ForCausalLM GptOssForCausalLM GraniteMoeForCausalLM
GraniteMoeSharedForCausalLM GraniteMoeHybridForCausalLM Glm4MoeForCausalLM Dots1ForCausalLM Ernie4_5_MoeForCausalLM
HunYuanMoEV1ForCausalLM JambaForCausalLM Llama4ForCausalLM MiniMaxM2ForCausalLM Lfm2MoeForCausalLM
BailingMoeForCausalLM BailingMoeV2ForCausalLM LongcatFlashForCausalLM NemotronHForCausalLM DbrxForCausalLM
ArcticForCausalLM AfmoeForCausalLM Step3TextForCausalLM KimiLinearForCausalLM""".split())
# llama.cpp's converter (commit above): the MoE architectures it registers
LLAMA_CPP_ARCHS = frozenset("""
MixtralForCausalLM Qwen2MoeForCausalLM Qwen3MoeForCausalLM OlmoeForCausalLM PhiMoEForCausalLM DeepseekV2ForCausalLM
DeepseekV3ForCausalLM GptOssForCausalLM GraniteMoeForCausalLM GraniteMoeSharedForCausalLM Glm4MoeForCausalLM
Dots1ForCausalLM""".split())
FORMS = ("per-layer", "padded")


@dataclass
class EngineVerdict:
    engine: str
    loads: bool
    how: str  # how to load it, or why not and what to change


def stock_architecture(view) -> str:
    """The family's ``...ForCausalLM`` class name, as engines look it up in ``config.architectures``."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(view.model.config)].__name__
    except KeyError:
        return type(view.model).__name__


def unselectable(lay) -> str | None:
    """How a padded expert of ``lay`` is kept out of every token's choice ('correction' or 'router' bias), or None
    when this router has no bias that decides selection (padding experts would change routing)."""
    g = lay.family.gating
    if g == "sigmoid_group" and lay.correction_bias is not None:
        return "correction"
    if g in ("topk_softmax", "softmax_topk", "sigmoid_input") and lay.router_bias is not None:
        return "router"
    return None


def _layers_after(plan, view) -> dict:
    """MoE layer index -> (kept count, width) after the plan, for the layers whose MoE sub-layer survives."""
    gone = set(plan.dropped_layers()) | set(plan.blocked_moe_layers(view))
    return {lay.index: (len(plan.kept(lay.index, lay.num_experts)), plan.width(lay)) for lay in view
            if lay.index not in gone}


def uniformity(plan, view) -> list[str]:
    """Why the plan's result is not one stock model (different counts or widths per layer, dropped MoE
    sub-layers, a width the config cannot say); [] when a stock config describes it."""
    after = _layers_after(plan, view)
    why = []
    if len({e for e, _ in after.values()}) > 1:
        why.append("expert counts differ per layer (" + ", ".join(sorted({str(e) for e, _ in after.values()},
                                                                         key=int)) + ")")
    if len({w for _, w in after.values()}) > 1:
        why.append("expert widths differ per layer")
    why += [r for r in plan.not_stock(view) if r not in why]
    return why


def padding_problem(plan, view) -> str | None:
    """Why the padded form cannot be exact for this plan, or None."""
    after = _layers_after(plan, view)
    if not after:
        return None
    top = max(e for e, _ in after.values())
    for lay in view:
        if lay.index not in after or after[lay.index][0] == top:
            continue
        if unselectable(lay) is None:
            return (f"MoE layer {lay.index} keeps {after[lay.index][0]} of the {top} experts others keep, and this "
                    f"family's router ({lay.family.gating}, no selection bias) would route tokens to padded experts")
        g = lay.groups[0]
        if g > 1 and top % g:
            return f"grouped routing (n_group={g}) cannot pad to {top} experts"
    return None


def padding_params(plan, view) -> int:
    """Parameters the padded form adds: zero experts and neurons up to the largest kept count and width, and the
    dropped MoE sub-layers as zero blocks."""
    after = _layers_after(plan, view)
    if not after:
        return 0
    top_e = max(e for e, _ in after.values())
    top_w = max(w for _, w in after.values())
    extra = 0
    for lay in view:
        full = top_e * (lay.expert_params_at(top_w) + lay.router_row_params())
        if lay.index in after:
            e, w = after[lay.index]
            extra += full - e * (lay.expert_params_at(w) + lay.router_row_params())
        elif lay.index in set(plan.dropped_layers()):
            extra += full + lay.shared_params()
    return int(extra)


def verdicts(plan, view, form: str = "per-layer", quantised: bool | None = None) -> list[EngineVerdict]:
    """For ``plan`` on ``view``'s model exported in ``form``: which engines load the result, how, and if not, why
    and what to change."""
    if form not in FORMS:
        raise ValueError(f"form is one of {', '.join(FORMS)}; got {form!r}")
    arch = stock_architecture(view)
    why = uniformity(plan, view)
    quantised = bool(plan.stored_formats()) if quantised is None else quantised
    pad_no = padding_problem(plan, view) if why else None
    stock = not why or form == "padded"
    if why and form == "padded" and pad_no:
        raise ValueError(f"the padded form cannot be exact here: {pad_no}")
    out = []
    if stock:
        pad = "" if not why else f" (padded: {padding_params(plan, view):,} zero parameters added)"
        out.append(EngineVerdict("transformers", True, f"AutoModelForCausalLM.from_pretrained(OUT){pad}"))
        out.append(EngineVerdict("lm-eval (hf)", True, "lm_eval --model hf --model_args pretrained=OUT"))
    else:
        out.append(EngineVerdict("transformers", True, "AutoModelForCausalLM.from_pretrained(OUT, "
                                 "trust_remote_code=True): per-layer shapes from modeling_explorer.py"))
        out.append(EngineVerdict("lm-eval (hf)", True,
                                 "lm_eval --model hf --model_args pretrained=OUT,trust_remote_code=True"))
    fix = ("" if stock else
           "; " + (f"export --form padded (exact; {padding_params(plan, view):,} zero parameters added)"
                   if pad_no is None else f"keep the same count per layer (plan --mode uniform; padding is not exact: "
                                                f"{pad_no})"))
    for engine, archs in (("vLLM / SGLang", VLLM_ARCHS), ("llama.cpp", LLAMA_CPP_ARCHS)):
        if not stock:
            out.append(EngineVerdict(engine, False, f"{'; '.join(why)}: {engine} builds every MoE layer from one "
                                     f"expert count and width{fix}"))
        elif arch not in archs:
            out.append(EngineVerdict(engine, False, f"{arch} is not among the architectures {engine} builds "
                                     "(as read: see explorer.engines.READ_FROM)"))
        elif engine == "llama.cpp":
            q = (" (the converter dequantises the packed experts; requantise with llama-quantize)" if quantised
                 else "")
            out.append(EngineVerdict(engine, True, f"python convert_hf_to_gguf.py OUT{q}; its tokenizer must be one "
                                     "the converter recognises"))
        else:
            q = " (compressed-tensors weights)" if quantised else ""
            out.append(EngineVerdict(engine, True, f"vllm serve OUT{q}"))
    return out


def serving(plan, view) -> str:
    """Where the plan's export is served, in a few words for a table (the Compare tab's column)."""
    def names(vs):
        return ", ".join(v.engine.split(" ")[0] for v in vs if v.loads)

    per_layer = verdicts(plan, view)
    if not uniformity(plan, view):
        return names(per_layer)
    why = padding_problem(plan, view)
    if why:
        return "transformers, lm-eval (remote code) only: padding would change routing"
    return f"transformers, lm-eval (remote code); padded: {names(verdicts(plan, view, 'padded'))}"


def engine_line(vs: list[EngineVerdict], markup: str = "text") -> str:
    """The verdicts in one line: ``loads in: transformers, lm-eval · not: vLLM (why)``."""
    ok = "✓" if markup != "text" else "yes"
    no = "✗" if markup != "text" else "no"
    return "engines: " + " · ".join(f"{v.engine} {ok if v.loads else no} ({v.how})" for v in vs)


def as_dicts(vs: list[EngineVerdict]) -> list[dict]:
    return [asdict(v) for v in vs]

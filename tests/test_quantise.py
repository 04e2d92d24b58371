"""Quantisation as an operation module: the rounding against a per-group reference, the plan field, preview equal
to apply on several layouts, bytes in the report, the budget planner, and the command line."""
import json

import numpy as np
import pytest
import torch

from explorer.apply import apply_plan
from explorer.cli import main
from explorer.data import TokenBlocks
from explorer.loading import load_model
from explorer.moe import MoEModel
from explorer.planners import PLANNING
from explorer.ops.quantise import bits_per_weight, fake_quant
from explorer.planners.quantise import quantise_plan
from explorer.plan import Plan, PlanError
from explorer.preview import previewing
from explorer.stats import collect_stats
from explorer.tiny import tiny_model, random_blocks


def _blocks(n=4, L=24, seed=0):
    return random_blocks(n, L, seed, vocab=64)


def _reference(w: np.ndarray, bits, g: int) -> np.ndarray:
    """Row by row, group by group, as the formula in REFERENCES.md reads (scales kept in bfloat16)."""
    out = np.zeros_like(w, dtype=np.float64)
    for r in range(w.shape[0]):
        for s in range(0, w.shape[1], g):
            x = w[r, s:s + g].astype(np.float64)
            half = 448.0 if bits == "fp8" else (2 ** bits - 1) / 2
            amax = np.abs(x).max()
            scale = float(torch.tensor(amax / half if amax > 0 else 1.0).to(torch.bfloat16).float())
            if bits == "fp8":
                q = torch.tensor(np.clip(x / scale, -448, 448)).float().to(torch.float8_e4m3fn).double().numpy()
            else:
                q = np.clip(np.round(x / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            out[r, s:s + g] = q * scale
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8, "fp8"])
@pytest.mark.parametrize("g", [16, 32])
def test_rounding_matches_a_per_group_reference(bits, g):
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(1)) * 0.05  # 40 inputs: a ragged last group
    w[2, :16] = 0  # an all-zero group stays zero
    got = fake_quant(w, bits, g).double().numpy()
    np.testing.assert_allclose(got, _reference(w.numpy(), bits, g), rtol=1e-6, atol=1e-9)
    assert np.all(got[2, :16] == 0)
    if bits != "fp8":
        levels = {len(np.unique(np.round(got[r, s:s + g] / np.abs(got[r, s:s + g]).max() * (2 ** (bits - 1) - 1))))
                  for r in range(6) for s in range(0, 40, g) if np.abs(got[r, s:s + g]).max() > 0}
        assert max(levels) <= 2 ** bits
    # the input dimension is found in either layout
    torch.testing.assert_close(fake_quant(w.T.contiguous(), bits, g, in_dim=0), fake_quant(w, bits, g).T)


@pytest.mark.parametrize("bits", [3, 4, 8, "fp8"])
def test_rounding_is_compressed_tensors_rounding(bits):
    """The library whose packed format vLLM and llm-compressor read: its fake_quantize with its own scales
    (stored in bf16) gives exactly the preview's weights."""
    ct = pytest.importorskip("compressed_tensors.quantization")
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    kind = dict(type="float") if bits == "fp8" else {}
    args = ct.QuantizationArgs(num_bits=8 if bits == "fp8" else bits, symmetric=True, group_size=64,
                               strategy="group", **kind)
    g = w.reshape(8, -1, 64)
    scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args)
    ref = fake_quantize(w, scale.to(torch.bfloat16).float(), zp, args)
    torch.testing.assert_close(fake_quant(w, bits, 64), ref, rtol=0, atol=0)


def test_the_plan_field_round_trips_and_is_checked():
    model = tiny_model("qwen3_moe", seed=1)
    view = MoEModel(model)
    text = '{"quantise": {"bits": 4, "group_size": 32, "per_expert": {"0": {"3": 8, "5": "fp8"}}}}'
    p = Plan.loads(text).validate(view)
    again = Plan.loads(p.to_json())
    assert again.op("quantise") == p.op("quantise") and json.loads(p.to_json())["quantise"]["per_expert"] == \
        {"0": {"3": 8, "5": "fp8"}}
    assert "quantise" in p.describe() and not p.is_empty()
    for bad, words in (('{"quantise": {"bits": 5}}', "bits must be one of"),
                       ('{"quantise": {"bits": 4, "group_size": 100}}', "group_size must be one of"),
                       ('{"quantise": {"bits": 4, "scheme": "awq"}}', "unknown field"),
                       ('{"quantise": {"bits": 4, "per_expert": {"0": {"1.5": 2}}}}', "whole number"),
                       ('{"quantise": [4]}', "expected a mapping")):
        with pytest.raises(PlanError, match=words):
            Plan.loads(bad)
    with pytest.raises(PlanError, match="expert 3 is removed by this plan"):
        Plan(drop_experts={0: [3]}).combine(p).validate(view)
    with pytest.raises(PlanError, match="MoE layer 7 does not exist"):
        Plan.loads('{"quantise": {"bits": 4, "per_expert": {"7": {"0": 2}}}}').validate(view)
    both = Plan(drop_experts={1: [2]}).combine(p)
    assert both.drop_experts == {1: [2]} and both.op("quantise")["bits"] == 4


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3", "qwen2_moe"])
def test_preview_equals_apply_and_bytes_add_up(family):
    model = tiny_model(family, seed=3)
    view = MoEModel(model)
    stats = collect_stats(model, view, _blocks())
    q = Plan.loads('{"quantise": {"bits": 3, "group_size": 16, "per_expert": {"0": {"1": 8, "2": 16}}}}')
    plan = Plan(drop_experts={0: [4, 6]}, slim=0.75).combine(q)
    ids = _blocks(2).input_ids
    with torch.no_grad():
        base = model(ids).logits
        with previewing(model, view, plan, stats):
            prev = model(ids).logits
        new, nv, _ = apply_plan(model, view, plan, stats)
        applied = new(ids).logits
    torch.testing.assert_close(prev, applied, rtol=1e-4, atol=1e-4)
    assert (prev - base).abs().max() > 1e-3  # it did something
    # the applied experts hold no more distinct values per group than 3 bits allow (expert 3 of layer 0 is 3-bit)
    # several widths (3, 8 and 16 bits here) are written dequantised, one quantisation scheme per checkpoint: the
    # report counts what the export writes, the float32 model's full size (test_every_size_said... holds it to the
    # files), never the bytes a packed format could have taken
    rep = plan.report(view)
    assert rep["dtype"] == "float32" and rep["bytes_after"] == 4 * rep["params_after"]


def test_budget_planner_stays_within_its_budget_and_gives_bits_by_importance():
    model = tiny_model("mixtral", seed=2, num_hidden_layers=2)
    view = MoEModel(model)
    stats = collect_stats(model, view, _blocks(8))
    w = sum(lay.expert_weight_params() * lay.num_experts for lay in view)
    budget = w * bits_per_weight(3, 32) / 8
    plan = quantise_plan(stats, view, bits=8, group_size=32, budget_bytes=budget, criterion="frequency")
    spec = plan.op("quantise")
    used = sum(lay.expert_weight_params() * bits_per_weight(spec["per_expert"][lay.index][e], 32) / 8
               for lay in view for e in range(lay.num_experts))
    assert used <= budget * (1 + 1e-9)
    assert len({b for v in spec["per_expert"].values() for b in v.values()}) > 1  # not all the same width
    with pytest.raises(PlanError, match="below what 2-bit experts take"):
        quantise_plan(stats, view, bits=4, group_size=32, budget_bytes=budget / 3)
    again = Plan.loads(plan.to_json())
    assert again.op("quantise") == spec and again.recipe[0]["planner"] == "quantise"


def test_cli_plan_preview_apply_and_reload(demo, tmp_path, capsys):
    """The issue's commands: plan, preview, apply; the export stores the experts packed (compressed-tensors),
    takes at most 0.4x their bf16 bytes, reloads with plain transformers and with the explorer, and its perplexity
    is the preview's."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from explorer.data import load_data
    from explorer.perplexity import perplexity

    def cli(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        assert code == 0, out.err
        return out.out

    cli("stats", "demo", "--out", tmp_path / "s.json", "--max-tokens", "1024")
    # the demo's hidden size (192) is a multiple of 64, not of 128: groups of 64 pack
    cli("plan", "demo", "--stats", tmp_path / "s.json", "--quantise", "4", "--group-size", "64",
        "--out", tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text())["quantise"] == {"bits": 4, "group_size": 64}
    out = cli("preview", "demo", tmp_path / "p.json", "--max-tokens", "1024")
    assert "with packed experts" in out
    prev = float(out.split("preview perplexity ")[1].split()[0])
    out = cli("apply", "demo", tmp_path / "p.json", "--out", tmp_path / "q4", "--max-tokens", "1024")
    assert "stored packed" in out
    summary = json.loads((tmp_path / "q4" / "summary.json").read_text())
    assert summary["perplexity_after"]["ppl"] == pytest.approx(prev, rel=1e-4)
    assert "pack-quantized" in summary["weight_format"]

    cfg = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == "pack-quantized"
    packed = dense = 0
    with safe_open(str(tmp_path / "q4" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert not [k for k in keys if ".experts." in k and k.endswith(".weight")]  # no float expert left
        for k in keys:
            if ".experts." in k:
                t = f.get_tensor(k)
                packed += t.numel() * t.element_size()
    base, _, base_view = load_model(device="cpu")
    dense = sum(lay.expert_weight_params() * lay.num_experts for lay in base_view) * 2  # bf16 bytes
    assert packed <= 0.4 * dense, (packed, dense)

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "q4")  # stock transformers, no explorer code
    model, tok, view = load_model(tmp_path / "q4", device="cpu")
    ev = load_data(tok, "demo", max_tokens=1024).eval
    assert perplexity(plain, ev).ppl == pytest.approx(prev, rel=1e-4)
    assert perplexity(model, ev).ppl == pytest.approx(prev, rel=1e-4)
    gu = view[0].gate_up[0]  # [2I, H]: rows of H=192 inputs in groups of 64
    assert max(len(torch.unique(row[:64])) for row in gu[:64]) <= 16  # 4 bits: at most 16 levels per group
    assert min(len(torch.unique(row[:64])) for row in gu[:64]) > 8


def test_an_export_that_cannot_pack_says_why_and_stays_exact(demo, tmp_path, capsys):
    """Groups of 128 do not divide the demo's 192 inputs; compressed-tensors cannot store a partial group, so the
    export is dequantised, says so and names the group size that would pack; it still equals the preview."""
    from explorer.data import load_data
    from explorer.perplexity import perplexity

    model, tok, view = load_model(device="cpu")
    plan = quantise_plan(None, view, bits=4, group_size=128)
    ev = load_data(tok, "demo", max_tokens=1024).eval
    with previewing(model, view, plan):
        prev = perplexity(model, ev).ppl
    assert main(["plan", "demo", "--quantise", "4", "--group-size", "128", "--out", str(tmp_path / "p.json")]) == 0
    assert main(["apply", "demo", str(tmp_path / "p.json"), "--out", str(tmp_path / "q"), "--no-eval"]) == 0
    out = capsys.readouterr().out
    assert "dequantised" in out and "192" in out and "group size of 64 would pack" in out
    assert "quantization_config" not in json.loads((tmp_path / "q" / "config.json").read_text())
    again, _, _ = load_model(tmp_path / "q", device="cpu")
    assert perplexity(again, ev).ppl == pytest.approx(prev, rel=1e-4)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3", "qwen2_moe"])
def test_an_export_packs_where_the_family_saves_experts_one_by_one(family, tmp_path):
    """Each family's export reloads with plain transformers to the applied model's logits: packed where the family
    saves one 2-D tensor per expert and projection, otherwise dequantised with a sentence that says why."""
    from transformers import AutoModelForCausalLM

    from explorer.apply import export

    model = tiny_model(family, seed=5)
    view = MoEModel(model)
    plan = Plan(drop_experts={i: [1, 2] for i in range(len(view))}).combine(
        Plan.loads('{"quantise": {"bits": 4, "group_size": 16}}'))
    ids = _blocks(2).input_ids
    with torch.no_grad():
        with previewing(model, view, plan):
            prev = model(ids).logits
        new, _, layout = apply_plan(model, view, plan)
        if layout is not None:
            pytest.skip(f"{family}: per-layer shapes are written in the explorer's own layout")
        out = export(new, None, plan, tmp_path / "q")
        note = json.loads((out / "summary.json").read_text())["weight_format"]
        cfg = json.loads((out / "config.json").read_text())
        again = AutoModelForCausalLM.from_pretrained(out).eval()
        got = again(ids).logits
    torch.testing.assert_close(got, prev, rtol=1e-4, atol=1e-4)
    if "quantization_config" in cfg:
        assert "stored packed" in note
    else:
        assert "dequantised" in note and "layout" in note
    if family in ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe"):  # per-expert 2-D tensors in their checkpoints
        assert "stored packed" in note, note


@pytest.mark.parametrize("family,cut", [("qwen3_moe", {"drop_experts": [1, 2]}), ("mixtral", {"drop_blocks": [1]}),
                                        ("qwen2_moe", {"drop_blocks": [0], "attention": 8, "shared": 4}),
                                        ("gpt_oss", {})])
def test_out_of_core_quantise_writes_what_the_preview_shows(family, cut, tmp_path):
    """The shard-by-shard apply quantises the experts it writes: the folder reloads with plain transformers to the
    preview's logits, packed and smaller; a family that saves experts fused, or an already quantised checkpoint, is
    refused in words with nothing written."""
    from transformers import AutoModelForCausalLM

    from explorer.checkpoint import apply_checkpoint

    model = tiny_model(family, seed=5)
    view = MoEModel(model)
    model.save_pretrained(tmp_path / "src")
    d = {"quantise": {"bits": 4, "group_size": 16}}
    if "drop_experts" in cut:
        d["drop_experts"] = {str(i): cut["drop_experts"] for i in range(len(view))}
    d["quantise"].update({k: v for k, v in cut.items() if k in ("attention", "shared")})
    d.update({k: v for k, v in cut.items() if k not in ("drop_experts", "attention", "shared")})
    plan = Plan.from_dict(d)
    ids = _blocks(2).input_ids
    with torch.no_grad(), previewing(model, view, plan):
        prev = model(ids).logits
    if family == "gpt_oss":
        with pytest.raises(PlanError, match="one 2-D tensor per projection"):
            apply_checkpoint(tmp_path / "src", plan, tmp_path / "q")
        assert not (tmp_path / "q").exists()
        return
    out = apply_checkpoint(tmp_path / "src", plan, tmp_path / "q")
    note = json.loads((out / "summary.json").read_text())["weight_format"]
    assert "experts stored packed" in note
    if "attention" in cut:
        assert "attention and shared-expert projections stored packed (4-bit, 8-bit" in note
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    torch.testing.assert_close(got, prev, rtol=1e-4, atol=1e-4)
    size = lambda f: sum(p.stat().st_size for p in f.glob("*.safetensors"))  # noqa: E731
    assert size(out) < 0.8 * size(tmp_path / "src")
    with pytest.raises(PlanError, match="already quantised"):
        apply_checkpoint(out, Plan.from_dict({"quantise": {"bits": 4, "group_size": 16}}), tmp_path / "qq")
    assert not (tmp_path / "qq").exists()


def test_attention_and_shared_experts_quantise_beside_the_experts(tmp_path):
    """``attention`` and ``shared`` bits round those projections too: preview (weights swapped in for its duration,
    the originals untouched) equals apply, the report counts their bytes, and the export packs them and reloads
    with plain transformers to the preview's logits."""
    from transformers import AutoModelForCausalLM

    from explorer.apply import export

    model = tiny_model("qwen2_moe", seed=5)
    view = MoEModel(model)
    ids = _blocks(2).input_ids
    before = {k: v.clone() for k, v in model.state_dict().items()}
    experts_only = Plan.loads('{"quantise": {"bits": 4, "group_size": 16}}')
    plan = Plan.loads('{"quantise": {"bits": 4, "group_size": 16, "attention": 8, "shared": 4}}')
    assert "attention to 8-bit, shared to 4-bit" in plan.describe()
    with torch.no_grad():
        with previewing(model, view, experts_only):
            only = model(ids).logits
        with previewing(model, view, plan):
            prev = model(ids).logits
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert not torch.allclose(prev, only, atol=1e-5)  # the attention and shared rounding shows
        new, _, layout = apply_plan(model, view, plan)
        torch.testing.assert_close(new(ids).logits, prev, rtol=1e-5, atol=1e-5)
        assert plan.report(view)["bytes_after"] < experts_only.report(view)["bytes_after"]
        out = export(new, None, plan, tmp_path / "q")
        note = json.loads((out / "summary.json").read_text())["weight_format"]
        groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
        again = AutoModelForCausalLM.from_pretrained(out).eval()
        torch.testing.assert_close(again(ids).logits, prev, rtol=1e-4, atol=1e-4)
    assert "attention and shared-expert projections stored packed" in note and "experts stored packed" in note
    assert {"group_0", "group_linear_4", "group_linear_8"} <= set(groups)
    assert any("self_attn.q_proj" in t for t in groups["group_linear_8"]["targets"])
    assert any("shared_expert" in t for t in groups["group_linear_4"]["targets"])
    with pytest.raises(PlanError, match="has no shared experts"):
        Plan.loads('{"quantise": {"bits": 4, "shared": 8}}').validate(MoEModel(tiny_model("mixtral", seed=1)))
    with pytest.raises(PlanError, match="attention must be one of"):
        Plan.loads('{"quantise": {"bits": 4, "attention": 5}}')


def test_the_command_line_asks_for_attention_and_shared_bits():
    from explorer.cli import build_parser

    args = build_parser().parse_args(["plan", "--quantise", "4", "--quantise-attention", "8", "--quantise-shared",
                                      "fp8", "--out", "p.json"])
    name, kw = PLANNING["quantise"].from_cli(args, [], None)
    view = MoEModel(tiny_model("qwen2_moe", seed=1))
    plan = quantise_plan(None, view, **{**kw, "group_size": 16})
    assert plan.op("quantise")["attention"] == 8 and plan.op("quantise")["shared"] == "fp8"
    assert Plan.from_dict(plan.to_dict()) == plan


@pytest.mark.parametrize("experts_bits", [4, 16])
@pytest.mark.parametrize("family", sorted(__import__("explorer.tiny", fromlist=["TINY_CONFIGS"]).TINY_CONFIGS))
def test_attention_quantisation_reloads_to_the_preview_on_every_family(family, experts_bits, tmp_path):
    """Packed where the routed experts are packed too, dequantised otherwise (a quantization_config over unpacked
    experts stops transformers loading DeepSeek-V3 and Llama-4): the export always reloads to the preview."""
    from transformers import AutoModelForCausalLM

    from explorer.apply import export

    model = tiny_model(family, seed=5)
    view = MoEModel(model)
    shared = {"shared": 4} if any(lay.shared for lay in view) else {}
    plan = Plan.from_dict({"quantise": {"bits": experts_bits, "group_size": 16, "attention": 8, **shared}})
    ids = _blocks(2).input_ids
    with torch.no_grad():
        with previewing(model, view, plan):
            prev = model(ids).logits
        new, _, layout = apply_plan(model, view, plan)
        out = export(new, None, plan, tmp_path / "q", layout=layout)
        got = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    torch.testing.assert_close(got, prev, rtol=1e-4, atol=1e-4)
    note = json.loads((out / "summary.json").read_text())["weight_format"]
    packed = "experts stored packed" in note
    assert ("attention and shared-expert projections stored packed" in note) == packed


def test_the_explorers_packed_export_loads_back_for_another_plan(tmp_path):
    """A packed 4-bit export reloads dequantised (said so) to the cut model's logits, and takes a further plan
    (it ended in "Undefined Operation encountered!" before)."""
    from explorer.apply import export
    from explorer.plan import Plan

    model, tok, view = load_model(device="cpu")
    plan = Plan.from_dict({"quantise": {"bits": 4, "group_size": 64}})
    new, _, layout = apply_plan(model, view, plan)
    out = export(new, tok, plan, tmp_path / "q4", layout=layout)
    back, _, v2 = load_model(out, device="cpu")
    assert "pack-quantized" in back.explorer_dequantised
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, new(ids).logits, atol=1e-5)
    again, _, _ = apply_plan(back, v2, Plan(drop_experts={0: [1, 2]}))
    with torch.no_grad():
        assert torch.isfinite(again(ids).logits).all()


@pytest.mark.parametrize("dtype", ["float32", "bf16", "fp16"])
def test_every_size_said_is_the_size_written(dtype, tmp_path):
    """The report's bytes are the export's weight files (within 1%): the model's own dtype, scales in it, FP8
    experts (written dequantised) at their full size. A float32 model's 4-bit export was said 5.0 MiB and written
    7.7; FP8 was said at one byte a weight and written at four."""
    from explorer.apply import export, weight_bytes
    from explorer.checkpoint import apply_checkpoint
    from explorer.data import load_data
    from explorer.plan import Plan
    from explorer.stats import collect_stats

    model, tok, view = load_model(device="cpu", dtype=dtype)
    stats = collect_stats(model, view, load_data(tok, "demo", max_tokens=256).calib) if dtype == "float32" else None
    plans = {"none": {}, "drop": {"drop_experts": {"0": [1]}}, "q4": {"quantise": {"bits": 4, "group_size": 64}},
             "q4-unpackable": {"quantise": {"bits": 4, "group_size": 128}},  # 192 inputs: written dequantised
             "q3": {"quantise": {"bits": 3, "group_size": 64}}, "fp8": {"quantise": {"bits": "fp8", "group_size": 64}},
             "q4+attention": {"quantise": {"bits": 4, "group_size": 64, "attention": 8}}}
    if stats is not None:
        plans["slim"] = {"slim": 0.5}
    for name, d in plans.items():
        plan = Plan.from_dict(d)
        said = plan.report(view)["bytes_after"]
        new, _, layout = apply_plan(model, view, plan, stats)
        out = export(new, tok, plan, tmp_path / name, layout=layout)
        written = weight_bytes(out)
        assert abs(said - written) <= 0.01 * written, (name, said, written)
        assert json.loads((out / "summary.json").read_text())["bytes_written"] == written
    model.save_pretrained(tmp_path / "src")
    plan = Plan.from_dict({"drop_experts": {str(i): [1, 2] for i in range(len(view))}})
    out = apply_checkpoint(tmp_path / "src", plan, tmp_path / "ooc")
    summary = json.loads((out / "summary.json").read_text())
    assert abs(summary["report"]["bytes_after"] - summary["bytes_written"]) <= 0.01 * summary["bytes_written"]


def test_budget_amounts_are_refused_or_kept_never_rounded_away(tmp_path, capsys):
    """The app's 3.7-bit preset gave 3 bits everywhere; --avg-bits beside --budget-gb was ignored; --avg-bits
    1e308 wrote Infinity into the plan."""
    import math

    from explorer.plan import Plan, PlanError
    from explorer.session import Session

    s = Session(max_tokens=512)
    s.load("demo", device="cpu")
    s.set_data("demo")
    s.collect()
    plan = s.preset("quantise", 3.7)
    widths = [b for v in plan.ops["quantise"]["per_expert"].values() for b in v.values()]
    # an average of 3.7 bits a weight (scales of one bf16 per 128 included): not 3 everywhere
    assert 4 in widths and 3.2 < np.mean(widths) <= 3.7 - 16 / 128 + 1e-9, sorted(widths)
    assert "3.7" in plan.notes or "3.70" in plan.notes or "under" in plan.notes
    with pytest.raises(Exception, match="between 2 and 8|2 to 16"):
        s.preset("quantise", 11.5)
    stats = tmp_path / "stats.json"
    s.stats.save(stats)
    for extra, said in ((["--budget-gb", "0.005", "--avg-bits", "3"], "give one of them"),
                        (["--avg-bits", "1e308"], "2 to 16 bits"), (["--budget-gb", "inf"], "positive number")):
        code = main(["plan", "demo", "--stats", str(stats), "--quantise", "4", *extra, "--out",
                     str(tmp_path / "p.json")])
        assert code != 0 and said in capsys.readouterr().err, extra
        assert not (tmp_path / "p.json").exists()
    with pytest.raises(PlanError, match="NaN or infinity"):
        Plan(drop_experts={0: [1]}, notes="x", recipe=[{"planner": "q", "budget_bytes": math.inf}]).to_json()


def test_the_bit_allocation_is_within_its_stated_gap_of_the_best_at_deepseek_v3_size():
    """58 x 256 experts, four widths: the allocation fits the budget and is within 1e-3 of the LP bound (the solver
    stopped at its time limit 3.5x above the bound, unsaid); on a small instance it is milp's optimum."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    from explorer.ops.quantise import bits_per_weight
    from explorer.planners.quantise import _solve

    rng = np.random.default_rng(0)
    for n in (40, 58 * 256):
        size = np.tile([bits_per_weight(b, 128) / 8 * 1e6 for b in (2, 3, 4, 8)], (n, 1)) * rng.uniform(.9, 1.1, (n, 1))
        cost = rng.lognormal(0, 1, (n, 1)) * np.array([1.0, .3, .08, .002]) * rng.uniform(.5, 1.5, (n, 4))
        budget = size[:, 0].sum() + 0.4 * (size[:, 2].sum() - size[:, 0].sum())
        pick, gap = _solve(cost.reshape(-1), size.reshape(-1), budget, 4)
        assert pick.reshape(n, 4).sum(1).tolist() == [1] * n and size.reshape(-1)[pick].sum() <= budget
        if n == 40:
            one = csr_matrix((np.ones(4 * n), (np.repeat(np.arange(n), 4), np.arange(4 * n))), shape=(n, 4 * n))
            best = milp(cost.reshape(-1), integrality=np.ones(4 * n), bounds=Bounds(0, 1),
                        constraints=[LinearConstraint(one, 1, 1), LinearConstraint(size.reshape(1, -1), 0, budget)])
            assert cost.reshape(-1)[pick].sum() == pytest.approx(best.fun, rel=1e-9)
        else:
            assert gap < 1e-3


def test_a_family_that_saves_its_experts_fused_is_counted_as_written(tmp_path):
    """GPT-OSS saves its experts fused, so its export stays dequantised: the report counts them at full size (it
    said 0.39 of what was written)."""
    from explorer.apply import export, weight_bytes
    from explorer.plan import Plan

    model = tiny_model("gpt_oss", seed=1)
    view = MoEModel(model)
    plan = Plan.from_dict({"quantise": {"bits": 4, "group_size": 16}})
    new, _, layout = apply_plan(model, view, plan)
    out = export(new, None, plan, tmp_path / "q4", layout=layout)
    assert abs(plan.report(view)["bytes_after"] - weight_bytes(out)) <= 0.01 * weight_bytes(out)
    assert "dequantised" in json.loads((out / "summary.json").read_text())["weight_format"]


def test_mixed_widths_stay_dequantised_because_transformers_reads_one_expert_scheme(tmp_path):
    """Issue 27 asked for one compressed-tensors group per bit width. Written that way (each group naming the
    in-memory experts modules of its layers), transformers reloads another model: it decompresses every expert with
    the one scheme ``get_experts_scheme`` picks. So mixed widths are written dequantised, and their size is counted
    as written. When this canary fails, transformers reads per-group expert schemes and the packed form can be used."""
    import re

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from explorer import packing
    from explorer.apply import export
    from explorer.ops.quantise import EXPERT_KEY, _scale_rows, compact_refusal

    model = tiny_model("mixtral", seed=5)
    view = MoEModel(model)
    widths = [2, 8, 4]
    plan = Plan.loads(json.dumps({"quantise": {"bits": 4, "group_size": 16, "per_expert": {
        str(i): {str(e): widths[i] for e in range(8)} for i in range(len(view))}}}))
    assert "get_experts_scheme" in compact_refusal(plan.ops["quantise"])
    ids = _blocks(2).input_ids
    with torch.no_grad():
        with previewing(model, view, plan):
            prev = model(ids).logits
        new, _, _ = apply_plan(model, view, plan)
        out = export(new, None, plan, tmp_path / "q")  # dequantised: reloads to the preview
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits, prev,
                                   rtol=1e-4, atol=1e-4)
        # the same export rewritten with one group per width, as the issue asked
        names = {id(m): n for n, m in new.named_modules()}
        owners = {lay.layer_idx: lay.experts for lay in MoEModel(new)}
        shard = next(out.glob("*.safetensors"))
        tensors = {}
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():
                t, m = f.get_tensor(k), EXPERT_KEY.search(k)
                if m and t.dim() == 2:
                    li, slot = int(m[1]), int(m[2])
                    note = owners[li]._explorer_notes["quantise"][slot]
                    tensors.update(packing.packed(k, t, _scale_rows(owners[li], note, slot, t),
                                                  packing.scheme(note[0], 16)[1]))
                else:
                    tensors[k] = t
        packing.rewrite_shard(out, shard, tensors)
        packing.declare(out, {f"experts_{b}bit": {"targets": [names[id(owners[i])]], "weights":
                                                 packing.scheme(b, 16)[0].model_dump()} for i, b in enumerate(widths)})
        got = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert re.search(r"experts$", names[id(owners[0])])
    assert (got - prev).abs().max() > 0.1  # another model: why the explorer writes mixed widths dequantised

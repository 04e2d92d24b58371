"""Preview equals apply on every family and operation; exports reload; depth drops still generate; statistics of
another model are refused."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from explorer import load_model, perplexity
from explorer.apply import apply_plan, export
from explorer.moe import MoEModel
from explorer.plan import Plan
from explorer import planners
from explorer.preview import preview_perplexity, previewing
from explorer.stats import collect_stats
from explorer.tiny import TINY_CONFIGS, tiny_model, random_blocks


def _blocks(n=8, L=32, seed=0):
    return random_blocks(n, L, seed)


def _logits(model, blocks):
    with torch.no_grad():
        return model(input_ids=blocks.input_ids, attention_mask=blocks.attention_mask()).logits


def _family_plans(family, view):
    n = len(view)
    drop = [0, 1, 4, 5] if family == "deepseek_v3" else [0, 3]
    plans = {"drop": Plan(drop_experts={i: drop for i in range(n)}),
             "merge": Plan(merge={i: [[1, 2], [4, 6]] for i in range(n)}),  # experts that differ
             "layer": Plan(drop_layers=[n - 1]),
             "block": Plan(drop_blocks=[len(view.decoder_layers) - 2]),
             "slim": Plan(slim=0.5),
             "prune": Plan(prune={"sparsity": 0.5, "method": "moe-pruner"})}
    if family == "deepseek_v3":  # dropped experts falling unevenly into the routing groups (0-3 | 4-7)
        plans["drop-uneven"] = Plan(drop_experts={i: [0, 1] for i in range(n)})
        plans["merge-uneven"] = Plan(merge={i: [[5, 0], [6, 1]] for i in range(n)})
    return plans


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_preview_equals_apply_and_export_round_trip(family, tmp_path):
    model = tiny_model(family, seed=3)
    view = MoEModel(model)
    blocks = _blocks(n=4)
    stats = collect_stats(model, view, blocks)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = _logits(model, blocks)
    for name, plan in _family_plans(family, view).items():
        with previewing(model, view, plan, stats):
            pv_logits = _logits(model, blocks)
        assert (pv_logits - base).abs().max() > 1e-4, name  # the plan changes something: the check can fail
        pv = preview_perplexity(model, view, plan, blocks, stats).ppl
        new, nv, layout = apply_plan(model, view, plan, stats)
        assert (_logits(new, blocks) - pv_logits).abs().max() < 1e-4, name
        ap = perplexity(new, blocks).ppl
        assert ap == pytest.approx(pv, rel=1e-4), name
        rep = plan.report(view)
        assert rep["params_after"] == sum(p.numel() for p in new.parameters()), name
        out = export(new, None, plan, tmp_path / name, layout=layout, summary={"ppl": ap})
        assert json.loads((out / "plan.json").read_text())["version"] == 1
        if layout is None:  # what vLLM-style loaders need: a stock config and plain from_pretrained
            loaded = AutoModelForCausalLM.from_pretrained(out)
        else:
            loaded = load_model(out, device="cpu", with_tokenizer=False)[0]
        assert perplexity(loaded, blocks).ppl == pytest.approx(ap, rel=1e-4), name
        assert rep["loadable_by_transformers"] == (layout is None), name
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_expert_counts_are_consistent_for_every_kernel(impl):
    """A stale cached count makes grouped_mm fail while eager still runs: test both."""
    model = tiny_model("qwen3_moe", experts_implementation=impl)
    view = MoEModel(model)
    new, nv, layout = apply_plan(model, view, Plan(drop_experts={i: [1, 6] for i in range(len(view))}))
    assert layout is None and nv.num_experts == [6, 6, 6]
    assert new.config.num_experts == 6
    for lay in nv:
        assert lay.experts.num_experts == 6 and lay.router.num_experts == 6
    with torch.no_grad():
        out = new(input_ids=torch.randint(0, 256, (2, 16)))
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("family,plan", [("mixtral", Plan(drop_blocks=[1])), ("qwen3_moe", Plan(drop_layers=[0])),
                                         ("gpt_oss", Plan(drop_blocks=[0]))])
def test_generation_works_after_depth_drops(family, plan):
    """Greedy generation with the KV cache equals step-by-step argmax without a cache."""
    model = tiny_model(family, seed=2)
    new, _, _ = apply_plan(model, MoEModel(model), plan)
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gen = new.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        ids = prompt
        for _ in range(8):
            nxt = new(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    assert torch.equal(gen, ids)


def test_align_recovers_twins_with_permuted_neurons():
    """Expert 3 is expert 2 with its hidden neurons shuffled: aligned merging is exact, plain averaging is not."""
    model = tiny_model("mixtral", seed=6, num_experts_per_tok=1)
    view = MoEModel(model)
    lay = view[0]
    perm = torch.randperm(lay.intermediate_size, generator=torch.Generator().manual_seed(0))
    from explorer.neurons import select_neurons

    with torch.no_grad():
        lay.router_weight[3] = lay.router_weight[2]
        lay.router_weight[3, 0] -= 1e-3  # ties go to 2; 3 is (almost) never chosen
        gu, dn, _ = select_neurons(lay, lay.gate_up[2], lay.down[2], None, perm)
        lay.gate_up[3], lay.down[3] = gu, dn
    blocks = _blocks()
    stats = collect_stats(model, view, blocks)
    ppl = perplexity(model, blocks).ppl
    plan = Plan(merge={0: [[2, 3]]}, merge_weights={0: [[1.0, 1.0]]})
    plain = preview_perplexity(model, view, plan, blocks, stats).ppl
    plan.merge_align = True
    aligned = preview_perplexity(model, view, plan, blocks, stats).ppl
    assert aligned == pytest.approx(ppl, rel=1e-5)
    assert abs(plain / ppl - 1) > 1e-3
    new, _, _ = apply_plan(model, view, plan, stats)
    assert perplexity(new, blocks).ppl == pytest.approx(aligned, rel=1e-5)


def test_unstructured_pruning_hits_its_sparsity():
    model = tiny_model("mixtral", seed=4)
    view = MoEModel(model)
    stats = collect_stats(model, view, _blocks())
    for method, nm in (("moe-pruner", None), ("wanda", None), ("moe-pruner", [2, 4])):
        new, nv, _ = apply_plan(model, view, planners.prune_weights(stats, 0.5, method, nm), stats)
        z = float((nv[0].gate_up == 0).float().mean())
        assert z == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("other", [dict(moe_intermediate_size=64), dict(num_experts=16), dict(family="olmoe")])
@pytest.mark.parametrize("plan", [Plan(slim=0.5), Plan(prune={"sparsity": 0.5}), Plan(merge={0: [[0, 1]]})])
def test_statistics_of_another_model_are_refused(other, plan, tmp_path):
    from explorer.checkpoint import apply_checkpoint
    from explorer.stats import StatsFileError

    model = tiny_model("qwen3_moe", seed=4)
    view = MoEModel(model)
    other = dict(other)
    theirs = tiny_model(other.pop("family", "qwen3_moe"), seed=4, **other)
    stats = collect_stats(theirs, MoEModel(theirs), _blocks())
    for run in (lambda: apply_plan(model, view, plan, stats),
                lambda: preview_perplexity(model, view, plan, _blocks(), stats),
                lambda: planners.make("slim_experts", stats, view, keep=0.5)):
        with pytest.raises(StatsFileError, match="do not belong to this model"):
            run()
    model.save_pretrained(tmp_path / "m")
    if plan.prune is None:
        with pytest.raises(StatsFileError, match="do not belong to this model"):
            apply_checkpoint(tmp_path / "m", plan, tmp_path / "out", stats=stats)
    assert not (tmp_path / "out").exists()


def test_preview_and_apply_agree_in_bf16_as_the_readme_says(demo, demo_data):
    """float32: the same numbers. bfloat16: matrix products of other shapes round differently, near-tied routing
    flips for a few tokens; perplexity agrees to a few 1e-4 (README, bench/bf16_agreement.py)."""
    import copy

    model = copy.deepcopy(demo[0]).to(torch.bfloat16)
    view = MoEModel(model)
    plan = Plan(drop_experts={i: [1, 5] for i in range(len(view))})
    blocks = demo_data.eval.subset(range(16))
    prev = preview_perplexity(model, view, plan, blocks).ppl
    new, _, _ = apply_plan(model, view, plan)
    applied = perplexity(new, blocks).ppl
    assert abs(prev / applied - 1) < 2e-3
    few = blocks.subset(range(4))
    mask = few.attention_mask().bool()
    with torch.inference_mode():
        with previewing(model, view, plan):
            a = model(input_ids=few.input_ids, attention_mask=few.attention_mask()).logits.float()[mask]
        b = new(input_ids=few.input_ids, attention_mask=few.attention_mask()).logits.float()[mask]
    assert (a.argmax(-1) != b.argmax(-1)).float().mean() < 0.03  # the most likely next token, nearly everywhere
    assert ((a - b).abs().amax(-1) > 0.25).float().mean() < 0.05  # bf16 spacing near |logit| 4 is 0.03


def test_layer_drop_beside_block_drop_applies_as_it_previews(tmp_path):
    """A plan with both drop_layers and drop_blocks (the JSON editor, a recipe) previewed, then apply refused it
    ("layer pattern no longer matches"): a dropped MoE sub-layer now counts as the block it replaced. In memory,
    exported and out of core, it is the preview."""
    from explorer.checkpoint import apply_checkpoint

    model = tiny_model("mixtral", seed=5)
    view = MoEModel(model)
    blocks = random_blocks(4, 24, seed=1)
    plan = Plan(drop_layers=[0], drop_blocks=[1])
    plan.validate(view)
    with previewing(model, view, plan):
        want = _logits(model, blocks)
    new, _, layout = apply_plan(model, view, plan)
    assert torch.allclose(_logits(new, blocks), want, atol=1e-5)
    back, _, _ = load_model(export(new, None, plan, tmp_path / "mem", layout=layout), with_tokenizer=False,
                            device="cpu")
    assert torch.allclose(_logits(back, blocks), want, atol=1e-5)
    model.save_pretrained(tmp_path / "src")
    ooc, _, _ = load_model(apply_checkpoint(tmp_path / "src", plan, tmp_path / "ooc"), with_tokenizer=False,
                           device="cpu")
    assert torch.allclose(_logits(ooc, blocks), want, atol=1e-5)


@pytest.mark.parametrize("family,kw", [("qwen2_moe", dict(decoder_sparse_step=2, num_hidden_layers=4)),
                                       ("jamba", {})])
def test_a_block_drop_apply_would_refuse_is_refused_before_the_preview(family, kw):
    """Qwen2-MoE with decoder_sparse_step=2: Block Drop of a middle block previewed, and apply then refused it.
    validate now says it, so neither the preview nor the report accepts it."""
    from explorer.plan import PlanError

    model = tiny_model(family, seed=3, **kw)
    view = MoEModel(model)
    plan = Plan(drop_blocks=[1])
    with pytest.raises(PlanError, match="layer pattern no longer matches"):
        plan.validate(view)
    with pytest.raises(PlanError, match="layer pattern no longer matches"):
        with previewing(model, view, plan):
            pass
    with pytest.raises(PlanError, match="layer pattern no longer matches"):
        plan.report(view)
    Plan(drop_blocks=[len(view.decoder_layers) - 1]).validate(view)  # the last block: fine

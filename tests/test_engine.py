"""Compression engine: criteria find planted redundancy; plans validate; preview equals apply; exports load."""
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from explorer import load_model, perplexity
from explorer.apply import apply_plan, export
from explorer.data import TokenBlocks
from explorer.moe import MoEModel
from explorer.plan import Plan, PlanError
from explorer import planners
from explorer.preview import preview_perplexity, previewing
from explorer.saliency import expert_scores, expert_similarity, spearman
from explorer.stats import collect_stats
from explorer.tiny import TINY_CONFIGS, tiny_model

DEAD, TWIN_A, TWIN_B, ZERO_LAYER = 5, 2, 3, 1


def _blocks(n=8, L=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, L), generator=g)
    lengths = torch.full((n,), L)
    return TokenBlocks(ids, lengths, torch.arange(n) % 2, ["a", "b"], (lengths - 1).double(), L)


@pytest.fixture(scope="module")
def planted():
    """GPT-OSS layout (router bias, transposed experts), top-1: expert 5 of MoE layer 0 is never routed (router
    bias -1e4), experts 2 and 3 of layer 0 are identical (router row, bias and weights; ties go to 2), and MoE layer 1
    outputs zero (all down projections and biases zero)."""
    model = tiny_model("gpt_oss", seed=7, num_experts_per_tok=1)
    view = MoEModel(model)
    with torch.no_grad():
        l0 = view[0]
        l0.router_bias[DEAD] = -1e4
        l0.router_weight[TWIN_B] = l0.router_weight[TWIN_A]
        l0.router_bias[TWIN_B] = l0.router_bias[TWIN_A]
        for t in (l0.gate_up, l0.down, l0.gate_up_bias, l0.down_bias):
            t[TWIN_B] = t[TWIN_A]
        l1 = view[ZERO_LAYER]
        l1.down.zero_()
        l1.down_bias.zero_()
    blocks = _blocks()
    stats = collect_stats(model, view, blocks)
    return model, view, blocks, stats


def test_dead_expert_scores_lowest(planted):
    model, view, blocks, stats = planted
    for crit in ("frequency", "gate-mass", "reap"):
        s = expert_scores(stats, crit)[0]
        assert s[DEAD] == s.min(), crit
        assert s[DEAD] < np.sort(s)[2], crit  # only the never-chosen twin may tie with it
    assert expert_scores(stats, "gate-mass")[0].argmin() == DEAD  # strictly lowest: it has no router mass
    ppl = perplexity(model, blocks).ppl
    plan = Plan(drop_experts={0: [DEAD]})
    assert preview_perplexity(model, view, plan, blocks).ppl == pytest.approx(ppl, rel=1e-5)
    new, _, _ = apply_plan(model, view, plan)
    assert perplexity(new, blocks).ppl == pytest.approx(ppl, rel=1e-5)


def test_twins_have_similarity_one_and_merge_for_free(planted):
    model, view, blocks, stats = planted
    for kind in ("router-logits", "weights"):
        assert expert_similarity(stats, 0, kind, view)[TWIN_A, TWIN_B] == pytest.approx(1.0, abs=1e-6)
    assert expert_similarity(stats, 0, "mean-output")[TWIN_A, TWIN_B] == pytest.approx(1.0, abs=1e-5)
    ppl = perplexity(model, blocks).ppl
    plan = Plan(merge={0: [[TWIN_A, TWIN_B]]})
    for align in (False, True):
        plan.merge_align = align
        assert preview_perplexity(model, view, plan, blocks, stats).ppl == pytest.approx(ppl, rel=1e-5)
        new, nv, _ = apply_plan(model, view, plan, stats)
        assert nv[0].num_experts == 7  # stored once, not as an alias per member
        assert perplexity(new, blocks).ppl == pytest.approx(ppl, rel=1e-5)
    # the MC-SMoE planner puts the unused twin with its dominant twin
    mplan = planners.merge_experts(stats, {0: 6}, "mc-smoe")
    assert any(TWIN_A in g and TWIN_B in g for g in mplan.merge[0])


def test_zero_layer_is_least_important_and_free_to_drop(planted):
    model, view, blocks, stats = planted
    imp = stats.layer_importance()
    assert imp.argmin() == ZERO_LAYER and imp[ZERO_LAYER] == pytest.approx(0.0, abs=1e-6)
    plan = planners.drop_layers(stats, 1)
    assert plan.drop_layers == [ZERO_LAYER]
    ppl = perplexity(model, blocks).ppl
    assert preview_perplexity(model, view, plan, blocks).ppl == pytest.approx(ppl, rel=1e-5)
    new, _, layout = apply_plan(model, view, plan)
    assert layout is not None  # a stock config cannot say "no MoE here"
    assert perplexity(new, blocks).ppl == pytest.approx(ppl, rel=1e-5)


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


def test_plan_validation_messages():
    view = MoEModel(tiny_model("mixtral"))
    bad = [
        (Plan(drop_experts={0: list(range(8))}), "removes every expert"),
        (Plan(drop_experts={0: [0, 1, 2, 3, 4, 5, 6]}), "fewer than top-k"),
        (Plan(merge={1: [[0, 1], [1, 2]]}), "named twice"),
        (Plan(merge={1: [[0, 0]]}), "named twice"),
        (Plan(drop_experts={0: [1]}, merge={0: [[1, 2]]}), "named twice"),
        (Plan(drop_experts={7: [1]}), "does not exist"),
        (Plan(drop_experts={0: [9]}), "does not exist"),
        (Plan(drop_blocks=[0, 1, 2]), "every decoder layer"),
        (Plan(drop_layers=[1], drop_blocks=[1]), "dropped twice"),
        (Plan(slim=0.0), "slim"),
        (Plan(prune={"sparsity": 1.5}), "sparsity"),
        (Plan(prune={"sparsity": 0.5, "nm": [4, 2]}), "N:M"),
    ]
    for plan, msg in bad:
        with pytest.raises(PlanError, match=msg):
            plan.validate(view)
    ds = MoEModel(tiny_model("deepseek_v3"))
    with pytest.raises(PlanError, match="divisible by n_group"):
        Plan(drop_experts={0: [0]}).validate(ds)
    with pytest.raises(PlanError, match="statistics"):
        preview_perplexity(view.model, view, Plan(slim=0.5), _blocks(n=2))


def test_plan_round_trips_json_and_yaml(tmp_path):
    p = Plan(drop_experts={0: [1, 2]}, merge={1: [[0, 3, 4]]}, merge_weights={1: [[3.0, 1.0, 1.0]]},
             slim=0.75, drop_blocks=[2], prune={"sparsity": 0.5, "method": "wanda", "nm": [2, 4]}, notes="x")
    p.to_json(tmp_path / "p.json")
    p.to_yaml(tmp_path / "p.yaml")
    for f in ("p.json", "p.yaml"):
        q = Plan.load(tmp_path / f)
        assert q.to_dict() == p.to_dict()
    with pytest.raises(PlanError, match="unknown plan field"):
        Plan.loads('{"drop_expert": {}}')
    with pytest.raises(PlanError, match="empty"):
        Plan.loads("  ")
    with pytest.raises(PlanError, match=r"drop_experts must map MoE layers to lists"):
        Plan.loads("drop_experts: [1]")  # what an editor's auto-closed bracket makes of a typo
    with pytest.raises(PlanError, match=r"drop_blocks must be a list"):
        Plan.loads('{"drop_blocks": 3}')
    with pytest.raises(PlanError, match="malformed plan"):
        Plan.loads('{"merge": {"0": [1, 2]}}')


def test_planners_and_report():
    model = tiny_model("mixtral", seed=4)
    view = MoEModel(model)
    stats = collect_stats(model, view, _blocks())
    p = planners.drop_experts(stats, 0.25, "frequency")
    assert all(len(v) == 2 for v in p.drop_experts.values())
    counts = stats.layers[0]["count"]
    assert set(p.drop_experts[0]) == set(np.argsort(counts, kind="stable")[:2])
    g = planners.drop_experts(stats, 0.25, "reap", mode="global")
    assert sum(len(v) for v in g.drop_experts.values()) == 6
    skip = planners.drop_experts(stats, 0.5, "reap", skip_layers=[1], layer_fractions={2: 0.25})
    assert 1 not in skip.drop_experts and len(skip.drop_experts[2]) == 2 and len(skip.drop_experts[0]) == 4
    for method in ("mc-smoe", "hc-smoe"):
        m = planners.merge_experts(stats, 4, method)
        m.validate(view)
        assert all(8 - sum(len(x) - 1 for x in m.merge[i]) == 4 for i in range(3))
    rep = p.report(view)
    assert rep["params_after"] < rep["params_before"] and rep["active_after"] == rep["active_before"]
    assert rep["bytes_bf16_after"] == 2 * rep["params_after"] and rep["loadable_by_transformers"]
    s = planners.slim_experts(stats, 0.5).report(view)
    assert s["active_after"] < s["active_before"]
    assert spearman(np.arange(5), np.arange(5) ** 2) == pytest.approx(1.0)


def test_super_experts_are_protected():
    """Expert 6 of layer 0 is the least used (frequency would drop it first) and has massive activations."""
    model = tiny_model("mixtral", seed=4)
    view = MoEModel(model)
    with torch.no_grad():
        view[0].router_weight[6] *= 0.05  # rarely chosen, but still chosen for some tokens
        view[0].down[6] *= 200.0  # a massive-activation expert in an early layer
    stats = collect_stats(model, view, _blocks())
    assert 0 < stats.layers[0]["count"][6] == stats.layers[0]["count"].min()
    from explorer.saliency import super_experts

    assert (0, 6) in super_experts(stats)
    unprotected = planners.drop_experts(stats, 0.5, "frequency")
    assert 6 in unprotected.drop_experts[0]  # without protection the criterion drops it
    p = planners.drop_experts(stats, 0.5, "frequency", protect_super=True)
    assert 6 not in p.drop_experts[0] and len(p.drop_experts[0]) == 4


def test_align_recovers_twins_with_permuted_neurons():
    """Expert 3 is expert 2 with its hidden neurons shuffled: aligned merging is exact, plain averaging is not."""
    model = tiny_model("mixtral", seed=6, num_experts_per_tok=1)
    view = MoEModel(model)
    lay = view[0]
    perm = torch.randperm(lay.intermediate_size, generator=torch.Generator().manual_seed(0))
    from explorer.transform import select_neurons

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


def test_reconstruction_and_ablation_criteria(planted):
    model, view, blocks, stats = planted
    rec = expert_scores(stats, "reconstruction", model=model, view=view, blocks=blocks)
    abl = expert_scores(stats, "ablation", model=model, view=view, blocks=blocks)
    assert rec[0][DEAD] <= np.sort(rec[0])[1]  # the two never-routed experts (dead, unused twin) go first
    assert abs(abl[0][DEAD]) < 1e-6
    assert abl[ZERO_LAYER] == pytest.approx(np.zeros(8), abs=1e-6)


@pytest.mark.parametrize("criterion", ["reconstruction", "ablation"])
def test_model_run_criteria_sample_every_domain(criterion):
    """Blocks sorted by domain (as every loaded dataset is): the criteria must see text of each domain, not the
    first blocks of one."""
    model = tiny_model("mixtral", seed=4)
    view = MoEModel(model)
    g = torch.Generator().manual_seed(0)
    n, L = 12, 32
    doms = torch.arange(n) // 3  # four domains of three blocks each, in order
    ids = torch.randint(0, 64, (n, L), generator=g) + 64 * doms[:, None]  # each domain its own id range
    blocks = TokenBlocks(ids, torch.full((n,), L), doms, ["a", "b", "c", "d"], torch.full((n,), L - 1.0), L)
    seen = []
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].flatten()))
    try:
        expert_scores(None, criterion, model=model, view=view, blocks=blocks, max_tokens=4 * L)
    finally:
        hook.remove()
    assert set((torch.cat(seen) // 64).tolist()) == {0, 1, 2, 3}


def test_unstructured_pruning_hits_its_sparsity():
    model = tiny_model("mixtral", seed=4)
    view = MoEModel(model)
    stats = collect_stats(model, view, _blocks())
    for method, nm in (("moe-pruner", None), ("wanda", None), ("moe-pruner", [2, 4])):
        new, nv, _ = apply_plan(model, view, planners.prune_weights(stats, 0.5, method, nm), stats)
        z = float((nv[0].gate_up == 0).float().mean())
        assert z == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("sparsity,nm", [(0.5, [2, 4]), (0.0, [1, 4]), (0.7, [3, 4]), (0.3, None)])
def test_report_counts_the_weights_pruning_really_zeroes(sparsity, nm):
    """N:M keeps N of every M whatever the sparsity field says: the report counts what apply writes."""
    model = tiny_model("qwen3_moe", seed=4)
    view = MoEModel(model)
    stats = collect_stats(model, view, _blocks())
    plan = Plan(prune={"sparsity": sparsity, "method": "wanda", "nm": nm})
    rep = plan.report(view)
    new, _, _ = apply_plan(model, view, plan, stats)
    zeros = sum(int((p == 0).sum()) - int((q == 0).sum()) for p, q in zip(new.parameters(), model.parameters()))
    assert rep["params_nonzero_after"] == pytest.approx(rep["params_after"] - zeros, rel=1e-5)
    if nm:
        assert f"{nm[0]}:{nm[1]}" in plan.describe()


@pytest.mark.parametrize("plan", [Plan(slim=0.5, drop_blocks=[1]), Plan(slim=0.5, drop_blocks=[0]),
                                  Plan(drop_experts={0: [1], 1: [1]}, slim=0.75, drop_blocks=[2])])
def test_what_the_report_calls_loadable_loads_with_plain_transformers(plan, tmp_path):
    model = tiny_model("qwen3_moe", seed=4, num_hidden_layers=3)
    view = MoEModel(model)
    stats = collect_stats(model, view, _blocks())
    plan = Plan.loads(plan.to_json()).validate(view)
    assert plan.report(view)["loadable_by_transformers"]
    new, _, layout = apply_plan(model, view, plan, stats)
    out = export(new, None, plan, tmp_path / "out", layout=layout)
    plain = AutoModelForCausalLM.from_pretrained(out)
    ids = _blocks(n=2).input_ids
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, new(ids).logits, rtol=1e-5, atol=1e-5)


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


def test_recipe_replays_on_another_model():
    """A plan prototyped on one model is replayed on another (different size) from its own statistics."""
    small = tiny_model("mixtral", seed=4)
    big = tiny_model("mixtral", seed=5, num_local_experts=16, num_hidden_layers=4)
    s_stats = collect_stats(small, MoEModel(small), _blocks())
    plan = planners.drop_experts(s_stats, 0.25, "reap", protect_super=True).combine(planners.slim_experts(s_stats, 0.75))
    back = Plan.loads(plan.to_json())
    bview = MoEModel(big)
    b_stats = collect_stats(big, bview, _blocks())
    replayed = planners.replay(back.recipe, b_stats, bview)
    replayed.validate(bview)
    assert len(replayed.drop_experts) == 4 and all(len(v) == 4 for v in replayed.drop_experts.values())
    assert replayed.slim == 0.75
    with pytest.raises(PlanError, match="no recipe"):
        planners.replay([], b_stats)

"""Planners and criteria: they find planted redundancy (dead experts, twins, a zero layer), protect super experts,
score by reconstruction and ablation, and replay a recipe on another model."""
import numpy as np
import pytest
import torch

from explorer import perplexity
from explorer.apply import apply_plan
from explorer.data import TokenBlocks
from explorer.moe import MoEModel
from explorer.plan import Plan, PlanError
from explorer import planners
from explorer.preview import preview_perplexity
from explorer.saliency import expert_scores, expert_similarity, spearman
from explorer.stats import collect_stats
from explorer.tiny import tiny_model, random_blocks

DEAD, TWIN_A, TWIN_B, ZERO_LAYER = 5, 2, 3, 1


def _blocks(n=8, L=32, seed=0):
    return random_blocks(n, L, seed)


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


def test_a_merge_is_never_averaged_in_silence(planted, tmp_path):
    """A merge plan without merge_weights (the JSON editor, a hand-written recipe) was applied as a plain average
    without --stats while the app previewed it weighted by use (logits 0.6 apart). Without weights or statistics it
    is refused in words; the session writes the weights it previews with into the plan it keeps."""
    from explorer.apply import apply_plan
    from explorer.cli import main
    from explorer.session import Session

    model, view, blocks, stats = planted
    plan = Plan(merge={0: [[1, 2]]})
    with pytest.raises(PlanError, match="no merge_weights and no statistics"):
        apply_plan(model, view, plan)
    with pytest.raises(PlanError, match="no merge_weights and no statistics"):
        preview_perplexity(model, view, plan, blocks)
    weighted, _, _ = apply_plan(model, view, plan, stats)
    s = Session(max_tokens=256)
    s.load("demo", device="cpu")
    s.set_data("demo")
    s.collect()
    kept = s.set_plan('{"merge": {"1": [[0, 3]]}}')
    c = s.stats.layers[1]["count"]
    assert kept.merge_weights == {1: [[pytest.approx(float(c[0])), pytest.approx(float(c[3]))]]}
    kept.to_json(tmp_path / "plan.json")
    assert main(["apply", "demo", str(tmp_path / "plan.json"), "--no-eval", "--out", str(tmp_path / "cut")]) == 0

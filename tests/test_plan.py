"""Plans: validation messages, JSON/YAML round trips, and the report's parameter, zero and loadability accounting."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from explorer.apply import apply_plan, export
from explorer.moe import MoEModel
from explorer.plan import Plan, PlanError
from explorer.preview import preview_perplexity
from explorer.stats import collect_stats
from explorer.tiny import tiny_model, random_blocks


def _blocks(n=8, L=32, seed=0):
    return random_blocks(n, L, seed)


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


@pytest.mark.parametrize("family", ["jamba", "granitemoeshared", "deepseek_v3", "qwen2_moe"])
def test_the_report_knows_which_slimmed_families_a_stock_config_describes(family):
    """One rule (a narrower config built on the meta device) says whether slimmed experts can be described by a
    stock config: Jamba's dense MLPs share the experts' width field (not describable, though it has no shared
    expert); GraniteMoE-Shared sizes its shared expert by a field of its own (describable, though it has one)."""
    model = tiny_model(family, seed=1)
    view = MoEModel(model)
    stats = collect_stats(model, view, _blocks(4, 16))
    plan = Plan(slim=0.5)
    rep = plan.report(view)
    _, _, layout = apply_plan(model, view, plan, stats=stats)
    assert rep["loadable_by_transformers"] == (layout is None)
    if not rep["loadable_by_transformers"]:
        assert "also sizes" in rep["loader_note"]


def test_grouped_routing_that_scores_groups_by_two_experts():
    """DeepSeek-V3 scores each group by its two best experts (transformers' topk(2)): a plan keeping one expert per
    group passed validate and the report, then preview and apply crashed; an 8-expert model with n_group=4,
    topk_group=4 (two per group), which transformers runs, was refused at load by the self-check."""
    import torch

    from explorer.apply import apply_plan
    from explorer.moe import MoEModel
    from explorer.preview import previewing
    from explorer.tiny import random_blocks, tiny_model

    model = tiny_model("deepseek_v3", seed=2, n_routed_experts=8, n_group=4, topk_group=4, num_experts_per_tok=2)
    view = MoEModel(model)  # the self-check passes
    assert view[0].groups == (4, 4)
    one_each = Plan(drop_experts={i: [0, 2, 4, 6] for i in range(len(view))})
    with pytest.raises(PlanError, match="two best experts: keep at least 2 per group"):
        one_each.validate(view)
    with pytest.raises(PlanError, match="two best experts"):
        one_each.report(view)
    blocks = random_blocks(2, 16, seed=0, vocab=model.config.vocab_size)
    drop_one_layer = Plan(drop_experts={0: [], 1: []})  # every layer whole: a valid plan previews and applies
    with previewing(model, view, drop_one_layer):
        pass
    new, _, _ = apply_plan(model, view, drop_one_layer)
    with torch.no_grad():
        assert torch.isfinite(new(input_ids=blocks.input_ids).logits).all()

"""The session's parts: what each holds, and what a new model or new statistics make it forget."""
import numpy as np
import pytest

from explorer.plan import Plan
from explorer.session import Session, SessionError


@pytest.fixture(scope="module")
def session():
    s = Session(max_tokens=512)
    s.load("demo")
    s.collect()
    return s


def test_a_new_model_forgets_the_old_ones_plans_scores_and_students(session):
    """Plans, previews, task scores and students belong to the model they were made on; the chart's size axis is
    the user's choice and stays. (The task scores of the previous model used to survive a new load and stand
    beside the new model's plans.)"""
    s = session
    s.set_plan(Plan(drop_experts={0: [1]}))
    s.preview()
    s.base_scores = {"demo_next_word": {"value": 0.5, "stderr": 0.02}}
    s.task_key = ("demo_next_word", 20)
    s.pareto_x, s.pareto_y = "bytes", "task:demo_next_word"
    s.pick_for_merge(1, 2)
    assert s.tried and s.base_tasks
    s.load("demo")
    assert s.plan.is_empty() and s.pending is None and s.tried == [] and s.students == {}
    assert s.base_scores is None and s.base_tasks == {} and s.task_key is None and s.pareto_y == "ppl"
    assert s.pareto_x == "bytes" and s.stats is None
    with pytest.raises(SessionError, match="collect statistics first"):
        s.preset("drop-experts", 0.25)


def test_new_statistics_measure_previews_again(session):
    s = session
    if s.stats is None:
        s.collect()
    s.set_plan(Plan(drop_experts={0: [1]}))
    first = s.preview()
    assert s._previews
    s.collect()
    assert not s._previews  # measured again on the new statistics, not served from the cache
    assert s.preview()["ppl"] == pytest.approx(first["ppl"])


def test_each_part_owns_its_state():
    """Starting one part of the session again (a new plan, new trials) resets that part's state and no other's."""
    from explorer.plan import Plan

    s = Session()
    parts = {"_init_editor": {"plan", "pending"}, "_init_trials": {"tried", "students", "base_scores", "plan_tasks"}}
    marked = {"plan": Plan(drop_experts={0: [1]}), "pending": (0, [1]), "tried": [{"name": "x"}],
              "students": {"x": object()}, "base_scores": {"t": 1.0}, "plan_tasks": {"x": {}}, "data_source": "mine",
              "block_len": 77}
    for part, owned in parts.items():
        for a, v in marked.items():
            setattr(s, a, v)
        getattr(s, part)()
        for a, v in marked.items():
            if a in owned:
                assert getattr(s, a) != v, (part, a)  # its own state starts again
            else:
                assert getattr(s, a) is v, (part, a)  # the others' is left as it was


def test_the_quantise_preset_offers_attention_through_its_methods(session):
    """The preset's method menu comes from the operations: quantise adds attention (and shared experts where the
    model has them) at 8 bits; a method the model cannot do is refused in words."""
    from explorer.session import METHODS

    s = session
    if s.stats is None:
        s.collect()
    assert {"experts only", "+ attention 8-bit", "+ attention & shared 8-bit"} <= set(METHODS)
    plain = s.preset("quantise", 4, method="experts only")
    assert plain.op("quantise").get("attention") is None
    both = s.preset("quantise", 4, method="+ attention 8-bit")
    assert both.op("quantise")["attention"] == 8 and "attention to 8-bit" in both.describe()
    assert s.preview()["bytes_after"] < s.preview(plain)["bytes_after"]
    with pytest.raises(SessionError, match="no shared experts"):
        s.preset("quantise", 4, method="+ attention & shared 8-bit")


def test_the_export_message_says_the_bytes_written(tmp_path):
    """The app's export line names the weights' size on disk and their format, read from what was written."""
    from explorer.apply import weight_bytes
    from explorer.session import Session

    s = Session(max_tokens=256)
    s.load("demo", device="cpu")
    s.set_data("demo")
    s.collect()
    s.set_plan('{"quantise": {"bits": 4, "group_size": 64}}')
    out = s.export(tmp_path / "q4")
    note = s.export_note(out)
    assert f"{weight_bytes(out) / 2**20:.1f} MiB of weights" in note and "packed" in note


def test_why_an_expert_and_a_layer_in_one_panel(session):
    """Issue 32: an expert's load, ranks under each criterion, domains, partners against chance and most reliable
    tokens; a layer's turn of the residual stream and what dropping it costs, each against its baseline."""
    from explorer.preview import preview_perplexity
    from explorer.plan import Plan
    from explorer.report import why_expert, why_layer
    from explorer.saliency import expert_scores

    s = session
    if s.stats is None:
        s.collect()
    load = s.stats.load_vs_uniform()[1]
    e = int(np.argmin(load))
    d = s.why_expert(1, e)
    assert d["load"] == pytest.approx(load[e]) and d["ranks"]["frequency"][0] == 8  # the idlest ranks last
    reap = expert_scores(s.stats, "reap", view=s.view)[1]
    assert d["ranks"]["reap"][0] == int((np.asarray(reap) > reap[e]).sum()) + 1
    assert set(d["domains"]) == set(s.stats.domains) and len(d["partners"]) == 3 and d["tokens"]
    text = why_expert(d)
    assert f"Expert {e} of MoE layer 1" in text and "against chance" in text and "fair share" in text
    lay = s.why_layer(2)
    res = preview_perplexity(s.model, s.view, Plan(drop_layers=[2]), s.data.eval, stats=s.stats)
    assert lay["drop_ppl"] == pytest.approx(res.ppl) and "paired" in why_layer(lay)
    with pytest.raises(SessionError, match="expert 9 does not exist"):
        s.why_expert(0, 9)
    with pytest.raises(SessionError, match="MoE layer 7 does not exist"):
        s.why_layer(7)


def test_plans_leave_compare_on_request(session):
    """Issue 32: Compare had no way to take a plan out; the row of the plan in force, or every row, goes."""
    from explorer.plan import Plan

    s = session
    if s.stats is None:
        s.collect()
    s.tried = []
    for p in ({"drop_experts": {"0": [1]}}, {"drop_experts": {"1": [2]}}, {"drop_experts": {"2": [3]}}):
        s.preview(s.set_plan(p))
    s.use_tried(1)
    assert s.remove_tried() == 1 and [e["name"] for e in s.tried] == ["drop L0:e1", "drop L2:e3"]
    with pytest.raises(SessionError, match="not in Compare"):
        s.remove_tried()
    assert s.remove_tried(0) == 1 and len(s.tried) == 1
    with pytest.raises(SessionError, match="no plan number 5"):
        s.remove_tried(4)
    assert s.remove_tried("all") == 1 and s.tried == []
    s.set_plan(Plan())

"""What the charts draw, read off the figures themselves on the demo model: dead experts are not drawn in the
scale's most prominent colour, and the vocabulary chart's tokens are readable text or bytes, never U+FFFD."""
import numpy as np

from explorer import collect_stats, load_data
from explorer.assets import ASSETS
from explorer.data import text_blocks
from explorer.figures import DEAD_GREY, load_heatmap, token_label, vocab_figure
from explorer.stats import vocab_routing


def test_dead_experts_are_grey_and_live_ones_never_are(demo):
    model, tok, view = demo
    stats = collect_stats(model, view, load_data(tok, "demo", max_tokens=512).calib)
    stats.layers[0]["count"][3] = 0  # an expert no token reached
    heat = load_heatmap(stats).data[0]
    z = np.array(heat.z, dtype=float)
    scale = heat.colorscale
    grey_to = max(pos for pos, colour in scale if colour == DEAD_GREY)  # the scale is grey up to here
    assert scale[0][1] == DEAD_GREY and z[0, 3] == 0
    counts = np.array([lay["count"] for lay in stats.layers])
    assert (z[counts == 0] == 0).all()  # every dead expert: grey
    assert (z[counts > 0] / np.nanmax(z) > grey_to).all()  # every expert that saw a token: on the colour scale
    assert scale[-1][1] != DEAD_GREY  # the busiest experts keep the scale's bright end


def test_vocabulary_chart_names_each_experts_top_tokens_readably(demo):
    model, tok, view = demo
    text = ("Café, naïve, déjà vu — “quoted” — 東京 and 北京; " * 40) + (ASSETS / "corpus" / "code" / "eval.txt").read_text()[:4000]
    vr = vocab_routing(model, view, text_blocks(tok, text, 128), batch_size=4)
    fig = vocab_figure(vr, tok, 0, per_expert=6, min_count=2)
    labels = list(fig.data[0].y)
    assert labels and not [y for y in labels if "\ufffd" in y]
    assert any(y.startswith("b'\\x") for y in labels)  # a piece of a multi-byte character, shown as its bytes
    assert "each expert's most reliable tokens" in fig.layout.title.text
    assert token_label(tok, tok("é")["input_ids"][0]).startswith("b'")


def test_compare_stays_readable_with_dozens_of_plans():
    """Forty plans of five kinds, a few of them failed cuts a hundred times worse: each kind gets its own colour
    and legend entry (with its count, so a kind can be hidden), the axis goes logarithmic so the failed cuts do not
    flatten the rest, and the Pareto front's plans are named on the chart."""
    from explorer.figures import pareto_figure
    from explorer.plan import Plan

    rng = np.random.default_rng(0)
    entries = []
    for k, (planner, how) in enumerate([("drop_experts", "reap"), ("drop_experts", "frequency"),
                                        ("drop_experts", "random"), ("merge", "hc-smoe"), ("slim", None)]):
        for i in range(8):
            spec = {"drop_experts": {"0": [i % 4]}} if planner != "slim" else {"slim": 0.5}
            plan = Plan.from_dict({**spec, "recipe": [{"planner": planner, **({"criterion": how} if how else {})}]})
            ppl = 30 * (1 + 0.1 * i) * (100 if how == "random" and i > 4 else 1) + rng.random()
            entries.append({"name": f"{planner} {how} {i}", "params": 1000 - 50 * i, "ppl": ppl, "ppl_se": 0.5,
                            "plan": plan.to_dict()})
    f = pareto_figure(entries, {"params": 1100, "ppl": 29.0, "ppl_se": 0.4})
    kinds = [t for t in f.data if t.legendgroup == "plans"]
    assert len(kinds) == 5 and all(t.name.endswith("· 8") for t in kinds)
    assert "drop experts (reap) · 8" in [t.name for t in kinds] and "slim · 8" in [t.name for t in kinds]
    assert len({(t.marker.color, t.marker.symbol) for t in kinds}) == 5
    assert f.layout.yaxis.type == "log"
    front = next(t for t in f.data if t.name == "Pareto front")
    assert front.text and all(len(x) <= 30 for x in front.text) and len(front.text) == len(front.x)

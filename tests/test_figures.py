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

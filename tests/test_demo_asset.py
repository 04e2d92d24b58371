"""The bundled demo model: loads offline with plain transformers, reproduces its card, and its experts specialise."""
import json
from pathlib import Path

import pytest

from explorer.loading import DEMO_MODEL

ROOT = Path(__file__).resolve().parent.parent
CARD = DEMO_MODEL / "card.json"


@pytest.fixture(scope="module")
def card():
    if not CARD.exists():
        pytest.skip("demo model card not built")
    return json.loads(CARD.read_text())


def test_asset_is_small_and_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    size = sum(f.stat().st_size for f in DEMO_MODEL.iterdir() if f.is_file())
    assert size < 40 * 2**20
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL)
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    cfg = model.config
    assert cfg.model_type == "mixtral" and cfg.num_hidden_layers >= 4 and cfg.num_local_experts >= 8
    assert cfg.num_experts_per_tok == 2 and cfg.router_aux_loss_coef > 0
    assert tok.decode(tok("def f(x):\n    return x")["input_ids"]) == "def f(x):\n    return x"
    assert any(f.suffix == ".safetensors" for f in DEMO_MODEL.iterdir())


def test_load_model_default_is_the_demo(demo):
    model, tok, view = demo
    assert Path(model.config._name_or_path).resolve() == DEMO_MODEL.resolve()


@pytest.mark.slow
def test_card_perplexity_reproduces(card, demo):
    """The card's perplexity is what transformers' own ``labels=`` loss gives on the same blocks, and
    ``explorer.perplexity`` agrees with that loss (not with itself)."""
    import math

    import torch

    from explorer import load_data, perplexity

    model, tok, view = demo
    ev = load_data(tok, "demo", block_len=card["eval"]["block_len"]).eval
    res = perplexity(model, ev)
    assert res.tokens == card["eval"]["tokens"]
    nll, n, per = 0.0, 0, {}
    with torch.no_grad():
        for d, dom in enumerate(ev.domains):
            rows = ev.subset((ev.domain == d).nonzero().flatten())
            for b in rows.batches(16):
                labels = b.input_ids.masked_fill(b.attention_mask() == 0, -100)
                k = int((labels[:, 1:] != -100).sum())  # transformers averages over the predicted tokens
                loss = float(model(input_ids=b.input_ids, attention_mask=b.attention_mask(), labels=labels).loss)
                nll, n = nll + loss * k, n + k
                a = per.setdefault(dom, [0.0, 0])
                a[0], a[1] = a[0] + loss * k, a[1] + k
    ref = math.exp(nll / n)
    assert n == res.tokens
    assert res.ppl == pytest.approx(ref, rel=1e-4)
    assert card["eval"]["ppl"] == pytest.approx(ref, rel=2e-3)
    for d, v in card["eval"]["per_domain"].items():
        assert res.per_domain[d]["ppl"] == pytest.approx(math.exp(per[d][0] / per[d][1]), rel=1e-4)
        assert v["ppl"] == pytest.approx(math.exp(per[d][0] / per[d][1]), rel=2e-3)
        assert v["ppl"] < card["unigram"][d]  # better than a unigram model on the same tokens


def test_experts_specialise_by_domain(card, demo):
    """Some expert gets at least twice its uniform share k/E of one domain's tokens (the card says so, and it holds)."""
    from explorer import collect_stats, load_data

    assert max(l["max_ratio"] for l in card["specialisation"]) >= 2.0
    model, tok, view = demo
    ev = load_data(tok, "demo", block_len=256, max_tokens=8192).eval
    stats = collect_stats(model, view, ev)
    best = max(float((stats.domain_load(i) * stats.num_experts[i]).max()) for i in range(len(view)))
    assert best >= 2.0

"""Perplexity, data splits and loading, on real tiny models saved to local folders."""
import json
import math
import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from explorer import DataError, ModelLoadError, load_data, load_model, perplexity, text_blocks
from explorer.data import TokenBlocks
from explorer.tiny import tiny_model

_WORDS = "the quick brown fox jumps over lazy dog and keeps running far away into hills of green grass".split()
_RNG = random.Random(0)
TEXT = " ".join(_RNG.choice(_WORDS) for _ in range(700)) + "."
TEXT2 = " ".join(_RNG.choice(_WORDS) for _ in range(700)) + "."


@pytest.fixture(scope="module")
def char_tok():
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz .,\n")}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, char_tok):
    d = tmp_path_factory.mktemp("tiny-qwen3")
    tiny_model("qwen3_moe", vocab_size=64).save_pretrained(d)
    char_tok.save_pretrained(d)
    return d


def test_perplexity_equals_transformers_loss(char_tok):
    model = tiny_model("mixtral", vocab_size=64)
    blocks = text_blocks(char_tok, TEXT, block_len=64)
    full = blocks.subset([i for i in range(len(blocks)) if blocks.lengths[i] == 64])
    res = perplexity(model, full, batch_size=3)
    with torch.no_grad():
        loss = model(input_ids=full.input_ids, labels=full.input_ids).loss
    assert res.nll == pytest.approx(float(loss), rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert res.tokens == len(full) * 63 and res.block_len == 64
    # one character per token and one byte per character: bits per byte = nll / ln 2
    assert res.bpb == pytest.approx(res.nll / math.log(2), rel=1e-6)


def test_padding_is_never_scored(char_tok):
    model = tiny_model("mixtral", vocab_size=64)
    short = text_blocks(char_tok, TEXT[:50], block_len=64)
    assert short.lengths.tolist() == [50]
    res = perplexity(model, short)
    with torch.no_grad():
        loss = model(input_ids=short.input_ids[:, :50], labels=short.input_ids[:, :50]).loss
    assert res.tokens == 49 and res.nll == pytest.approx(float(loss), rel=1e-5)
    # the pad content does not matter
    other = TokenBlocks(short.input_ids.clone(), short.lengths, short.domain, short.domains, short.n_bytes, 64)
    other.input_ids[0, 50:] = 7
    assert perplexity(model, other).nll == pytest.approx(res.nll, rel=1e-6)


def test_per_domain_and_text_too_short(char_tok, tmp_path):
    (tmp_path / "one.txt").write_text(TEXT)
    (tmp_path / "two.txt").write_text(TEXT2)
    ds = load_data(char_tok, str(tmp_path), block_len=64)
    assert ds.eval.domains == ["one", "two"]
    calib = {tuple(r) for r in ds.calib.input_ids.tolist()}
    assert not calib & {tuple(r) for r in ds.eval.input_ids.tolist()}  # never share a block
    res = perplexity(tiny_model("mixtral", vocab_size=64), ds.eval)
    assert set(res.per_domain) == {"one", "two"}
    assert sum(d["tokens"] for d in res.per_domain.values()) == res.tokens
    with pytest.raises(DataError, match="too short"):
        text_blocks(char_tok, "a", block_len=64)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "x.txt").write_text("abc")
    with pytest.raises(DataError, match="too short"):
        load_data(char_tok, str(tmp_path / "tiny"), block_len=64)
    with pytest.raises(DataError, match="not found"):
        load_data(char_tok, str(tmp_path / "nope"))


def test_load_local_folder(saved):
    model, tok, view = load_model(saved, device="cpu")
    assert view.text_config.model_type == "qwen3_moe" and len(view) == 3
    assert tok is not None and next(model.parameters()).dtype == torch.float32
    model16, _, _ = load_model(saved, device="cpu", dtype="bf16", experts_implementation="eager")
    assert next(model16.parameters()).dtype == torch.bfloat16


def test_load_errors(tmp_path, saved):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((saved / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(pickled)
    remote = tmp_path / "remote"
    remote.mkdir()
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model_type"] = "my_custom_moe"
    cfg["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"}
    (remote / "config.json").write_text(json.dumps(cfg))
    for f in saved.glob("*.safetensors"):
        (remote / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ModelLoadError, match="remote code"):
        load_model(remote)
    dense = tmp_path / "dense"
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=64)).save_pretrained(dense)
    with pytest.raises(ModelLoadError, match="no MoE layers"):
        load_model(dense)
    notlm = tmp_path / "notlm"
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=64)).save_pretrained(notlm)
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        load_model(notlm)
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(saved, dtype="float8")


def test_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="hub cannot be reached"):
        load_model("some-org/some-moe-model")


def test_changes_and_perplexities_read_well():
    from explorer.perplexity import fmt_change, fmt_ppl

    assert fmt_change(-0.0004) == "±0.0%" and fmt_change(0.031) == "+3.1%" and fmt_change(-0.004) == "-0.4%"
    assert fmt_ppl(31.4931) == "31.493" and fmt_ppl(2.37e55) == "2.37e+55" and fmt_ppl(float("inf")) == "infinite"


def test_perplexity_carries_its_standard_error_over_blocks(demo):
    """The standard error printed beside a perplexity is the spread over evaluation blocks: it agrees with a
    bootstrap over the blocks (an independent estimate) and shrinks as more blocks are scored."""
    import numpy as np

    model, tok, _ = demo
    ev = load_data(tok, "demo", block_len=128, max_tokens=4096).eval
    res = perplexity(model, ev, batch_size=8)
    assert res.se > 0 and f"± {res.se:.3f}" in str(res) and len(res.block_nll) == res.blocks
    s, n = np.array(res.block_nll), np.array(res.block_tokens, dtype=float)
    dom = np.array(res.block_domain)
    assert len(set(dom)) == 4  # the demo text: a fixed share of each domain, so blocks are resampled within one
    rng = np.random.default_rng(0)
    groups = [np.flatnonzero(dom == d) for d in np.unique(dom)]
    boot = []
    for _ in range(4000):
        i = np.concatenate([rng.choice(g, len(g)) for g in groups])
        boot.append(np.exp(s[i].sum() / n[i].sum()))
    assert abs(np.std(boot) / res.se - 1) < 0.15
    half = perplexity(model, ev.subset(range(0, len(ev), 2)), batch_size=8)
    assert 1.1 < half.se / res.se < 2.0  # half the blocks of every domain: about 1.4 times the error


def test_a_change_is_paired_block_by_block_and_said_within_noise(demo):
    """Two figures on the same blocks differ by their paired change, whose error is far below either figure's;
    a model against itself is within noise, a plan that drops half the experts is not."""
    from explorer.perplexity import change
    from explorer.plan import Plan
    from explorer.preview import preview_perplexity
    from explorer.report import preview_report, preview_result

    model, tok, view = demo
    ev = load_data(tok, "demo", block_len=128, max_tokens=2048).eval
    base = perplexity(model, ev)
    same = change(base, perplexity(model, ev))
    assert same.ratio == 0 and same.noise and "within noise" in str(same)
    plan = Plan(drop_experts={lay.index: list(range(0, lay.num_experts, 2)) for lay in view})
    cut = preview_perplexity(model, view, plan, ev)
    c = change(base, cut)
    assert c.ratio > 0 and not c.noise and "within noise" not in str(c)
    assert c.se < (base.se + cut.se) / base.ppl  # pairing removes the blocks' own difficulty
    text = preview_report(preview_result(cut, base, plan.report(view), 0.0))
    assert f"{cut.ppl:.3f} ± {cut.se:.3f}" in text and str(c) in text
    other = perplexity(model, ev.subset(range(len(ev) - 1)))
    assert math.isnan(change(base, other).se)  # other blocks: no paired error is claimed

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

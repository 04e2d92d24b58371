"""The layer-by-layer engine: statistics, perplexity and previews of a checkpoint never held in memory whole.

Each family is saved as a checkpoint by transformers (per-expert keys on disk), or quantised by this file's
reference code (DeepSeek-V3's block FP8 with a partial last block and its MTP layer); the engine's results are held
against the same model in memory, read by plain transformers or dequantised by the reference code.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from explorer.layerwise import LayerwiseError, LayerwiseModel, engine_of
from explorer.loading import ModelLoadError, load_model
from explorer.perplexity import perplexity
from explorer.plan import Plan
from explorer.preview import preview_perplexity
from explorer.stats import ARRAYS, collect_stats
from explorer.tiny import random_blocks, tiny_model
from test_weightformats import BLOCK, FP4, fp8_checkpoint, mxfp4_checkpoint, ref_dequant_fp8

ROOT = Path(__file__).resolve().parent.parent


def _saved(tmp_path, family, seed=0, dtype=torch.float32):
    folder = tmp_path / family
    tiny_model(family, seed=seed, dtype=dtype).save_pretrained(folder)
    return folder


def _blocks(vocab, n=10, L=24):
    return random_blocks(n, L, seed=3, vocab=min(vocab, 256))


def _save_plain(plain: dict, cfg: dict, out: Path) -> Path:
    """A float32 checkpoint of ``plain`` tensors under the quantised one's config, without its quantization_config."""
    out.mkdir()
    save_file(plain, str(out / "model.safetensors"), metadata={"format": "pt"})
    del cfg["quantization_config"]
    cfg["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _dequantised_reference(fp8: Path, out: Path) -> Path:
    """The FP8 checkpoint dequantised by this file's own code (no MTP layer, no quantization_config)."""
    sd = load_file(fp8 / "model.safetensors")
    cfg = json.loads((fp8 / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    plain = {}
    for k, v in sd.items():
        if k.endswith("_scale_inv") or k.startswith(f"model.layers.{n}."):
            continue
        plain[k] = ref_dequant_fp8(v, sd[k + "_scale_inv"]) if k + "_scale_inv" in sd else v.float()
    return _save_plain(plain, cfg, out)


def _assert_same_stats(a, b, rtol=1e-5):
    assert a.num_experts == b.num_experts and a.sample_routes == b.sample_routes
    for la, lb in zip(a.layers, b.layers):
        np.testing.assert_array_equal(la["count"], lb["count"])  # routing: the same experts for every token
        for k in ARRAYS:
            scale = max(float(np.abs(la[k]).max()), 1e-6)
            assert np.abs(la[k] - lb[k]).max() <= rtol * scale, k
    np.testing.assert_allclose(a.block_cos_sum, b.block_cos_sum, rtol=rtol)


def _drop_plan(view):
    """Two experts of every MoE layer (divisible by any group count the tiny models use)."""
    return Plan(drop_experts={lay.index: [1, 2] for lay in view})


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_layer_by_layer_equals_the_model_in_memory(tmp_path, family):
    folder = _saved(tmp_path, family)
    ref, _, ref_view = load_model(folder, with_tokenizer=False, device="cpu")
    model, _, view = load_model(folder, with_tokenizer=False, device="cpu", sequential=True)
    engine = engine_of(model)
    assert engine is not None and engine_of(ref) is None
    blocks = _blocks(ref.config.vocab_size)
    s_ref = collect_stats(ref, ref_view, blocks, batch_size=4)
    s_lw = collect_stats(model, view, blocks, batch_size=4)
    _assert_same_stats(s_ref, s_lw)
    p_ref, p_lw = perplexity(ref, blocks, 4), perplexity(model, blocks, 4)
    assert abs(p_lw.ppl / p_ref.ppl - 1) < 1e-5
    plan = _drop_plan(view)
    q_ref = preview_perplexity(ref, ref_view, plan, blocks, stats=s_ref, batch_size=4)
    q_lw = preview_perplexity(model, view, plan, blocks, stats=s_lw, batch_size=4)
    assert abs(q_lw.ppl / q_ref.ppl - 1) < 1e-5 and abs(q_lw.ppl / p_lw.ppl - 1) > 1e-3  # the plan did something
    slim = Plan(slim=0.5)  # an edit computed from each layer's weights while it is read
    assert abs(preview_perplexity(model, view, slim, blocks, stats=s_lw, batch_size=4).ppl
               / preview_perplexity(ref, ref_view, slim, blocks, stats=s_ref, batch_size=4).ppl - 1) < 1e-5
    # memory: the embedding and head, one decoder layer as computed and one as stored (the read buffer the next
    # layer is read into while this one computes), aligned to 4 KiB per run of bytes
    n = len(view.decoder_layers)
    layer = max(engine.layer_nbytes(i) for i in range(n))
    sd = {k: t for f in folder.glob("*.safetensors") for k, t in load_file(f).items()}
    stored = max(sum(sd[k].numel() * sd[k].element_size() for k in engine.layer_keys[i]) for i in range(n))
    assert engine.peak_bytes <= engine.rest_bytes + layer + stored + 2 * 4096 * len(set(engine._wmap.values()))
    assert engine.peak_bytes > engine.rest_bytes + layer  # the buffer is counted
    assert all(p.device.type == "meta" for p in view.decoder_layers.parameters())  # nothing left behind
    assert engine._reader.capacity == 0  # given back after the pass
    # read tensor by tensor from the shards' mapping instead: the same numbers, at most one layer beside the rest
    one = LayerwiseModel(folder, buffered_reads=False)
    _assert_same_stats(s_ref, collect_stats(one.model, one.view, blocks, batch_size=4))
    assert one.peak_bytes <= one.rest_bytes + layer
    whole = sum(p.numel() * p.element_size() for p in ref.parameters())
    assert one.peak_bytes < 0.6 * whole


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_hidden_states_beyond_the_budget_go_to_memory_mapped_files(tmp_path, family):
    """Issue 25: the hidden states between layers stay in memory while they fit the budget and go to
    memory-mapped files when they do not (the engine's description says so before the pass); the results are the
    same either way, and the files are gone when the pass ends."""
    folder = _saved(tmp_path, family)
    ref, _, ref_view = load_model(folder, with_tokenizer=False, device="cpu")
    spill = tmp_path / "spill"
    model, _, view = load_model(folder, with_tokenizer=False, device="cpu", sequential=True)
    engine = engine_of(model)
    engine.hidden_budget, engine.spill_dir = 0, spill
    assert f"memory-mapped files under {spill}" in engine.describe()
    blocks = _blocks(ref.config.vocab_size)
    seen = []
    engine.on_load.append(lambda i: seen.append(sorted(p.name for p in spill.glob("*/*.bin"))))
    _assert_same_stats(collect_stats(ref, ref_view, blocks, batch_size=4), collect_stats(model, view, blocks,
                                                                                       batch_size=4))
    assert seen and all(len(files) == 3 for files in seen)  # 10 blocks in batches of 4: one file per batch
    assert "memory-mapped files" in engine.last_hidden and not list(spill.glob("*/*.bin"))
    p_ref, p_lw = perplexity(ref, blocks, 4), perplexity(model, blocks, 4)
    assert abs(p_lw.ppl / p_ref.ppl - 1) < 1e-5 and not list(spill.iterdir())
    engine.hidden_budget = 2**40  # within the budget: in memory, no file
    perplexity(model, blocks, 4)
    assert engine.last_hidden.startswith("hidden states in memory") and not list(spill.iterdir())


def test_each_weight_is_read_once_per_pass(tmp_path):
    folder = _saved(tmp_path, "mixtral")
    model, _, view = load_model(folder, with_tokenizer=False, device="cpu", sequential=True)
    engine = engine_of(model)
    stored = sum(t.numel() * t.element_size() for t in load_file(folder / "model.safetensors").values())
    before = engine.read_bytes
    assert before < stored  # only the embedding, final norm and head were read at load
    collect_stats(model, view, _blocks(model.config.vocab_size, n=16), batch_size=2)  # 8 batches
    assert engine.read_bytes - before + before == stored  # every tensor once, not once per batch


def test_fp8_with_partial_blocks_and_mtp_layer_equals_the_reference_dequantisation(tmp_path):
    fp8 = fp8_checkpoint(tmp_path / "fp8", bad_grid=True)  # kv_a_proj: 24 rows in 16-row blocks
    sd = load_file(fp8 / "model.safetensors")
    k = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    assert sd[k].dtype == torch.float8_e4m3fn and sd[k].shape[0] % BLOCK
    plain = _dequantised_reference(fp8, tmp_path / "plain")
    ref, _, ref_view = load_model(plain, with_tokenizer=False, device="cpu")
    model, _, view = load_model(fp8, with_tokenizer=False, device="cpu", sequential=True, dtype="float32")
    assert engine_of(model).quantised == "block FP8" and engine_of(model).ignored_keys  # the MTP layer
    blocks = _blocks(ref.config.vocab_size)
    s_ref = collect_stats(ref, ref_view, blocks, batch_size=4)
    _assert_same_stats(s_ref, collect_stats(model, view, blocks, batch_size=4))
    assert abs(perplexity(model, blocks, 4).ppl / perplexity(ref, blocks, 4).ppl - 1) < 1e-5
    plan = Plan(drop_experts={lay.index: [1, 2] for lay in view})
    assert abs(preview_perplexity(model, view, plan, blocks, batch_size=4).ppl
               / preview_perplexity(ref, ref_view, plan, blocks, batch_size=4).ppl - 1) < 1e-5
    # the same checkpoint in memory: read by the explorer (transformers would read that weight with 12-row blocks)
    mem, _, mem_view = load_model(fp8, with_tokenizer=False, device="cpu", dtype="float32")
    assert "block FP8" in mem.explorer_dequantised and engine_of(mem) is None
    got = mem.get_parameter(k)
    assert torch.equal(got, ref.get_parameter(k))
    assert abs(perplexity(mem, blocks, 4).ppl / perplexity(ref, blocks, 4).ppl - 1) < 1e-5


KIMI_K2 = dict(n_routed_experts=24, num_experts_per_tok=4, n_group=1, topk_group=1, q_lora_rank=32,
               routed_scaling_factor=2.827)  # Kimi-K2's routing: one group, many experts, a query LoRA


def test_kimi_k2_layout_in_fp8_equals_the_reference_dequantisation(tmp_path):
    fp8 = fp8_checkpoint(tmp_path / "kimi", bad_grid=True, **KIMI_K2)
    plain = _dequantised_reference(fp8, tmp_path / "plain")
    ref, _, ref_view = load_model(plain, with_tokenizer=False, device="cpu")
    model, _, view = load_model(fp8, with_tokenizer=False, device="cpu", sequential=True, dtype="float32")
    assert view.num_experts == [24, 24] and view.top_k == 4
    blocks = _blocks(ref.config.vocab_size)
    s_ref = collect_stats(ref, ref_view, blocks, batch_size=4)
    _assert_same_stats(s_ref, collect_stats(model, view, blocks, batch_size=4))
    assert abs(perplexity(model, blocks, 4).ppl / perplexity(ref, blocks, 4).ppl - 1) < 1e-5
    plan = _drop_plan(view)
    assert abs(preview_perplexity(model, view, plan, blocks, batch_size=4).ppl
               / preview_perplexity(ref, ref_view, plan, blocks, batch_size=4).ppl - 1) < 1e-5


def _ref_dequant_mxfp4(blocks, scales):
    lo, hi = (blocks & 0x0F).long(), (blocks >> 4).long()
    vals = torch.stack([FP4[lo], FP4[hi]], -1).reshape(*blocks.shape[:-1], 32)
    return (vals * 2.0 ** (scales.float() - 127)[..., None]).reshape(*blocks.shape[:-2], -1)


def test_gpt_oss_mxfp4_equals_the_reference_dequantisation(tmp_path):
    mx = mxfp4_checkpoint(tmp_path / "mx", sliding_window=8)  # shorter than a block: the layers' masks differ
    sd = load_file(mx / "model.safetensors")
    plain = {}
    for k, v in sd.items():
        if k.endswith("_blocks"):
            base = k[: -len("_blocks")]
            plain[base] = _ref_dequant_mxfp4(v, sd[base + "_scales"]).transpose(1, 2).contiguous()  # [E, in, out]
        elif not k.endswith("_scales"):
            plain[k] = v.float()
    ref_dir = tmp_path / "plain"
    ref_dir.mkdir()
    save_file(plain, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((mx / "config.json").read_text())
    del cfg["quantization_config"]
    cfg["dtype"] = "float32"
    (ref_dir / "config.json").write_text(json.dumps(cfg))
    ref, _, ref_view = load_model(ref_dir, with_tokenizer=False, device="cpu")
    model, _, view = load_model(mx, with_tokenizer=False, device="cpu", sequential=True, dtype="float32")
    assert engine_of(model).quantised == "MXFP4"
    blocks = _blocks(ref.config.vocab_size)  # sliding and full attention layers: each gets its own mask
    s_ref = collect_stats(ref, ref_view, blocks, batch_size=4)
    _assert_same_stats(s_ref, collect_stats(model, view, blocks, batch_size=4))
    assert abs(perplexity(model, blocks, 4).ppl / perplexity(ref, blocks, 4).ppl - 1) < 1e-5


def test_bf16_checkpoint_computes_in_float32_on_a_cpu_without_bf16_instructions(tmp_path):
    from explorer.layerwise import cpu_has_fast_bf16

    folder = _saved(tmp_path, "qwen3_moe", dtype=torch.bfloat16)
    model, _, view = load_model(folder, with_tokenizer=False, device="cpu", sequential=True)
    engine = engine_of(model)
    fast = cpu_has_fast_bf16()  # AVX-512-BF16 / AMX: bf16 products are the fast ones; AVX2 alone: float32
    assert engine.storage_dtype == torch.bfloat16
    assert engine.dtype == (torch.bfloat16 if fast else torch.float32)
    assert f"computing in {'bfloat16' if fast else 'float32'}" in engine.describe()
    assert ("upcast from bfloat16" in engine.describe()) == (not fast)
    # either way, asked for float32 it is the in-memory float32 model
    up, _, _ = load_model(folder, with_tokenizer=False, device="cpu", sequential=True, dtype="float32")
    assert engine_of(up).dtype == torch.float32
    ref, _, _ = load_model(folder, with_tokenizer=False, device="cpu", dtype="float32")
    blocks = _blocks(ref.config.vocab_size)
    assert abs(perplexity(up, blocks, 4).ppl / perplexity(ref, blocks, 4).ppl - 1) < 1e-5
    # and layer by layer in the storage dtype is the in-memory bf16 model
    lw, _, _ = load_model(folder, with_tokenizer=False, device="cpu", sequential=True, dtype="bf16")
    mem, _, _ = load_model(folder, with_tokenizer=False, device="cpu", dtype="bf16")
    assert abs(perplexity(lw, blocks, 4).ppl / perplexity(mem, blocks, 4).ppl - 1) < 1e-3


def test_what_runs_only_on_a_whole_model_is_refused_in_words(tmp_path):
    folder = _saved(tmp_path, "mixtral")
    model, _, view = load_model(folder, with_tokenizer=False, device="cpu", sequential=True)
    with pytest.raises(LayerwiseError, match="loaded layer by layer"):
        model(input_ids=torch.tensor([[1, 2, 3]]))
    with pytest.raises(ModelLoadError, match="leave out --device-map"):
        load_model(folder, with_tokenizer=False, sequential=True, device_map="auto")
    with pytest.raises(ModelLoadError, match="not a local folder"):
        load_model("org/not-here", with_tokenizer=False, sequential=True)
    r = subprocess.run([sys.executable, "-m", "explorer", "eval", str(folder), "--sequential", "--tasks", "demo"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "--tasks runs the whole model at once" in r.stderr


def test_a_checkpoint_missing_a_layer_weight_is_refused(tmp_path):
    folder = _saved(tmp_path, "mixtral")
    sd = load_file(folder / "model.safetensors")
    del sd["model.layers.1.self_attn.q_proj.weight"]
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model, _, view = load_model(folder, with_tokenizer=False, device="cpu", sequential=True)
    with pytest.raises(LayerwiseError, match=r"decoder layer 1 has 1 weight\(s\) the checkpoint does not hold "
                                             r"\(self_attn.q_proj.weight\)"):
        perplexity(model, _blocks(model.config.vocab_size), 4)


def test_cli_stats_and_eval_layer_by_layer_give_the_in_memory_results(demo, tmp_path):
    from explorer.loading import DEMO_MODEL

    small = ["--max-tokens", "256", "--block-len", "64"]
    common = [sys.executable, "-m", "explorer"]
    outs = {}
    for mode in ([], ["--sequential"]):
        out = tmp_path / f"s{len(mode)}.json"
        r = subprocess.run(common + ["stats", str(DEMO_MODEL), "--out", str(out), *small, *mode], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        outs[len(mode)] = json.loads(out.read_text())
        if mode:
            assert "layer by layer: 4 decoder layers read from disk one at a time" in r.stderr
            assert "4/4 layers" in r.stderr
        r = subprocess.run(common + ["eval", str(DEMO_MODEL), "--json", *small, *mode], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        outs[f"ppl{len(mode)}"] = json.loads(r.stdout)["ppl"]
    for la, lb in zip(outs[0]["layers"], outs[1]["layers"]):
        assert la["count"] == lb["count"]
        np.testing.assert_allclose(la["reap"], lb["reap"], rtol=1e-5)
    assert abs(outs["ppl1"] / outs["ppl0"] - 1) < 1e-5


def test_layerwise_engine_can_be_used_directly(tmp_path):
    folder = _saved(tmp_path, "qwen3_moe")
    engine = LayerwiseModel(folder)
    blocks = _blocks(engine.model.config.vocab_size, n=4)
    logits = [lg for _, _, lg in engine.forward_batches(list(blocks.batches(2)))]
    ref = tiny_model("qwen3_moe", seed=0).eval()
    with torch.no_grad():
        want = ref(input_ids=blocks.input_ids[:2], attention_mask=blocks.attention_mask()[:2]).logits
    assert torch.allclose(logits[0], want, atol=1e-5)
    assert not engine.drop_read_pages  # a checkpoint far smaller than memory stays in the page cache
    assert "each layer read whole ahead of its turn into one reused" in engine.describe()
    # read from the mapping, as a layer larger than half the memory is: its pages dropped once read
    dropping = LayerwiseModel(folder, drop_read_pages=True, buffered_reads=False)
    assert "pages dropped from the page cache once read" in dropping.describe()
    assert "each tensor read from the shards' mapping" in dropping.describe()
    again = [lg for _, _, lg in dropping.forward_batches(list(blocks.batches(2)))]
    assert all(torch.equal(a, b) for a, b in zip(logits, again))


def test_torchrun_two_processes_give_the_single_process_results(tmp_path):
    """Each process runs a contiguous share of the batches (here layer by layer too); the sums are added with
    torch.distributed on gloo; the main process alone writes."""
    from explorer.loading import DEMO_MODEL

    small = ["--max-tokens", "512", "--block-len", "64"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    r = subprocess.run([sys.executable, "-m", "explorer", "stats", str(DEMO_MODEL), "--out", str(one), *small],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "explorer"]
    r = subprocess.run(torchrun + ["stats", str(DEMO_MODEL), "--out", str(two), "--sequential", *small], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("calibration tokens") == 1  # one process speaks
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["info"]["processes"] == 2 and a["block_tokens"] == b["block_tokens"]
    assert a["sample_routes"] == b["sample_routes"]
    for la, lb in zip(a["layers"], b["layers"]):
        assert la["count"] == lb["count"] and la["coact"] == lb["coact"]
        for k in ARRAYS:
            x, y = np.asarray(la[k], dtype=float), np.asarray(lb[k], dtype=float)
            assert np.abs(x - y).max() <= 1e-5 * max(np.abs(x).max(), 1e-6), k
    ppl = []
    for cmd in ([sys.executable, "-m", "explorer"], torchrun):
        r = subprocess.run(cmd + ["eval", str(DEMO_MODEL), "--json", *small], cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        ppl.append(json.loads(r.stdout))
    assert ppl[0]["tokens"] == ppl[1]["tokens"] and abs(ppl[1]["ppl"] / ppl[0]["ppl"] - 1) < 1e-6


def test_a_family_whose_layers_hand_on_more_than_hidden_states_is_refused(tmp_path):
    """GLM-MoE-DSA's layers hand their indexer's choices to the next layer: a layer cannot run alone."""
    folder = tmp_path / "dsa"
    tiny_model("glm_moe_dsa", seed=0).save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="hand the next layer more than the hidden states"):
        load_model(folder, with_tokenizer=False, sequential=True)


def _ref_unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Signed 4-bit codes of int32 words, eight per word from the low nibble up, stored offset by 8 (this file's
    reading of compressed-tensors' pack-quantized layout, written independently of its code)."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    nib = torch.stack([(words >> (4 * j)) & 0xF for j in range(8)], -1).reshape(packed.shape[0], -1)
    return (nib[:, :cols] - 8).float()


def _ct_reference(folder: Path, kind: str, out: Path) -> Path:
    """The compressed-tensors checkpoint dequantised by this file's code into a plain float32 one."""
    sd = load_file(folder / "model.safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    plain = {}
    for k, v in sd.items():
        if k.endswith(".weight_packed"):
            base = k[: -len("weight_packed")]
            rows, cols = (int(x) for x in sd[base + "weight_shape"])
            scale = sd[base + "weight_scale"].float()
            codes = _ref_unpack_int4(v, cols)
            plain[base + "weight"] = (codes.reshape(rows, scale.shape[1], -1) * scale[..., None]).reshape(rows, cols)
        elif k.endswith(".weight") and k[: -len("weight")] + "weight_scale" in sd:
            plain[k] = v.float() * sd[k[: -len("weight")] + "weight_scale"].float()
        elif not k.rsplit(".", 1)[-1].startswith(("weight_", "input_")):
            plain[k] = v.float()
    return _save_plain(plain, cfg, out)


@pytest.mark.parametrize("kind", ["w4a16", "fp8"])
def test_compressed_tensors_layer_by_layer_equals_the_reference_dequantisation(tmp_path, kind):
    """llm-compressor's W4A16 (int4 groups, packed in int32) and FP8-dynamic (FP8 per output channel), quantised by
    compressed-tensors' own code; the engine's statistics, perplexity and preview against the checkpoint dequantised
    by this file's reference code."""
    pytest.importorskip("compressed_tensors")
    from test_compressed_inputs import quantised_checkpoint

    ct = quantised_checkpoint(kind, tmp_path / kind)
    plain = _ct_reference(ct, kind, tmp_path / "plain")
    ref, _, ref_view = load_model(plain, with_tokenizer=False, device="cpu")
    model, _, view = load_model(ct, with_tokenizer=False, device="cpu", sequential=True, dtype="float32")
    engine = engine_of(model)
    assert engine.quantised.startswith("compressed-tensors") and "dequantised per layer" in engine.describe()
    k = "model.layers.1.self_attn.q_proj.weight"
    engine.load_layer(1)
    assert torch.equal(model.get_parameter(k), ref.get_parameter(k).to(torch.bfloat16).float())
    engine.unload_layer(1)
    blocks = _blocks(ref.config.vocab_size)
    # the reference holds the dequantised values in float32, the engine rounds them to the checkpoint's bf16 scale
    # dtype as compressed-tensors does: equal routing, statistics to bf16 rounding
    ref_bf16 = load_model(plain, with_tokenizer=False, device="cpu")[0]
    for p in ref_bf16.parameters():
        p.data = p.data.to(torch.bfloat16).float()
    rv = ref_view.__class__(ref_bf16)
    _assert_same_stats(collect_stats(ref_bf16, rv, blocks, batch_size=4), collect_stats(model, view, blocks,
                                                                                           batch_size=4))
    assert abs(perplexity(model, blocks, 4).ppl / perplexity(ref_bf16, blocks, 4).ppl - 1) < 1e-5
    plan = _drop_plan(view)
    assert abs(preview_perplexity(model, view, plan, blocks, batch_size=4).ppl
               / preview_perplexity(ref_bf16, rv, plan, blocks, batch_size=4).ppl - 1) < 1e-5


def test_fp8_task_scores_equal_the_reference_dequantisation(tmp_path):
    """lm-eval's scores of the FP8 checkpoint with a partial block (read in memory by the explorer) are the
    reference-dequantised model's."""
    pytest.importorskip("lm_eval")
    from transformers import AutoTokenizer

    from explorer.loading import DEMO_MODEL
    from explorer.tasks import evaluate_tasks

    fp8 = fp8_checkpoint(tmp_path / "fp8", bad_grid=True, vocab_size=4096)  # the demo's tokenizer: real text
    plain = _dequantised_reference(fp8, tmp_path / "plain")
    for folder in (fp8, plain):
        AutoTokenizer.from_pretrained(DEMO_MODEL).save_pretrained(folder)
    model, tok, _ = load_model(fp8, device="cpu", dtype="float32")
    ref, ref_tok, _ = load_model(plain, device="cpu")
    tasks = "demo_next_word,demo_next_line_code"
    got, want = evaluate_tasks(model, tok, tasks, limit=20), evaluate_tasks(ref, ref_tok, tasks, limit=20)
    for t in want["tasks"]:
        assert got["tasks"][t]["value"] == pytest.approx(want["tasks"][t]["value"], abs=1e-9), t


def test_fp8_experts_kept_in_fp8_equal_the_reference_dequantisation(tmp_path):
    """A DeepSeek-V3 FP8 layer too large to dequantise whole (22.5 GB in bf16) keeps its experts in FP8, each
    dequantised as it is computed: the same statistics, perplexity and drop / merge previews as the reference, half
    the expert bytes in memory."""
    fp8 = fp8_checkpoint(tmp_path / "fp8", bad_grid=True)
    plain = _dequantised_reference(fp8, tmp_path / "plain")
    ref, _, ref_view = load_model(plain, with_tokenizer=False, device="cpu")
    engine = LayerwiseModel(fp8, dtype=torch.float32, keep_fp8=True)
    model, view = engine.model, engine.view
    assert "kept in FP8" in engine.describe()
    blocks = _blocks(ref.config.vocab_size)
    _assert_same_stats(collect_stats(ref, ref_view, blocks, batch_size=4), collect_stats(model, view, blocks,
                                                                                          batch_size=4))
    assert abs(perplexity(model, blocks, 4).ppl / perplexity(ref, blocks, 4).ppl - 1) < 1e-5
    lay = next(lay for lay in view if lay.layer_idx == 1)
    seen = {}
    engine.on_load.append(lambda i: seen.setdefault(i, (lay.fp8_kept is not None and i == 1,
                                                         engine.loaded_bytes)))
    for plan in (_drop_plan(view), Plan(merge={lay.index: [[0, 3], [1, 2]]}, merge_weights={lay.index: [[1, 1], [2, 1]]})):
        assert abs(preview_perplexity(model, view, plan, blocks, batch_size=4).ppl
                   / preview_perplexity(ref, ref_view, plan, blocks, batch_size=4).ppl - 1) < 1e-5, plan
    assert seen[1][0]  # layer 1's experts were held as FP8 stacks while it ran
    assert not engine.unchecked  # small enough: each layer's self-check ran on its experts dequantised
    dense = sum(p.numel() * 4 for n, p in model.model.layers[1].named_parameters())
    experts = sum(p.numel() for n, p in model.model.layers[1].named_parameters() if ".experts." in n)
    assert seen[1][1] - engine.rest_bytes < dense - experts * 2  # 1 byte (+ scales) per expert weight, not 4
    with pytest.raises(LayerwiseError, match="per-expert FP8"):
        LayerwiseModel(_saved(tmp_path, "mixtral"), keep_fp8=True)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_reconstruction_scores_run_layer_by_layer(tmp_path, family):
    """The model-running criterion NAEE's reconstruction error reads each MoE block's input while that layer is
    loaded, and equals the model in memory; ablation (a whole-model pass per expert) is refused in words."""
    from explorer.saliency import expert_scores, rank_stability

    folder = _saved(tmp_path, family)
    mem, _, mem_view = load_model(folder, with_tokenizer=False, device="cpu")
    lw, _, lw_view = load_model(folder, with_tokenizer=False, device="cpu", sequential=True)
    blocks = _blocks(mem.config.vocab_size)
    stats = collect_stats(mem, mem_view, blocks, 4)
    a = expert_scores(stats, "reconstruction", model=mem, view=mem_view, blocks=blocks, max_tokens=96)
    b = expert_scores(stats, "reconstruction", model=lw, view=lw_view, blocks=blocks, max_tokens=96)
    assert len(a) == len(b) == len(mem_view)
    for x, y in zip(a, b):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)
    assert all(np.ptp(x) > 0 for x in b)
    st = rank_stability(stats, "reconstruction", model=lw, view=lw_view, blocks=blocks, max_tokens=96)
    np.testing.assert_allclose(
        st.rho, rank_stability(stats, "reconstruction", model=mem, view=mem_view, blocks=blocks, max_tokens=96).rho)
    with pytest.raises(LayerwiseError, match=r"ablation runs one perplexity pass per expert \(\d+ passes\).*"
                                             r"use reconstruction"):
        expert_scores(stats, "ablation", model=lw, view=lw_view, blocks=blocks, max_tokens=96)


def test_a_plan_by_reconstruction_runs_layer_by_layer_from_the_cli(demo, tmp_path):
    """`plan --criterion reconstruction --sequential` scores a checkpoint it never holds whole, and picks the experts
    the in-memory run picks."""
    from explorer.loading import DEMO_MODEL

    stats = tmp_path / "s.json"
    base = [sys.executable, "-m", "explorer"]
    r = subprocess.run(base + ["stats", str(DEMO_MODEL), "--out", str(stats), "--max-tokens", "256", "--block-len",
                               "64"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    plans = {}
    for mode in ([], ["--sequential"]):
        out = tmp_path / f"plan{len(mode)}.json"
        r = subprocess.run(base + ["plan", str(DEMO_MODEL), "--stats", str(stats), "--drop-experts", "0.25", "--criterion",
                                   "reconstruction", "--block-len", "64", "--out", str(out), *mode],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        plans[len(mode)] = Plan.load(out).drop_experts
    assert plans[0] == plans[1] and sum(map(len, plans[1].values())) > 0


def test_a_layer_is_read_whole_directly_or_through_the_page_cache(tmp_path, monkeypatch):
    """Issue 25: a decoder layer is read with one large read per run of its bytes in each shard, into one buffer
    the next layer reuses: directly (O_DIRECT) where the file system allows it, through the page cache where it
    refuses (tmpfs answers EINVAL). Either way the stored tensors, across shards; a truncated shard is said in
    words."""
    import errno
    import os

    from safetensors import safe_open

    from explorer.errors import PlanError
    from explorer.shards import RunReader, weight_map

    folder = tmp_path / "m"
    tiny_model("mixtral", seed=0).save_pretrained(folder, max_shard_size="100KB")
    wmap = weight_map(folder)
    keys = {i: [k for k in wmap if f".layers.{i}." in k] for i in (0, 1)}
    assert len({wmap[k] for k in keys[1]}) > 1  # the layer spans shards

    def stored(ks):
        out = {}
        for k in ks:
            with safe_open(folder / wmap[k], "pt") as f:
                out[k] = f.get_tensor(k)
        return out

    want = stored(keys[1])
    direct = RunReader(folder, wmap)
    got = direct.read(keys[1])
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert all(direct.holds(t) for t in got.values()) and not direct.holds(want[keys[1][0]])

    real_open = os.open

    def refuse_direct(path, flags, *a, **kw):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", refuse_direct)
    cached = RunReader(folder, wmap)
    got = cached.read(keys[1])
    assert not cached.direct and all(torch.equal(got[k], want[k]) for k in want)
    size = cached.capacity
    other = cached.read(keys[0])  # the same buffer, the first layer's views overwritten
    assert cached.capacity == size and all(torch.equal(other[k], t) for k, t in stored(keys[0]).items())
    monkeypatch.undo()

    shard = folder / wmap[keys[1][-1]]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(PlanError, match="damaged or incomplete"):
        RunReader(folder, wmap).read(keys[1])

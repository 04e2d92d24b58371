"""Models larger than one device: accelerate's device map with weights offloaded to disk gives the same statistics,
preview and perplexity as the model in memory (on the CPU, with a tiny model forced to offload some layers)."""
import numpy as np
import pytest
import torch

from explorer import collect_stats, load_model, perplexity
from explorer.data import TokenBlocks
from explorer.loading import ModelLoadError
from explorer.kernels import expert_path
from explorer.moe import MoEModel
from explorer.plan import Plan, PlanError
from explorer.preview import preview_perplexity
from explorer.stats import ARRAYS
from explorer.tiny import tiny_model, random_blocks

pytest.importorskip("accelerate")


def _blocks(n=6, L=24, seed=0):
    return random_blocks(n, L, seed, low=1, last_len=L - 5)


@pytest.fixture(scope="module", params=["mixtral", "deepseek_v3", "gpt_oss"])
def pair(request, tmp_path_factory):
    family = request.param
    folder = tmp_path_factory.mktemp(family)
    tiny_model(family, seed=4).save_pretrained(folder / "model")
    ref = load_model(folder / "model", device="cpu", with_tokenizer=False)
    n = ref[0].config.num_hidden_layers
    dmap = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
            **{f"model.layers.{i}": ("cpu" if i == 0 else "disk") for i in range(n)}}
    off = load_model(folder / "model", device_map=dmap, offload_folder=folder / "offload", with_tokenizer=False)
    return family, ref, off


def test_offloaded_model_really_is_offloaded(pair):
    _, ref, (model, _, view) = pair
    assert view[-1].gate_up.device.type == "meta"  # the experts of the last layer live on disk
    assert any(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("path", ["loop", "grouped"])
def test_statistics_preview_and_perplexity_equal_in_memory(pair, path):
    family, (m1, _, v1), (m2, _, v2) = pair
    blocks = _blocks()
    with expert_path(path):
        s1, s2 = collect_stats(m1, v1, blocks, batch_size=4), collect_stats(m2, v2, blocks, batch_size=4)
    for a, b in zip(s1.layers, s2.layers):
        for k in ARRAYS:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(s2.block_cos_sum, s1.block_cos_sum, rtol=1e-6)
    assert perplexity(m2, blocks).ppl == pytest.approx(perplexity(m1, blocks).ppl, rel=1e-6)
    drop = [0, 1, 4, 5] if family == "deepseek_v3" else [0, 3]
    for plan in (Plan(drop_experts={i: drop for i in range(len(v1))}), Plan(merge={0: [[1, 2], [5, 6]]}),
                 Plan(slim=0.5), Plan(drop_layers=[0])):
        with expert_path(path):
            p1 = preview_perplexity(m1, v1, plan, blocks, stats=s1).ppl
            p2 = preview_perplexity(m2, v2, plan, blocks, stats=s2).ppl
        assert p2 == pytest.approx(p1, rel=1e-5), plan.describe()
    assert v2[-1].gate_up.device.type == "meta"  # weights went back to disk after use


def test_apply_on_an_offloaded_model_is_refused_in_words(pair):
    from explorer.apply import apply_plan

    _, _, (m2, _, v2) = pair
    with pytest.raises(PlanError, match="offloaded"):
        apply_plan(m2, v2, Plan(drop_experts={0: [2, 3]}))


def test_max_memory_smaller_than_the_model_runs_layer_by_layer_and_writes_nothing(tmp_path, caplog):
    """accelerate would offload to disk and read every offloaded weight again for every batch (the 16-layer OLMoE
    shape did not finish its statistics in 40 minutes); the layer-by-layer engine reads each weight once."""
    from explorer.layerwise import engine_of

    tiny_model("mixtral", seed=1).save_pretrained(tmp_path / "m")
    with caplog.at_level("WARNING", logger="explorer"):
        model, _, view = load_model(tmp_path / "m", device_map="auto", max_memory="cpu=300KB",
                                    offload_folder=tmp_path / "off", with_tokenizer=False)
    assert "more than --max-memory allows" in caplog.text and "layer by layer on cpu" in caplog.text
    assert engine_of(model) is not None and any(p.device.type == "meta" for p in model.parameters())
    ref = load_model(tmp_path / "m", device="cpu", with_tokenizer=False)[0]
    blocks = _blocks()
    assert perplexity(model, blocks).ppl == pytest.approx(perplexity(ref, blocks).ppl, rel=1e-6)
    assert not (tmp_path / "off").exists() or not any((tmp_path / "off").iterdir())  # nothing written there
    big, _, _ = load_model(tmp_path / "m", device_map="auto", max_memory="cpu=1GiB", with_tokenizer=False)
    assert engine_of(big) is None  # a budget that holds the model keeps accelerate's map
    with pytest.raises(ModelLoadError, match="DEVICE=SIZE"):
        load_model(tmp_path / "m", device_map="auto", max_memory="lots")

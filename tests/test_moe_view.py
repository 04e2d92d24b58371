"""The uniform MoE view recomputes every family's block output from its own tensors."""
import pytest
import torch

from explorer.layout import NoMoELayersError
from explorer.moe import MoEModel
from explorer.tiny import TINY_CONFIGS, tiny_model

FAMILIES = sorted(TINY_CONFIGS)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_recomputed_from_view_tensors(family):
    model = tiny_model(family, seed=1)
    view = MoEModel(model)
    assert len(view) >= 2
    x = torch.randn(2, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    for lay in view:
        with torch.no_grad():
            ref = lay.block(x)
            ref = ref[0] if isinstance(ref, tuple) else ref
            # explicit recomputation: chosen experts, their gates, the shared experts
            flat = x.reshape(-1, x.shape[-1])
            _, w, idx = lay.route(flat)
            out = torch.zeros_like(flat)
            for t in range(flat.shape[0]):
                for j in range(idx.shape[1]):
                    e = int(idx[t, j])
                    if lay.family.gating == "sigmoid_input":  # Llama-4 gates the expert's input
                        out[t] += lay.expert(e, flat[t:t + 1] * w[t, j])[0]
                    else:
                        out[t] += w[t, j] * lay.expert(e, flat[t:t + 1])[0]
            sh = lay.shared_out(flat)
            if sh is not None:
                out += sh
        assert torch.allclose(out.reshape(ref.shape), ref, atol=1e-5, rtol=1e-5), family
        # and the view's own forward (used by stats and preview) agrees too
        got = lay.forward(x)
        got = got[0] if isinstance(got, tuple) else got
        assert torch.allclose(got.reshape(ref.shape), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_from_logits_matches_router(family):
    """The re-implemented gating (used for masked previews) equals the model's router without a mask."""
    model = tiny_model(family, seed=2)
    view = MoEModel(model)
    x = torch.randn(40, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    for lay in view:
        with torch.no_grad():
            logits, w, idx = lay.route(x)
            _, w2, idx2 = lay.route_from_logits(logits)
            _, w3, idx3 = lay.route(x, mask=torch.ones(lay.num_experts, dtype=torch.bool))
        for ww, ii in ((w2, idx2), (w3, idx3)):
            s1, s2 = torch.sort(idx, -1), torch.sort(ii, -1)
            assert torch.equal(s1.values, s2.values)
            assert torch.allclose(w.gather(1, s1.indices).float(), ww.gather(1, s2.indices).float(), atol=1e-6)


def test_router_return_value_of_installed_transformers():
    """REFERENCES: routers return (logits [T,E] fp32, top-k weights [T,k], top-k indices [T,k])."""
    model = tiny_model("mixtral")
    lay = MoEModel(model)[0]
    out = lay.router(torch.randn(5, model.config.hidden_size))
    assert isinstance(out, tuple) and len(out) == 3
    assert out[0].shape == (5, lay.num_experts) and out[0].dtype == torch.float32
    assert out[1].shape == out[2].shape == (5, lay.top_k)


@pytest.mark.parametrize("family,attr", [("mixtral", "num_local_experts"), ("qwen2_moe", "num_experts"),
                                         ("deepseek_v3", "n_routed_experts"), ("olmoe", "num_experts")])
def test_view_facts(family, attr):
    model = tiny_model(family)
    view = MoEModel(model)
    assert view.count_attr == attr
    s = view.summary()
    assert s["params_active"] < s["params_total"]
    lay = view[0]
    assert lay.gate_up.shape[0] == lay.num_experts == lay.router_weight.shape[0]
    if family == "qwen2_moe":
        assert lay.shared and lay.shared_gate is not None
    if family == "deepseek_v3":
        assert lay.shared and lay.correction_bias is not None
        assert view[0].layer_idx == 1  # first_k_dense_replace=1: layer 0 is dense


def test_gpt_oss_layout():
    lay = MoEModel(tiny_model("gpt_oss"))[0]
    assert lay.transposed and lay.gate_up_bias is not None and lay.router_bias is not None
    assert lay.gate_up.shape[1] == lay.hidden_size


def test_model_without_moe_layers_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=64)
    with pytest.raises(NoMoELayersError, match="no MoE layers"):
        MoEModel(LlamaForCausalLM(cfg))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss", "granitemoe"])
def test_upcycled_model_computes_what_the_original_computes(family):
    """The trained stand-in of notebook 5: twice the experts and top-k, the same logits (softmax routers)."""
    from explorer.tiny import upcycled

    model = tiny_model(family, seed=2)
    big = upcycled(model, 2)
    assert MoEModel(big).num_experts == [2 * e for e in MoEModel(model).num_experts]
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids).logits, big(ids).logits
        assert torch.allclose(a, b, atol=1e-4)
        assert not torch.allclose(a, upcycled(model, 2, noise=0.2)(ids).logits, atol=1e-4)  # noisy copies differ
    with pytest.raises(ValueError, match="softmax routers"):
        upcycled(tiny_model("deepseek_v3", seed=2))


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral"])
def test_a_bf16_checkpoint_loads_in_memory_and_layer_by_layer(family, tmp_path):
    """Published checkpoints are bf16; DeepSeek-V3's (and Kimi-K2's) router is kept in float32 beside bf16
    experts. The self-check feeds each block hidden states of the experts' dtype, as the model does; the view's
    output is the block's own to bf16 rounding."""
    from explorer.loading import load_model
    from explorer.stats import collect_stats
    from explorer.tiny import random_blocks

    tiny_model(family, seed=0).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    for sequential in (False, True):
        model, _, view = load_model(tmp_path / "bf16", with_tokenizer=False, sequential=sequential, dtype="bfloat16")
        assert view[0].gate_up.dtype == torch.bfloat16
        stats = collect_stats(model, view, random_blocks(4, 16, seed=0, vocab=200), batch_size=2)
        assert stats.layers[0]["count"].sum() == 4 * 16 * view.top_k

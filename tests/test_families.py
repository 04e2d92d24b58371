"""Every MoE model type of the installed transformers works end to end or is refused in words; the README says which.

Each type gets a tiny seeded model built from its own default config (``explorer.tiny``) and the whole chain
(``explorer.families.walk``): the view's self-check, statistics, preview = apply in logits for expert drop, merge,
slimming, Layer Drop and Block Drop (the last block and a middle one), export and reload, and each of them cut out of
core and reloaded to the in-memory model's logits (or refused in words), so no family exports another model unseen.
"""
import functools
import re
from pathlib import Path

import pytest
import torch
import transformers

from explorer.families import PLAN_KINDS, moe_model_types, table, walk
from explorer.layout import NoMoELayersError, UnsupportedModelError
from explorer.moe import MoEModel
from explorer.tiny import tiny_model

README = Path(__file__).resolve().parent.parent / "README.md"
TYPES = moe_model_types()


@functools.lru_cache(maxsize=None)
def _walked(model_type: str):
    return walk(model_type)


def test_the_walk_finds_the_families_users_prune():
    for mt in ("mixtral", "qwen3_moe", "deepseek_v3", "deepseek_v2", "ernie4_5_moe", "minimax_m2", "nemotron_h",
               "gpt_oss", "jamba", "dbrx", "longcat_flash", "hunyuan_v1_moe", "kimi_linear", "glm4_moe_lite"):
        assert mt in TYPES, mt
    assert len(TYPES) >= 44


@pytest.mark.slow
@pytest.mark.parametrize("model_type", TYPES)
def test_every_moe_family_works_or_is_refused_in_words(model_type):
    r = _walked(model_type)
    assert r.status in ("supported", "refused", "no tiny model"), f"{model_type}: {r.status}: {r.reason}"
    if r.status == "refused":
        assert model_type in r.reason or "model_type=" in r.reason, r.reason  # the message names the model
        assert "Traceback" not in r.reason
    if r.status == "supported":
        assert set(r.max_diff) | set(r.refused_plans) == set(PLAN_KINDS)
        # every kind that applies in memory was also cut out of core: the same model (else the walk says "wrong"),
        # or refused in words
        assert all("Traceback" not in v and v for v in r.out_of_core_refused.values()), r.out_of_core_refused
        assert all(d < 1e-3 for d in r.max_diff.values()), r.max_diff  # preview equals apply where both run
        assert {"drop", "merge"} <= set(r.max_diff), r.refused_plans  # expert cuts work on every supported family


@pytest.mark.slow
def test_readme_family_table_is_what_the_walk_finds():
    text = README.read_text()
    m = re.search(r"<!-- families:begin transformers=(\S+) -->\n(.*?)\n<!-- families:end -->", text, re.S)
    assert m, "README lacks the family table (python -m explorer.families --write-readme)"
    if m.group(1) != transformers.__version__:
        pytest.skip(f"README's table was measured with transformers {m.group(1)}, {transformers.__version__} here")
    assert m.group(2).strip() == table([_walked(t) for t in TYPES]).strip(), \
        "README's family table is stale: python -m explorer.families --write-readme"


# ---- the self-check refuses what it does not reproduce ---------------------------------------------------------
class _DoubledBlock(torch.nn.Module):
    """A Mixtral block with one step the explorer cannot know: the routed sum is doubled."""

    def __init__(self, block):
        super().__init__()
        self.gate, self.experts = block.gate, block.experts

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        _, w, idx = self.gate(x)
        return (2.0 * self.experts(x, idx, w)).reshape(shape)


class _LogitRouter(torch.nn.Module):
    """A router returning logits only, for a block that routes by sigmoid scores (not the softmax the explorer
    assumes for an unknown router)."""

    def __init__(self, weight, top_k):
        super().__init__()
        self.weight, self.top_k = weight, top_k

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight)


class _SigmoidBlock(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.gate = _LogitRouter(block.gate.weight, block.gate.top_k)
        self.experts = block.experts

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        s = torch.sigmoid(self.gate(x) * 3.0)
        w, idx = torch.topk(s, self.gate.top_k, dim=-1)
        return self.experts(x, idx, w).reshape(shape)


@pytest.mark.parametrize("make", [_DoubledBlock, _SigmoidBlock])
def test_a_block_the_view_cannot_reproduce_is_refused_in_words(make):
    model = tiny_model("mixtral", seed=1)
    MoEModel(model)  # the stock model passes
    layer = model.model.layers[1]
    layer.mlp = make(layer.mlp)
    model.__dict__.pop("_explorer_checked", None)
    with pytest.raises(UnsupportedModelError, match=r"mixtral: MoE layer 1 .*(does not reproduce|differs)"):
        MoEModel(model)
    MoEModel(model, check=False)  # asked not to check, it still builds (for meta-device structure)


def test_load_model_refuses_a_family_it_does_not_reproduce(tmp_path):
    """Ergo's experts compute more than the explorer's gated-MLP view: load_model refuses it in words."""
    from explorer.loading import ModelLoadError, load_model

    tiny_model("ergo", seed=1).save_pretrained(tmp_path / "ergo")
    with pytest.raises(ModelLoadError, match=r"ergo: MoE layer 0 .*does not reproduce the block's own output"):
        load_model(tmp_path / "ergo", with_tokenizer=False)
    tiny_model("mixtral", seed=1).save_pretrained(tmp_path / "mixtral")
    assert len(load_model(tmp_path / "mixtral", with_tokenizer=False)[2]) == 3


def test_refusals_name_what_is_missing():
    with pytest.raises(NoMoELayersError, match="LongCat|zero-computation"):
        MoEModel(tiny_model("longcat_flash", seed=0))
    with pytest.raises(NoMoELayersError, match="not stacked per-expert tensors"):
        MoEModel(tiny_model("jetmoe", seed=0))


def test_sessions_loading_at_once_all_get_whole_models():
    """Eight threads load the demo at the same moment (the app's sessions): every model is whole and equal."""
    import threading

    from explorer.loading import DEMO_MODEL, load_model

    if not (DEMO_MODEL / "config.json").exists():
        pytest.skip("demo model asset not built yet")
    out, errors = [None] * 8, []
    barrier = threading.Barrier(8)

    def run(i):
        try:
            barrier.wait()
            out[i] = load_model(device="cpu", with_tokenizer=False)[0]
        except Exception as err:  # noqa: BLE001 - collected and reported below
            errors.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    ref = out[0].lm_head.weight
    assert all(torch.equal(m.lm_head.weight, ref) for m in out)
    after = load_model(device="cpu", with_tokenizer=False)[0]  # and loading still works afterwards
    assert torch.equal(after.lm_head.weight, ref)


@pytest.mark.parametrize("family,kw,drop", [("jamba", {}, 1), ("qwen2_moe", dict(decoder_sparse_step=2,
                                                                                  num_hidden_layers=4), 1)])
def test_block_drop_that_shifts_a_periodic_layer_pattern_is_refused(family, kw, drop):
    """Jamba's attention/expert periods and Qwen2-MoE's decoder_sparse_step set layer kinds by position: dropping a
    block in the middle gave a model that crashed (Jamba) or reloaded as another model (Qwen2-MoE)."""
    from explorer.apply import apply_plan
    from explorer.plan import Plan, PlanError

    model = tiny_model(family, seed=3, **kw)
    view = MoEModel(model)
    with pytest.raises(PlanError, match="layer pattern no longer matches"):
        apply_plan(model, view, Plan(drop_blocks=[drop]))
    apply_plan(model, view, Plan(drop_blocks=[len(view.decoder_layers) - 1]))  # the last block: fine

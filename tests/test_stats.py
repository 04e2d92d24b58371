"""Every router statistic against a brute-force reference computed another way."""
import itertools
import json

import numpy as np
import pytest
import torch

from explorer.data import TokenBlocks
from explorer.moe import MoEModel
from explorer.stats import ARRAYS, RouterStats, StatsFileError, collect_stats, token_routes
from explorer.tiny import tiny_model


def _blocks(n=6, L=24, vocab=256, seed=0, pad_last=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, L), generator=g)
    lengths = torch.full((n,), L)
    if pad_last:
        lengths[-1] = L - pad_last
        ids[-1, L - pad_last:] = 0
    return TokenBlocks(ids, lengths, torch.arange(n) % 3, ["a", "b", "c"], (lengths - 1).double() * 2, L)


def _reference(model, view, blocks):
    """Per-token loops over what the unmodified model computes (router logits from output_router_logits,
    expert outputs from the model's own experts module run on one token with gate 1)."""
    inputs = {}
    hooks = [lay.block.register_forward_pre_hook(lambda m, a, _i=lay.index: inputs.setdefault(_i, []).append(a[0]))
             for lay in view]
    with torch.no_grad():
        out = model(input_ids=blocks.input_ids, attention_mask=blocks.attention_mask(), output_router_logits=True,
                    output_hidden_states=True)
    for h in hooks:
        h.remove()
    valid = blocks.attention_mask().reshape(-1).bool()
    dom = blocks.domain[:, None].expand(-1, blocks.block_len).reshape(-1)
    ref = []
    for lay in view:
        E = lay.num_experts
        x = inputs[lay.index][0].reshape(-1, lay.hidden_size)
        logits = out.router_logits[lay.index].float()
        probs = torch.softmax(logits, -1)
        with torch.no_grad():
            _, w, idx = lay.router(x)
        H, I = lay.hidden_size, lay.intermediate_size
        r = {k_: np.zeros(s) for k_, s in [("count", E), ("gate_mass", E), ("reap", E), ("coact", (E, E)),
                                           ("domain_count", (3, E)), ("out_sum", (E, H)), ("gate_routed", E),
                                           ("act_max", E), ("neuron_sq", (E, I)), ("neuron_sq_gated", (E, I)),
                                           ("in_sq", (E, H)), ("in_sq_gated", (E, H)), ("logit_gram", (E, E)),
                                           ("dense_out_sum", (E, H)), ("out_norm", E)]}
        ent = 0.0
        for t in range(x.shape[0]):
            if not valid[t]:
                continue
            p = probs[t].double()
            r["gate_mass"] += p.numpy()
            lg = logits[t].double().numpy()
            r["logit_gram"] += np.outer(lg, lg)
            ent += float(-(p * p.log()).sum())
            chosen = idx[t].tolist()
            for j, e in enumerate(chosen):
                r["count"][e] += 1
                r["domain_count"][dom[t], e] += 1
                with torch.no_grad():
                    f = lay.experts(x[t:t + 1], torch.tensor([[e]]), torch.ones(1, 1, dtype=x.dtype))[0]
                g = float(w[t, j])
                r["reap"][e] += g * float(f.norm())
                r["out_sum"][e] += f.double().numpy()
                r["gate_routed"][e] += g
                r["out_norm"][e] += float(f.norm())
                r["act_max"][e] = max(r["act_max"][e], float(f.abs().max()))
                xt = x[t].double().numpy()
                r["in_sq"][e] += xt ** 2
                r["in_sq_gated"][e] += (g * xt) ** 2
                with torch.no_grad():  # the intermediate activation, pinned to the model's own output below
                    h = lay.expert_hidden(e, x[t:t + 1])
                    torch.testing.assert_close(lay.expert_out(e, h)[0], f, rtol=1e-4, atol=1e-5)
                hn = h[0].double().numpy()
                r["neuron_sq"][e] += hn ** 2
                r["neuron_sq_gated"][e] += (g * hn) ** 2
            for a_, b_ in itertools.permutations(chosen, 2):  # every ordered pair, not only rank-adjacent
                r["coact"][a_, b_] += 1
        r["entropy"] = ent / float(valid.sum())
        # REAP's own observer: softmax over all experts, its own top-k, renormalised; f_e(x) for every pick
        r["reap_softmax"], r["count_softmax"] = np.zeros(E), np.zeros(E)
        k = idx.shape[1]
        for t in range(x.shape[0]):
            if not valid[t]:
                continue
            sp = torch.softmax(logits[t].double(), -1)
            top = sp.topk(k)
            for g, e in zip((top.values / top.values.sum()).tolist(), top.indices.tolist()):
                with torch.no_grad():
                    f = lay.experts(x[t:t + 1], torch.tensor([[e]]), torch.ones(1, 1, dtype=x.dtype))[0]
                r["reap_softmax"][e] += g * float(f.norm())
                r["count_softmax"][e] += 1
        # HC-SMoE's dense sample: every expert on evenly spaced real tokens of each batch of 4 blocks (never padding)
        for b0 in range(0, len(blocks), 4):
            xb = inputs[lay.index][0][b0:b0 + 4].reshape(-1, lay.hidden_size)
            real = blocks.attention_mask()[b0:b0 + 4].reshape(-1).bool().nonzero().flatten()
            sel = real[torch.linspace(0, len(real) - 1, min(16, len(real))).long()]
            for e in range(E):
                with torch.no_grad():
                    f = lay.experts(xb[sel], torch.full((len(sel), 1), e), torch.ones(len(sel), 1, dtype=xb.dtype))
                r["dense_out_sum"][e] += f.double().sum(0).numpy()
        ref.append(r)
    return ref, out


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "mixtral"])
def test_reap_offers_reaps_own_softmax_definition(family):
    """DeepSeek-V3 routes by grouped, biased sigmoid gates; REAP's observer by a softmax top-k. Both are
    recorded, each equal to a per-token reference; they differ where the routers differ and agree on Mixtral."""
    from explorer.saliency import expert_scores, spearman

    model = tiny_model(family, seed=3)
    view = MoEModel(model)
    if family != "mixtral":
        with torch.no_grad():  # a bias that changes the picks, as trained DeepSeek-V3 checkpoints have
            for lay in view:
                lay.router.e_score_correction_bias.copy_(torch.linspace(-0.5, 0.5, lay.num_experts))
    blocks = _blocks(pad_last=5)
    stats = collect_stats(model, view, blocks, batch_size=4)
    from conftest import moe_block_inputs

    inputs = moe_block_inputs(model, view, blocks)
    valid = blocks.attention_mask().reshape(-1).bool()
    for lay in view:
        x = torch.cat(inputs[lay.index]).reshape(-1, lay.hidden_size)
        with torch.no_grad():
            logits = lay.call_router(x)[0].double()
        want, n = np.zeros(lay.num_experts), np.zeros(lay.num_experts)
        for t in valid.nonzero().flatten().tolist():
            top = torch.softmax(logits[t], -1).topk(lay.top_k)
            for g, e in zip((top.values / top.values.sum()).tolist(), top.indices.tolist()):
                with torch.no_grad():
                    f = lay.combine(x[t:t + 1], torch.ones(1, 1, dtype=x.dtype), torch.tensor([[e]]))
                want[e] += g * float(f.norm())
                n[e] += 1
        np.testing.assert_allclose(stats.reap(lay.index, "softmax"), want / np.maximum(n, 1), rtol=1e-4, atol=1e-7)
    soft, own = expert_scores(stats, "reap-softmax"), expert_scores(stats, "reap")
    if family == "mixtral":
        np.testing.assert_allclose(soft[0], own[0], rtol=1e-5)
    else:
        assert not np.allclose(soft[0], own[0], rtol=1e-2)
        assert spearman(soft[0], own[0]) < 0.999


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss", "olmoe"])
def test_stats_match_brute_force(family):
    model = tiny_model(family, seed=5, num_experts_per_tok=3) if family != "gpt_oss" else tiny_model(family, seed=5)
    view = MoEModel(model)
    blocks = _blocks(pad_last=5)
    stats = collect_stats(model, view, blocks, batch_size=4, sample_tokens=10)
    ref, out = _reference(model, view, blocks)
    for i, r in enumerate(ref):
        lay = stats.layers[i]
        np.testing.assert_allclose(lay["count"], r["count"])
        np.testing.assert_allclose(lay["gate_mass"], r["gate_mass"], rtol=1e-5)
        np.testing.assert_allclose(lay["coact"], r["coact"])
        np.testing.assert_allclose(lay["domain_count"], r["domain_count"])
        np.testing.assert_allclose(lay["reap"], r["reap"], rtol=1e-4)
        np.testing.assert_allclose(lay["count_softmax"], r["count_softmax"])
        np.testing.assert_allclose(lay["reap_softmax"], r["reap_softmax"], rtol=1e-4)
        np.testing.assert_allclose(lay["out_sum"], r["out_sum"], rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(lay["gate_routed"], r["gate_routed"], rtol=1e-5)
        np.testing.assert_allclose(lay["out_norm"], r["out_norm"], rtol=1e-4)
        np.testing.assert_allclose(lay["act_max"], r["act_max"], rtol=1e-5)
        for k in ("neuron_sq", "neuron_sq_gated", "in_sq", "in_sq_gated"):
            np.testing.assert_allclose(lay[k], r[k], rtol=1e-4, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(lay["logit_gram"], r["logit_gram"], rtol=1e-5, atol=1e-5)  # sums of ~100s
        np.testing.assert_allclose(lay["dense_out_sum"], r["dense_out_sum"], rtol=1e-4, atol=1e-4)
        whole = [k for k in ARRAYS if not k.startswith("half_")]  # the per-half sums: the test below
        assert set(lay) >= set(ARRAYS) and all(k in r for k in whole)  # every statistic is checked above
        assert stats.mean_entropy(i) == pytest.approx(r["entropy"], rel=1e-5)
        assert lay["tokens"] == int(blocks.attention_mask().sum())
    # block similarity from output_hidden_states (last one excluded: HF applies the final norm to it)
    hs = out.hidden_states
    m = blocks.attention_mask().bool()
    for i in range(len(hs) - 2):
        c = torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1)[m]
        assert 1 - stats.block_importance()[i] == pytest.approx(float(c.mean()), rel=1e-4)
    # routing sample = the model's own choices for the first tokens of the first block
    assert stats.sample_tokens == blocks.input_ids[0, :10].tolist()
    with torch.no_grad():
        first = model(input_ids=blocks.input_ids[:1], output_router_logits=True).router_logits
    for i in range(len(view)):
        top = torch.topk(first[i][:10], view.top_k, -1).indices
        assert [sorted(r) for r in stats.sample_routes[i]] == [sorted(r) for r in top.tolist()]


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_each_calibration_half_equals_a_pass_over_that_half_alone(family):
    """The per-half sums are what a pass over the even- (or odd-) numbered blocks alone would give, so the rank
    stability compares two real, disjoint samples of the text; old statistics without them are refused in words."""
    model = tiny_model(family, seed=3)
    view = MoEModel(model)
    blocks = _blocks(n=7, pad_last=4)
    stats = collect_stats(model, view, blocks, batch_size=3)
    for h in (0, 1):
        alone = collect_stats(model, view, blocks.subset(list(range(h, len(blocks), 2))), batch_size=2)
        half = stats.half(h)
        for i, lay in enumerate(half.layers):
            for k in ("count", "gate_mass", "reap", "reap_softmax", "count_softmax", "tokens"):
                np.testing.assert_allclose(lay[k], alone.layers[i][k], rtol=1e-4, atol=1e-6, err_msg=f"{h} {k}")
    from explorer.saliency import rank_stability

    st = rank_stability(stats, "reap")
    assert st.rho.shape == (len(view),) and np.all(st.rho[np.isfinite(st.rho)] <= 1.0)
    assert "Spearman" in st.sentence()
    with pytest.raises(ValueError, match="drawn, not measured"):
        rank_stability(stats, "random")
    old = RouterStats(**{**stats.__dict__, "layers": [{k: v for k, v in lay.items() if not k.startswith("half_")}
                                                       for lay in stats.layers]})
    with pytest.raises(StatsFileError, match="collect them again"):
        old.half(0)
    one = collect_stats(model, view, blocks.subset([0]), batch_size=1)
    with pytest.raises(StatsFileError, match="one calibration block"):
        one.half(1)


def test_layer_cos_is_residual_similarity():
    """cos(h, h + MoE(LN h)) recomputed from captured residuals equals the statistic."""
    model = tiny_model("mixtral", seed=3)
    view = MoEModel(model)
    blocks = _blocks()
    stats = collect_stats(model, view, blocks)
    cap = {}
    for lay in view:
        dl = lay.decoder_layer
        dl.post_attention_layernorm.register_forward_pre_hook(lambda m, a, _i=lay.index: cap.__setitem__(("h", _i), a[0]))
        lay.block.register_forward_hook(lambda m, a, o, _i=lay.index: cap.__setitem__(("y", _i), o))
    with torch.no_grad():
        model(input_ids=blocks.input_ids)
    for lay in view:
        h, y = cap[("h", lay.index)], cap[("y", lay.index)]
        ref = torch.nn.functional.cosine_similarity(h, h + y, dim=-1).mean()
        assert stats.layer_importance()[lay.index] == pytest.approx(1 - float(ref), rel=1e-4, abs=1e-6)


MEMORY_SCRIPT = """
import resource, sys, torch
from explorer.data import TokenBlocks
from explorer.moe import MoEModel
from explorer.stats import collect_stats
from explorer.tiny import tiny_model
torch.set_num_threads(2)
model = tiny_model("mixtral", hidden_size=128)
view = MoEModel(model)
def blocks(n):
    ids = torch.randint(1, 256, (n, 64), generator=torch.Generator().manual_seed(0))
    return TokenBlocks(ids, torch.full((n,), 64), torch.zeros(n, dtype=torch.long), ["a"], torch.ones(n), 64)
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
collect_stats(model, view, blocks(int(sys.argv[1])), batch_size=16)
small = peak()
collect_stats(model, view, blocks(int(sys.argv[2])), batch_size=16)
print(small, peak())
"""


def test_memory_does_not_grow_with_tokens():
    """Peak memory (RSS) of a pass over 8x the tokens, in one process: what grows with tokens would show here.
    Keeping one [tokens, hidden] float32 tensor of one layer for the larger pass would add 8.4M * 4 bytes = 34 MB."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, "128", "1024"], capture_output=True, text=True,
                         check=True, timeout=600)
    small, large = map(int, out.stdout.split())
    assert large - small < 12 * 2**20, f"peak RSS grew by {(large - small) / 2**20:.1f} MiB for 8x the tokens"
    model = tiny_model("mixtral")
    view = MoEModel(model)
    s1 = collect_stats(model, view, _blocks(n=4))
    s2 = collect_stats(model, view, _blocks(n=16))
    size = lambda s: sum(v.nbytes for lay in s.layers for v in lay.values() if isinstance(v, np.ndarray))  # noqa
    assert size(s1) == size(s2)
    assert s2.layers[0]["tokens"] == 4 * s1.layers[0]["tokens"]


def test_serialisation_round_trip(tmp_path):
    model = tiny_model("qwen2_moe")
    stats = collect_stats(model, MoEModel(model), _blocks())
    for name in ("s.json", "s.npz"):
        stats.save(tmp_path / name)
        back = RouterStats.load_file(tmp_path / name)
        for a, b in zip(stats.layers, back.layers):
            for k, v in a.items():
                np.testing.assert_allclose(np.asarray(b[k]), np.asarray(v))
        assert back.sample_routes == stats.sample_routes and back.domains == stats.domains
    json.loads((tmp_path / "s.json").read_text())


def test_derived_views():
    model = tiny_model("mixtral")
    stats = collect_stats(model, MoEModel(model), _blocks())
    for i in range(len(stats.layers)):
        assert stats.load(i).sum() == pytest.approx(1.0)
        assert stats.domain_load(i).sum(1) == pytest.approx(np.ones(3))
        b = stats.balance(i)
        assert 0 < b["entropy"] <= b["entropy_uniform"] + 1e-9
    assert stats.load_matrix().shape == (3, 8)


def test_token_routes():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(97 + i): i for i in range(26)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    model = tiny_model("mixtral")
    view = MoEModel(model)
    r = token_routes(model, view, tok, "hello")
    assert len(r["tokens"]) == 5 and len(r["routes"]) == len(view) and len(r["routes"][0][0]) == 2
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([r["ids"]]), output_router_logits=True).router_logits
    assert r["routes"][0][0][0] == int(logits[0][0].argmax())



@pytest.mark.parametrize("family", sorted(__import__("explorer.tiny", fromlist=["TINY_CONFIGS"]).TINY_CONFIGS))
def test_grouped_and_loop_expert_paths_agree(family):
    """The device path (grouped matmul, segment sums) and the CPU loop give the same statistics, block outputs
    and previews (merges and slimming run through edited tensors) to 1e-5 in float32."""
    from explorer.kernels import expert_path
    from explorer.plan import Plan
    from explorer.preview import preview_perplexity

    model = tiny_model(family, seed=5)
    view = MoEModel(model)
    blocks = _blocks(pad_last=5)
    got = {}
    for path in ("loop", "grouped"):
        with expert_path(path):
            st = collect_stats(model, view, blocks, batch_size=4)
            plan = Plan(merge={0: [[1, 2], [5, 6]]}, slim=0.5)  # 6 kept: divisible by any n_group here
            pv = preview_perplexity(model, view, plan, blocks, stats=st).ppl
            x = torch.randn(40, view[0].hidden_size, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                out = view[0].forward(x)
        got[path] = (st, pv, out[0] if isinstance(out, tuple) else out)
    (a, pa, oa), (b, pb, ob) = got["loop"], got["grouped"]
    for la, lb in zip(a.layers, b.layers):
        for k in ARRAYS:
            np.testing.assert_allclose(lb[k], la[k], rtol=1e-5, atol=1e-5, err_msg=k)
    assert pb == pytest.approx(pa, rel=1e-5)
    torch.testing.assert_close(ob, oa, rtol=1e-5, atol=1e-5)


def test_bf16_expert_loop_pads_rows_for_the_cpu_and_drops_them():
    """The CPU loop pads each expert's rows to a multiple of 16 in bf16 (oneDNN builds a kernel per product shape);
    the padded rows never reach the output or the observer: the layer's output is the float32 one to bf16
    rounding, and the statistics count every routed pair once."""
    from explorer.kernels import PAD_ROWS, expert_path, padded_rows

    x = torch.randn(21, 8, dtype=torch.bfloat16)
    p = padded_rows(x)
    assert PAD_ROWS == 16 and p.shape == (32, 8) and torch.equal(p[:21], x) and not p[21:].any()
    assert padded_rows(x.float()).shape == (21, 8)  # float32 products are left as they are
    h = torch.randn(37, 64, generator=torch.Generator().manual_seed(1))
    outs = {}
    for dt in (torch.float32, torch.bfloat16):  # the statistics below run on the bf16 one
        model = tiny_model("qwen3_moe", seed=5, dtype=dt)
        view = MoEModel(model)
        with torch.no_grad(), expert_path("loop"):
            out = view[0].forward(h[:, : view[0].hidden_size].to(dt))
        outs[dt] = (out[0] if isinstance(out, tuple) else out).float()
    torch.testing.assert_close(outs[torch.bfloat16], outs[torch.float32], rtol=3e-2, atol=3e-2)
    blocks = _blocks(pad_last=5)
    st = collect_stats(model, view, blocks, batch_size=4)
    routed = int(blocks.attention_mask().sum()) * view.top_k
    assert all(int(np.asarray(la["count"]).sum()) == routed for la in st.layers)
    # the loop's per-expert sums of bf16 activations (float32 scratch, in-place rows) against the grouped path's
    # products: the same sums up to the two kernels' bf16 rounding
    with expert_path("grouped"):
        sg = collect_stats(model, view, blocks, batch_size=4)
    for la, lb in zip(st.layers, sg.layers):
        for k in ("out_sum", "out_norm", "neuron_sq", "neuron_sq_gated", "in_sq", "reap", "act_max"):
            np.testing.assert_allclose(la[k], lb[k], rtol=3e-2, atol=3e-2, err_msg=k)


def test_the_statistics_pass_skips_the_lm_head():
    """The statistics read no logits, so their pass runs the decoder stack alone: the head's product is a quarter
    of the demo model's forward. A pass that reads logits (perplexity) still runs it."""
    from explorer.perplexity import perplexity

    model = tiny_model("mixtral", seed=3)
    view = MoEModel(model)
    calls = []
    hook = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        st = collect_stats(model, view, _blocks(), batch_size=4)
        assert calls == [] and st.layers[0]["tokens"] == 6 * 24
        perplexity(model, _blocks(), batch_size=4)
        assert len(calls) == 2
    finally:
        hook.remove()


def test_specialisation_lift_and_vocabulary_against_brute_force():
    """Specialisation is relative to an expert's own load, co-activation is against chance, and the vocabulary
    view counts every (token id, expert) pair of the pass; each checked by counting by hand."""
    from explorer.stats import vocab_routing

    model = tiny_model("mixtral", seed=3)
    view = MoEModel(model)
    blocks = _blocks(n=8, L=24, pad_last=5)
    stats = collect_stats(model, view, blocks)
    i = 1
    c = stats.layers[i]["count"]
    dom = stats.layers[i]["domain_count"]
    want = (dom / dom.sum(1, keepdims=True)) / (c / c.sum())[None, :]
    assert np.allclose(stats.specialisation(i), want)
    n = stats.layers[i]["tokens"]
    lift = stats.coactivation_lift(i)
    assert np.isnan(lift[0, 0]) and np.allclose(lift[0, 1], stats.layers[i]["coact"][0, 1] / n / (c[0] * c[1] / n**2))
    vr = vocab_routing(model, view, blocks, batch_size=3)
    assert len(vr.ids) == int(blocks.lengths.sum())  # every real token once, no padding
    routes = []

    def fwd(lay, hs):
        if lay.index == i:
            routes.append(lay.route(hs.reshape(-1, hs.shape[-1]))[2])
        return lay.forward(hs)
    with torch.inference_mode(), view.patched(fwd):
        for j in range(len(blocks)):
            L = int(blocks.lengths[j])
            model(input_ids=blocks.input_ids[j:j + 1, :L], use_cache=False)
    brute = {}
    for j, r in enumerate(routes):
        for t, tok in enumerate(blocks.input_ids[j, :int(blocks.lengths[j])].tolist()):
            for e in r[t].tolist():
                brute.setdefault(tok, np.zeros(8))[e] += 1
    ids, share, occ = vr.token_share(i)
    for tok, sh in zip(ids.tolist(), share):
        assert np.allclose(sh, brute[tok] / (brute[tok].sum() / 2)), tok  # per occurrence; top-2: a row sums to 2
    assert set(ids.tolist()) == set(brute)
    conc, chance = vr.concentration(i, 2), vr.concentration(i, 2, shuffled=True)
    assert 1 / 8 <= chance <= 1 and 1 / 8 <= conc <= 1
    with pytest.raises(ValueError, match="occurs 1000 times"):
        vr.concentration(i, 1000)


def test_a_preview_mask_is_copied_to_a_device_once():
    """Masks and slot maps live on the CPU; a copy per layer and forward would stall the device queue."""
    from explorer.kernels import on_device

    mask, meta = torch.tensor([True, False, True]), torch.device("meta")
    first = on_device(mask, meta)
    assert first.device == meta and on_device(mask, meta) is first
    assert on_device(mask, mask.device) is mask
    assert on_device(torch.tensor([True, False, True]), meta) is not first  # equal values, another tensor


def test_a_forced_expert_kernel_stays_in_its_own_thread():
    """The app serves several users from threads: one forcing a kernel (a benchmark, a test) must not change
    which kernel another thread's forward runs."""
    import threading

    from explorer.kernels import KERNELS, expert_path, kernel_for

    inside, release = threading.Event(), threading.Event()

    def forcing():
        with expert_path("grouped"):
            inside.set()
            release.wait(10)

    t = threading.Thread(target=forcing)
    t.start()
    try:
        assert inside.wait(10)
        assert kernel_for(torch.zeros(1)) is KERNELS["loop"]  # this thread: CPU tensors take the loop
    finally:
        release.set()
        t.join()
    with expert_path("grouped"):
        assert kernel_for(torch.zeros(1)) is KERNELS["grouped"]
    with pytest.raises(ValueError, match="expert path must be"):
        expert_path("dense")

"""Checkpoints in the formats the largest MoEs ship in: block-wise FP8 (DeepSeek-V3, Kimi-K2, Qwen3-FP8) and
MXFP4 (gpt-oss), cut out of core with their scales, reloaded with plain transformers.

The fixtures are tiny seeded models whose checkpoints this file quantises with its own reference code (the
published layouts: ``weight`` + ``weight_scale_inv`` per block; ``*_blocks`` + ``*_scales``), never downloaded.
"""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from explorer.apply import apply_plan
from explorer.checkpoint import apply_checkpoint
from explorer.moe import MoEModel
from explorer.plan import Plan, PlanError
from explorer.tiny import tiny_model

BLOCK = 16


# ---- the test's own reference quantisers --------------------------------------------------------------------
def ref_fp8(w: torch.Tensor, block=BLOCK):
    """DeepSeek-V3's block-wise FP8: per block, scale = amax / 448; stored weight = w / scale in e4m3."""
    rows, cols = w.shape
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    s = torch.empty(math.ceil(rows / block), math.ceil(cols / block))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            scale = float(blk.abs().max()) / 448.0 or 1.0
            s[i, j] = scale
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / scale).to(torch.float8_e4m3fn)
    return q, s


def ref_dequant_fp8(q, s, block=BLOCK):
    out = torch.empty(q.shape)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            out[i * block:(i + 1) * block, j * block:(j + 1) * block] = \
                q[i * block:(i + 1) * block, j * block:(j + 1) * block].float() * s[i, j]
    return out


def fp8_checkpoint(folder: Path, mtp: bool = True, bad_grid: bool = False, family: str = "deepseek_v3",
                   **overrides) -> Path:
    """A tiny DeepSeek-V3 saved as the published FP8 checkpoints are: every projection in e4m3 with a scale per
    16x16 block, router and norms in bf16, and a multi-token-prediction layer stored as layer num_hidden_layers."""
    model = tiny_model(family, seed=4, **overrides)
    model.save_pretrained(folder)
    sd = load_file(folder / "model.safetensors")
    n = model.config.num_hidden_layers
    if mtp:  # what DeepSeek-V3 stores for its MTP module: a full decoder layer plus its own projections
        for k in [k for k in sd if k.startswith(f"model.layers.{n - 1}.")]:
            sd[k.replace(f"model.layers.{n - 1}.", f"model.layers.{n}.")] = sd[k].clone()
        sd[f"model.layers.{n}.eh_proj.weight"] = torch.randn(64, 128) * 0.1
        sd[f"model.layers.{n}.enorm.weight"] = torch.ones(64)
    out = {}
    for k, v in sd.items():
        if k.endswith("proj.weight") and v.dim() == 2 and not (v.shape[0] % BLOCK or v.shape[1] % BLOCK):
            q, s = ref_fp8(v)
            out[k], out[k + "_scale_inv"] = q, s
        else:
            out[k] = v.to(torch.bfloat16)
    if bad_grid:  # the 576-row kv_a_proj case: 24 rows in 16-row blocks, scales for a 2-block grid
        k = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
        out[k], out[k + "_scale_inv"] = ref_fp8(sd[k])
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                  "weight_block_size": [BLOCK, BLOCK]}
    cfg["num_nextn_predict_layers"] = 1 if mtp else 0
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _ids():
    return torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(_ids()).logits


@pytest.fixture()
def fp8(tmp_path):
    return fp8_checkpoint(tmp_path / "fp8")


def test_fp8_checkpoint_loads_dequantised_as_the_reference_says(fp8):
    model = _load(fp8)
    sd = load_file(fp8 / "model.safetensors")
    k = "model.layers.1.mlp.experts.3.gate_proj.weight"
    w = MoEModel(model)[0].expert_tensors(3)[0][:48]  # fused gate_up: the gate half
    ref = ref_dequant_fp8(sd[k], sd[k + "_scale_inv"])
    assert torch.allclose(w.float(), ref, atol=1e-2 * ref.abs().max())


def test_fp8_drop_layer_and_block_drop_copy_bytes_and_scales(fp8, tmp_path):
    model = _load(fp8)
    view = MoEModel(model)
    sd = load_file(fp8 / "model.safetensors")
    for name, plan in {"drop": Plan(drop_experts={0: [1, 5], 1: [0, 6]}),
                       "layer": Plan(drop_layers=[1]),
                       "block": Plan(drop_blocks=[1])}.items():
        out = apply_checkpoint(fp8, plan, tmp_path / name)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["quantization_config"]["quant_method"] == "fp8", name  # the format is kept
        got = load_file(out / "model.safetensors")
        assert got["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
        if name == "drop":  # expert 2 of layer 1 is now expert 1: its bytes and scales, untouched
            for suffix in ("weight", "weight_scale_inv"):
                a = got[f"model.layers.1.mlp.experts.1.gate_proj.{suffix}"]
                b = sd[f"model.layers.1.mlp.experts.2.gate_proj.{suffix}"]
                assert torch.equal(a.view(torch.uint8) if a.dtype != torch.float32 else a,
                                   b.view(torch.uint8) if b.dtype != torch.float32 else b)
        # the in-memory apply of the dequantised model computes the same
        new, _, layout = apply_plan(model, view, plan)
        from explorer.loading import load_model

        back = load_model(out, with_tokenizer=False, dtype="float32")[0] if layout else _load(out)
        assert (_logits(back) - _logits(new)).abs().max() < 1e-4, name


@pytest.mark.parametrize("family,plan", [
    ("deepseek_v3", Plan(merge={0: [[0, 1], [4, 5]], 1: [[2, 3], [6, 7]]})),
    ("qwen3_moe", Plan(merge={i: [[0, 1], [4, 5]] for i in range(3)}, slim=2 / 3)),  # Qwen3-*-FP8: 32 of 48
])
def test_fp8_merge_and_slim_are_quantised_back_within_fp8_rounding(family, plan, tmp_path):
    from explorer.stats import collect_stats
    from explorer.families import _blocks

    src = fp8_checkpoint(tmp_path / "fp8", mtp=False, family=family)
    model = _load(src)
    view = MoEModel(model)
    stats = collect_stats(model, view, _blocks(256))
    out = apply_checkpoint(src, plan, tmp_path / "merge", stats=stats)
    got = load_file(out / "model.safetensors")
    new, nv, _ = apply_plan(model, view, plan, stats)
    k = f"model.layers.{view[1].layer_idx}.mlp.experts.0.down_proj.weight"
    w_in = nv[1].intermediate_size
    assert got[k].dtype == torch.float8_e4m3fn and got[k + "_scale_inv"].shape == (4, math.ceil(w_in / BLOCK))
    mine = ref_dequant_fp8(got[k], got[k + "_scale_inv"])
    want = nv[1].expert_tensors(0)[1].float()  # the in-memory merge (+ slim) on the dequantised model
    assert mine.shape == want.shape
    for i in range(0, mine.shape[0], BLOCK):  # every block within half an e4m3 step at its scale (largest step 32)
        for j in range(0, mine.shape[1], BLOCK):
            a, b = mine[i:i + BLOCK, j:j + BLOCK], want[i:i + BLOCK, j:j + BLOCK]
            assert (a - b).abs().max() <= b.abs().max() * 16 / 448 + 1e-6
    # the in-memory result with its edited experts quantised by this file's reference: what the format can hold
    with torch.no_grad():
        for lay in nv:
            I = lay.intermediate_size
            for e in range(lay.num_experts):
                gu, dn = lay.gate_up[e], lay.down[e]
                for part in (slice(0, I), slice(I, 2 * I)):  # gate and up are stored (and blocked) apart
                    gu[part] = ref_dequant_fp8(*ref_fp8(gu[part].float())).to(gu.dtype)
                dn.copy_(ref_dequant_fp8(*ref_fp8(dn.float())).to(dn.dtype))
    back = _load(out)
    d = (_logits(back) - _logits(new)).abs().max()
    assert d < 1e-3 * _logits(new).std(), d  # the format's rounding of the in-memory result, nothing more


def test_fp8_mtp_layer_is_left_out_or_kept_and_said(fp8, tmp_path):
    plan = Plan(drop_experts={0: [1, 5], 1: [0, 6]}, drop_blocks=[0])
    out = apply_checkpoint(fp8, plan, tmp_path / "cut")  # crashed with KeyError in the renumbering before
    keys = load_file(out / "model.safetensors").keys()
    assert not any(k.startswith("model.layers.2.") for k in keys)
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 0
    assert "left out" in json.loads((out / "summary.json").read_text())["mtp_layers"]
    kept = apply_checkpoint(fp8, plan, tmp_path / "kept", keep_mtp=True)
    keys = load_file(kept / "model.safetensors").keys()
    assert "model.layers.2.eh_proj.weight" in keys  # the MTP layer (stored as 3) follows the 2 kept layers
    assert "kept as they are" in json.loads((kept / "summary.json").read_text())["mtp_layers"]
    _load(out), _load(kept)  # both reload with plain transformers


def test_fp8_partial_blocks_load_and_bad_grids_are_refused_in_words(tmp_path):
    from explorer.loading import ModelLoadError, load_model

    bad = fp8_checkpoint(tmp_path / "bad", bad_grid=True)  # 24 rows, 16-row blocks: transformers reads 12-row ones
    model, _, _ = load_model(bad, with_tokenizer=False)  # read by the explorer itself (tests/test_layerwise.py)
    assert "block FP8" in model.explorer_dequantised
    with pytest.raises(ModelLoadError, match="not with --device-map"):
        load_model(bad, with_tokenizer=False, device_map="auto")
    sd = load_file(bad / "model.safetensors")
    k = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"
    sd[k] = torch.ones(1, 1)  # a grid that does not even cover the weight
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PlanError, match=r"needs a scale grid \[2, 4\], but .* is \[1, 1\]"):
        apply_checkpoint(bad, Plan(drop_experts={0: [1, 5], 1: [0, 6]}), tmp_path / "out")
    src = fp8_checkpoint(tmp_path / "q", mtp=False, family="qwen3_moe")
    from explorer.stats import collect_stats
    from explorer.families import _blocks

    model = _load(src)
    stats = collect_stats(model, MoEModel(model), _blocks(256))
    with pytest.raises(PlanError, match=r"slimming to 40 neurons: .* multiple of 16"):
        apply_checkpoint(src, Plan(slim=0.75), tmp_path / "slim", stats=stats)


# ---- MXFP4 (gpt-oss) -------------------------------------------------------------------------------------------
FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def ref_mxfp4(x: torch.Tensor):
    """Per 32 values: the power of two putting the largest at most 6, nearest e2m1 code, low nibble first."""
    *lead, n = x.shape
    g = x.float().reshape(*lead, n // 32, 32)
    exp = torch.ceil(torch.log2(g.abs().amax(-1).clamp_min(1e-30) / 6.0))
    v = g / (2.0 ** exp)[..., None]
    code = (v[..., None] - FP4).abs().argmin(-1)
    code = code.to(torch.uint8).reshape(*lead, n // 32, 16, 2)
    return code[..., 0] | (code[..., 1] << 4), (exp + 127).to(torch.uint8)


def mxfp4_checkpoint(folder: Path, **overrides) -> Path:
    model = tiny_model("gpt_oss", seed=6, **{"intermediate_size": 64, "hidden_size": 64, **overrides})
    model.save_pretrained(folder)
    sd = load_file(folder / "model.safetensors")
    out = {}
    for k, v in sd.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = ref_mxfp4(v.transpose(1, 2))  # stored [E, out, in]
            out[k + "_blocks"], out[k + "_scales"] = blocks, scales
        else:
            out[k] = v.to(torch.bfloat16)
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                      "model.layers.*.mlp.router",
                                                                                      "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_mxfp4_drop_copies_bytes_and_merge_requantises(tmp_path):
    src = mxfp4_checkpoint(tmp_path / "mx")
    model = _load(src)
    view = MoEModel(model)
    sd = load_file(src / "model.safetensors")
    drop = apply_checkpoint(src, Plan(drop_experts={i: [1, 5] for i in range(3)}), tmp_path / "drop")
    got = load_file(drop / "model.safetensors")
    k = "model.layers.0.mlp.experts.gate_up_proj_blocks"
    assert torch.equal(got[k][1], sd[k][2]) and torch.equal(got[k.replace("blocks", "scales")][1],
                                                             sd[k.replace("blocks", "scales")][2])
    assert json.loads((drop / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    plan = Plan(merge={i: [[1, 2], [4, 6]] for i in range(3)},  # a plain average, said (no statistics here)
                merge_weights={i: [[1.0, 1.0], [1.0, 1.0]] for i in range(3)})
    merged = apply_checkpoint(src, plan, tmp_path / "merge")
    new, nv, _ = apply_plan(model, view, plan)
    got = load_file(merged / "model.safetensors")
    ref_blocks, ref_scales = ref_mxfp4(nv[0].gate_up[1].float().T)  # the in-memory merge, quantised by the test
    mine = got["model.layers.0.mlp.experts.gate_up_proj_blocks"][1]
    agree = (mine == ref_blocks).float().mean()
    assert agree > 0.97, agree  # the same codes but where the bf16 merge rounds across a code boundary
    assert torch.equal(got["model.layers.0.mlp.experts.gate_up_proj_scales"][1], ref_scales)
    back = _load(merged)
    d = (_logits(back) - _logits(new)).abs().mean()
    assert d < 0.1 * _logits(new).std(), d  # before: packed bytes were averaged, 7.5 off in logits


def test_mxfp4_slim_to_a_width_the_format_cannot_hold_is_refused(tmp_path):
    from explorer.stats import collect_stats
    from explorer.families import _blocks

    src = mxfp4_checkpoint(tmp_path / "mx")
    model = _load(src)
    view = MoEModel(model)
    stats = collect_stats(model, view, _blocks(256))
    with pytest.raises(PlanError, match="MXFP4 holds 32 values per scale"):
        apply_checkpoint(src, Plan(slim=0.75), tmp_path / "slim", stats=stats)
    out = apply_checkpoint(src, Plan(slim=0.5), tmp_path / "slim2", stats=stats)  # 32 of 64: fits
    new, _, _ = apply_plan(model, view, Plan(slim=0.5), stats)
    d = (_logits(_load(out)) - _logits(new)).abs().mean()
    assert d < 0.1 * _logits(new).std(), d


def test_cli_says_what_becomes_of_the_format_and_the_mtp_layer(fp8, tmp_path, capsys):
    from transformers import AutoTokenizer

    from explorer.cli import main
    from explorer.loading import DEMO_MODEL

    AutoTokenizer.from_pretrained(DEMO_MODEL).save_pretrained(fp8)  # the CLI's in-memory apply exports one
    plan = tmp_path / "plan.json"
    Plan(drop_experts={0: [1, 5], 1: [0, 6]}).to_json(plan)
    assert main(["apply", str(fp8), str(plan), "--out-of-core", "--out", str(tmp_path / "ooc")]) == 0
    out = capsys.readouterr().out
    assert "weight format: kept as the input's (fp8)" in out and "mtp layers: stored layers [3]" in out
    assert main(["apply", str(fp8), str(plan), "--no-eval", "--out", str(tmp_path / "mem")]) == 0
    out = capsys.readouterr().out
    assert "fp8-quantised" in out and "--out-of-core keeps the input's format" in out
    assert "fp8-quantised" in json.loads((tmp_path / "mem" / "summary.json").read_text())["weight_format"]


def test_packed_integer_checkpoints_drop_out_of_core_and_refuse_merges_in_words(tmp_path):
    """compressed-tensors W4A16 (llm-compressor's output): int32-packed weights. Averaging the packed words gave
    merged experts 3.2x off and exit 0; slimming crashed. Drops copy the words; merges and slims are refused."""
    src = tmp_path / "w4a16"
    model = tiny_model("qwen3_moe", seed=2)
    model.save_pretrained(src)
    sd = load_file(src / "model.safetensors")
    out = {}
    for k, v in sd.items():
        if ".experts." in k and k.endswith("proj.weight"):  # the packed layout: 8 int4 per int32, group scales
            base = k[: -len("weight")]
            out[base + "weight_packed"] = torch.randint(-2**31, 2**31 - 1, (v.shape[0], v.shape[1] // 8),
                                                        dtype=torch.int32)
            out[base + "weight_scale"] = torch.rand(v.shape[0], v.shape[1] // 16).to(torch.bfloat16)
            out[base + "weight_shape"] = torch.tensor(list(v.shape), dtype=torch.int64)
        else:
            out[k] = v
    save_file(out, str(src / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    (src / "config.json").write_text(json.dumps(cfg))
    drop = apply_checkpoint(src, Plan(drop_experts={i: [1, 5] for i in range(3)}), tmp_path / "drop")
    got = load_file(drop / "model.safetensors")
    k = "model.layers.0.mlp.experts.{}.gate_proj.weight_packed"
    assert torch.equal(got[k.format(1)], out[k.format(2)])
    assert json.loads((drop / "summary.json").read_text())["weight_format"].startswith("kept as the input's")
    with pytest.raises(PlanError, match="packed integer weights .* cannot be merged or slimmed out of core"):
        apply_checkpoint(src, Plan(merge={i: [[1, 2]] for i in range(3)},
                                   merge_weights={i: [[1.0, 1.0]] for i in range(3)}), tmp_path / "merge")
    assert not (tmp_path / "merge").exists()

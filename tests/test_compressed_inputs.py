"""Checkpoints users download quantised by llm-compressor (compressed-tensors W4A16 pack-quantized and FP8-dynamic
float-quantized) load with every front end's defaults, hold the checkpoint's own dequantised weights, and export to
a folder that the explorer and plain transformers load back. The checkpoints are tiny Qwen3-MoE models quantised
here by compressed-tensors' own code (its qparams and compressors), keyed per expert as the published ones are."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from explorer import load_model
from explorer.plan import Plan
from explorer.tiny import tiny_model

ct = pytest.importorskip("compressed_tensors")


def _scheme(kind: str):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if kind == "w4a16":  # RedHatAI ...-quantized.w4a16: int4 symmetric groups, weights only
        return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=4, type="int", symmetric=True, strategy="group", group_size=16))
    # ...-FP8-dynamic: FP8 weights per output channel, activations FP8 per token at run time
    return QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel"),
        input_activations=QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True))


def _compressor(kind: str):
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    return PackedQuantizationCompressor if kind == "w4a16" else FloatQuantizationCompressor


def quantised_checkpoint(kind: str, folder: Path) -> Path:
    """A bf16 tiny Qwen3-MoE whose decoder Linear weights (attention and every expert; not the router or lm_head)
    are quantised and stored as compressed-tensors stores them."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.utils import calculate_qparams

    from transformers import AutoTokenizer

    from explorer.loading import DEMO_MODEL

    model = tiny_model("qwen3_moe", seed=3, vocab_size=4096).to(torch.bfloat16)  # the demo's tokenizer: real text
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(DEMO_MODEL).save_pretrained(folder)
    scheme, comp = _scheme(kind), _compressor(kind)
    args = scheme.weights
    out = {}
    for k, v in load_file(folder / "model.safetensors").items():
        if ".layers." in k and k.endswith("proj.weight") and ".mlp.gate." not in k:
            w = v.float()
            g = w.reshape(w.shape[0], -1, args.group_size) if kind == "w4a16" else w.unsqueeze(1)
            lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
            scale, zp = calculate_qparams(lo, hi, args)
            packed = comp.compress({"weight": v, "weight_scale": scale.to(v.dtype), "weight_zero_point": zp}, scheme)
            out.update({k[: -len("weight")] + n: t.contiguous() for n, t in packed.items()})
        else:
            out[k] = v
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized" if kind == "w4a16" else
                            "float-quantized", quantization_status="compressed", ignore=["lm_head", "re:.*mlp.gate$"])
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", **qc.model_dump(exclude=["quant_method"])}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    return folder


def _reference_weight(folder: Path, kind: str, key: str) -> torch.Tensor:
    """``key``'s weight as compressed-tensors itself dequantises it from the stored tensors."""
    sd = load_file(folder / "model.safetensors")
    base = key[: -len("weight")]
    part = {k[len(base):]: v for k, v in sd.items() if k.startswith(base)}
    got = _compressor(kind).decompress(part, _scheme(kind))
    return (got["weight"] if isinstance(got, dict) else got).float()


@pytest.fixture(scope="module", params=["w4a16", "fp8"])
def checkpoint(request, tmp_path_factory):
    return request.param, quantised_checkpoint(request.param, tmp_path_factory.mktemp(request.param) / "m")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def test_loads_with_the_apis_defaults_as_the_checkpoints_own_weights(checkpoint):
    kind, folder = checkpoint
    model, tok, view = load_model(folder, device="cpu")  # what a notebook calls
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # the checkpoint's own dtype, not float32
    assert not [n for n, _ in model.named_parameters() if "scale" in n or "packed" in n]
    assert getattr(model.config, "quantization_config", None) is None
    assert "compressed-tensors" in model.explorer_dequantised and "dequantised" in model.explorer_dequantised
    for key, got in (("model.layers.1.mlp.experts.3.down_proj.weight", view[1].down[3]),
                     ("model.layers.0.self_attn.q_proj.weight", model.model.layers[0].self_attn.q_proj.weight)):
        ref = _reference_weight(folder, kind, key)
        got = got.float() if got.shape == ref.shape else got.float().T
        assert torch.equal(got, ref.to(torch.bfloat16).float()), key
    f32, _, _ = load_model(folder, device="cpu", dtype="float32")  # asked for float32: cast once, every tensor
    assert {p.dtype for p in f32.parameters()} == {torch.float32}
    for (name, a), (_, b) in zip(f32.named_parameters(), model.named_parameters()):
        # the same dequantised values: float32 holds them as exactly as the checkpoint says, bf16 rounds them
        assert torch.equal(a.to(torch.bfloat16), b), name


def test_a_bf16_checkpoint_is_not_doubled_and_the_demo_stays_float32(tmp_path):
    model = tiny_model("qwen3_moe", seed=1).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    m, _, _ = load_model(tmp_path / "bf16", device="cpu")
    assert next(m.parameters()).dtype == torch.bfloat16
    demo, _, _ = load_model(device="cpu")
    assert next(demo.parameters()).dtype == torch.float32


@pytest.mark.parametrize("uniform", [True, False])
def test_exports_load_back_dequantised_in_the_explorer_and_transformers(checkpoint, tmp_path, uniform):
    from transformers import AutoModelForCausalLM

    from explorer.apply import apply_plan, export

    kind, folder = checkpoint
    model, tok, view = load_model(folder, device="cpu")
    plan = Plan(drop_experts={i: [1, 2] for i in range(len(view))} if uniform else {0: [1], 1: [2, 5, 6]})
    new, _, layout = apply_plan(model, view, plan)
    out = export(new, tok, plan, tmp_path / "cut", layout=layout, source=folder)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    keys = load_file(out / "model.safetensors").keys()
    assert not [k for k in keys if "scale" in k or "packed" in k or "zero_point" in k]
    note = json.loads((out / "summary.json").read_text())["weight_format"]
    assert "compressed-tensors" in note and "bfloat16" in note and "without a quantization_config" in note
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    want = _logits(new, ids)
    back, _, _ = load_model(out, device="cpu")
    assert torch.equal(_logits(back, ids), want)
    if uniform:  # per-layer counts need explorer_layout.json, which plain transformers cannot read (issue 31)
        plain = AutoModelForCausalLM.from_pretrained(out)
        assert torch.equal(_logits(plain, ids), want)


def test_the_app_loads_it_with_its_defaults(checkpoint, tmp_path):
    """The real app, driven as a browser would through its API, with the Model tab's default dtype."""
    import app as app_module
    from gradio_client import Client
    from test_app import launched_app

    kind, folder = checkpoint
    blocks = app_module.build()
    default = next(c.value for c in blocks.blocks.values() if getattr(c, "label", "") and
                   str(c.label).startswith("dtype"))
    assert default == "auto"
    with launched_app(tmp_path / "out", tmp_path / "app.log") as url:
        c = Client(url, verbose=False)
        out = c.predict(str(folder), "cpu", default, "demo", None, 1024, api_name="/on_load")
        summary = out if isinstance(out, str) else out[-1]
        assert "dequantised" in summary and "bfloat16" in summary, summary

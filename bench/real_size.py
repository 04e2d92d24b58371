"""Real-size chain under a memory cap: build a checkpoint shard by shard, then stats, preview, out-of-core apply and
eval with ``--device-map auto --max-memory cpu=...``, each in its own process, printing wall time and peak RSS.

    python bench/real_size.py                       # OLMoE-1B-7B shape (16 layers, 64 experts, 6.9B, 13.8 GB bf16)
    python bench/real_size.py --layers 4            # the same layers, fewer of them (what this project's CI size runs)
    python bench/real_size.py --shape qwen3-30b-a3b --layers 2   # a Qwen3-30B-A3B-shaped slice, 128 experts
    python bench/real_size.py --deepseek-fp8        # DeepSeek-V3 at full width in its published block FP8: one dense
                                                    # and two MoE layers of 256 experts (23 GB), layer by layer

The checkpoint is written as the published ones are (per-expert keys, bf16), one decoder layer per shard, so no
more than one layer is ever in memory while building. Each step runs the explorer's CLI in a child process; peak RSS
is that process's own, reported against the largest tensor and the model's size. The last line compares the
statistics pass with a plain forward over the same tokens on the same device map (loaded once, in one process).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {  # published configs' shapes (random weights)
    "olmoe-1b-7b": dict(model_type="olmoe", hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                        vocab_size=50304, max_position_embeddings=4096, norm_topk_prob=False),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, vocab_size=151936, max_position_embeddings=4096,
                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
}

RSS_WRAPPER = """
import resource, sys, threading, time
peak = [0]
def sample():  # anonymous memory (the heap), as opposed to file pages mapped from the checkpoint's shards
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak[0] = max(peak[0], int(line.split()[1]))
        time.sleep(0.1)
threading.Thread(target=sample, daemon=True).start()
sys.argv = ["explorer"] + sys.argv[1:]
from explorer.cli import main
code = main(sys.argv[1:])
print(f"PEAK_RSS_KB={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
print(f"PEAK_ANON_KB={peak[0]}", file=sys.stderr)
sys.exit(code)
"""


def build(folder: Path, shape: dict, layers: int, seed: int = 0) -> tuple[int, int]:
    """Write config, tokenizer and one safetensors shard per decoder layer; returns (total bytes, largest tensor)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    from explorer.loading import DEMO_MODEL

    folder.mkdir(parents=True, exist_ok=True)
    cfg = AutoConfig.for_model(**{**shape, "num_hidden_layers": layers, "tie_word_embeddings": False})
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(folder)
    AutoTokenizer.from_pretrained(DEMO_MODEL).save_pretrained(folder)
    g = torch.Generator().manual_seed(seed)
    H, I, E = cfg.hidden_size, getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size, cfg.num_experts
    hd = getattr(cfg, "head_dim", None) or H // cfg.num_attention_heads
    nq, nkv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd

    def rnd(*s):
        return (torch.randn(*s, generator=g) * s[-1] ** -0.5).to(torch.bfloat16)

    wmap, total, largest = {}, 0, 0

    def shard(name: str, tensors: dict) -> None:
        nonlocal total, largest
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for k, t in tensors.items():
            wmap[k] = name
            total += t.numel() * t.element_size()
            largest = max(largest, t.numel() * t.element_size())

    n_sh = layers + 1
    shard(f"model-00001-of-{n_sh:05d}.safetensors", {
        "model.embed_tokens.weight": rnd(cfg.vocab_size, H), "lm_head.weight": rnd(cfg.vocab_size, H),
        "model.norm.weight": torch.ones(H, dtype=torch.bfloat16)})
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
             p + "self_attn.q_proj.weight": rnd(nq, H), p + "self_attn.k_proj.weight": rnd(nkv, H),
             p + "self_attn.v_proj.weight": rnd(nkv, H), p + "self_attn.o_proj.weight": rnd(H, nq),
             p + "mlp.gate.weight": rnd(E, H)}
        if shape["model_type"] == "olmoe":
            t[p + "self_attn.q_norm.weight"] = torch.ones(nq, dtype=torch.bfloat16)
            t[p + "self_attn.k_norm.weight"] = torch.ones(nkv, dtype=torch.bfloat16)
        else:
            t[p + "self_attn.q_norm.weight"] = torch.ones(hd, dtype=torch.bfloat16)
            t[p + "self_attn.k_norm.weight"] = torch.ones(hd, dtype=torch.bfloat16)
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            t[q + "gate_proj.weight"], t[q + "up_proj.weight"], t[q + "down_proj.weight"] = \
                rnd(I, H), rnd(I, H), rnd(H, I)
        shard(f"model-{i + 2:05d}-of-{n_sh:05d}.safetensors", t)
        del t
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": wmap}, indent=1))
    return total, largest


def run(step: str, argv: list[str], env=None) -> dict:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *argv], capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t
    def kb(tag):
        return next((int(line.split("=")[1]) * 1024 for line in r.stderr.splitlines() if line.startswith(tag)), 0)
    rss, anon = kb("PEAK_RSS_KB="), kb("PEAK_ANON_KB=")
    if r.returncode != 0:
        print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{step} failed with exit code {r.returncode}")
    return {"step": step, "wall_s": wall, "peak_rss": rss, "peak_anon": anon, "stdout": r.stdout}


def stats_vs_forward(model_dir: Path, max_memory: str, offload: Path, seq: int, n: int) -> dict:
    """Statistics pass / plain forward over the same tokens, the model loaded once on the same device map."""
    from explorer import collect_stats, load_model, perplexity
    from bench._common import random_blocks

    model, _, view = load_model(model_dir, dtype="auto", device_map="auto", max_memory=max_memory,
                                offload_folder=offload, with_tokenizer=False)
    blocks = random_blocks(n, seq, 1000)
    perplexity(model, blocks, batch_size=n)  # warm-up: first touches of offloaded weights
    t = time.perf_counter()
    perplexity(model, blocks, batch_size=n)
    fwd = time.perf_counter() - t
    t = time.perf_counter()
    collect_stats(model, view, blocks, batch_size=n)
    st = time.perf_counter() - t
    return {"forward_s": fwd, "stats_s": st, "ratio": st / fwd}


def machine(folder: Path, seconds: float = 3.0) -> dict:
    """This machine's cold sequential read throughput (every shard of the checkpoint read once in order with
    direct I/O where the file system has it, as the layer-by-layer engine reads), its write throughput (1 GiB, fsynced) and its float32 / bf16 matrix-product
    throughput on all its threads.

    The whole checkpoint is read twice, not a few seconds of it: a virtual machine's disk is often rate-limited by a
    token bucket (this project's VMs read ~1.7-2 GB/s for the first ~10-14 GB after a rest, then ~0.47 GB/s), and a
    short probe measures the burst, not what a pass over a 13 GB checkpoint gets. ``burst_bytes_per_s`` is the first
    read's first third, ``read_bytes_per_s`` the second read's last third (where a pass that follows another one
    reads), ``whole_read_s`` the first read's time."""
    import os

    from explorer.shards import RunReader, weight_map

    wmap = weight_map(folder)
    keys: dict[str, list[str]] = {}
    for k, shard in wmap.items():
        keys.setdefault(shard, []).append(k)
    shards = sorted(keys)
    reader = RunReader(folder, wmap)  # as the engine reads: large direct reads, one reused buffer
    times = []
    for _ in range(2):  # twice: the second read starts where a pass after another pass starts
        drop_cache(folder)
        for sh in shards:
            t = time.perf_counter()
            reader.read(keys[sh])
            times.append((reader.nbytes(keys[sh]), time.perf_counter() - t))
    first, second = times[:len(shards)], times[len(shards):]

    def rate(part):
        return sum(b for b, _ in part) / max(sum(s for _, s in part), 1e-9)

    third = max(1, len(shards) // 3)
    burst, read = rate(first[:third]), rate(second[-third:])
    whole = sum(s for _, s in first)
    buf, probe = os.urandom(64 << 20), folder.parent / "write-probe"
    t = time.perf_counter()
    with open(probe, "wb") as f:
        for _ in range(16):  # 1 GiB, flushed to the disk
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    out = {"read_bytes_per_s": read, "burst_bytes_per_s": burst, "whole_read_s": whole,
           "write_bytes_per_s": (16 << 26) / (time.perf_counter() - t)}
    probe.unlink()
    out.update(gemm_rates(seconds))
    return out


def gemm_rates(seconds: float = 3.0) -> dict:
    """float32 and bf16 matrix-product throughput on all threads, and the one the engine computes in. A virtual
    machine's rate drifts with its neighbours (this project's VM: 267 and 421 GFLOP/s bf16 half an hour apart), so
    the steps' tables are also given against the best rate measured before or after them."""
    from explorer.layerwise import cpu_has_fast_bf16

    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(2048, 2048, dtype=dt), torch.randn(2048, 2048, dtype=dt)
        a @ b
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            a @ b
            n += 1
        out[f"{name}_flop_per_s"] = n * 2 * 2048 ** 3 / (time.perf_counter() - t)
    out["compute"] = "bf16" if cpu_has_fast_bf16() else "fp32"
    out["compute_flop_per_s"] = out[f"{out['compute']}_flop_per_s"]
    return out


def bounds(shape: dict, layers: int, tokens: int, stored: int, m: dict) -> dict:
    """The physical lower bound of one pass: every stored byte read once at the cold read rate, plus the active
    matrix products (attention projections, router, top-k experts; the head for perplexity) at the speed of the
    dtype the engine computes in (bf16 where the CPU has bf16 instructions, else float32).
    Attention's own T^2 products are left out (small at these lengths), so the bound is a little low."""
    H, E, k = shape["hidden_size"], shape["num_experts"], shape["num_experts_per_tok"]
    I = shape.get("moe_intermediate_size") or shape["intermediate_size"]
    hd = shape.get("head_dim") or H // shape["num_attention_heads"]
    attn = H * hd * (2 * shape["num_attention_heads"] + 2 * shape["num_key_value_heads"])
    active = layers * (attn + E * H + k * 3 * H * I)
    head = shape["vocab_size"] * H
    rate = m["compute_flop_per_s"]
    read_s = stored / m["read_bytes_per_s"]
    stats_s = read_s + 2 * active * tokens / rate
    ppl_s = stats_s + 2 * head * tokens / rate
    return {"read_s": read_s, "stats": stats_s, "perplexity": ppl_s}


def stats_tokens(path: Path) -> int:
    from explorer.stats import RouterStats

    return int(RouterStats.load_file(path).info["tokens"])


def drop_cache(folder: Path) -> None:
    """Drop the shards' pages from the page cache, so the next step reads them from the disk as a first run does
    (the bound assumes cold reads; a checkpoint that fits the page cache would otherwise be read from memory)."""
    import os

    for sh in folder.glob("*.safetensors"):
        with open(sh, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def fixed_cost(work: Path, shape: dict, seq: int) -> float:
    """Wall time of `stats --sequential` on a 1-layer, hidden-64 model of the same family and tokenizer: what every
    run pays whatever the model's size."""
    tiny = {**shape, "hidden_size": 64, "intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 4,
            "vocab_size": 4096}
    tiny.pop("moe_intermediate_size", None)
    tiny.pop("head_dim", None)
    if "moe_intermediate_size" in shape:
        tiny["moe_intermediate_size"] = 32
    build(work / "tiny", tiny, 1)
    argv = ["stats", str(work / "tiny"), "--sequential", "--data", "demo", "--block-len", str(seq), "--max-tokens",
            "256", "--out", str(work / "tiny.npz"), "--overwrite"]
    run("warm-up", argv)
    return run("fixed", argv)["wall_s"]


DEEPSEEK_V3 = dict(  # the published config.json's shapes (671B); random FP8 weights
    model_type="deepseek_v3", hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
    n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
    norm_topk_prob=True, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    num_attention_heads=128, num_key_value_heads=128, vocab_size=129280, max_position_embeddings=4096,
    first_k_dense_replace=1, rope_scaling=None)
FP8_BLOCK = 128


def build_fp8(folder: Path, shape: dict, layers: int, seed: int = 0) -> dict:
    """A checkpoint laid out as DeepSeek-V3's published one: every projection of the decoder layers in e4m3 with a
    float32 scale per 128 x 128 block (``kv_a_proj_with_mqa``'s 576 rows fill 4.5 blocks), router, norms,
    embedding and head in bf16, experts keyed one by one, one shard per decoder layer. The FP8 codes are random
    bytes (NaN codes excluded), so writing runs at the disk's speed. Returns byte counts by kind."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from explorer.loading import DEMO_MODEL

    folder.mkdir(parents=True, exist_ok=True)
    cfg = AutoConfig.for_model(**{**shape, "num_hidden_layers": layers, "tie_word_embeddings": False})
    cfg.dtype = "bfloat16"
    cfg.quantization_config = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                               "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    cfg.save_pretrained(folder)
    AutoTokenizer.from_pretrained(DEMO_MODEL).save_pretrained(folder)
    del cfg.quantization_config
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(seed)

    def fp8(rows, cols):
        b = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, generator=g)
        b[(b & 0x7F) == 0x7F] = 0x7E  # e4m3's NaN codes
        grid = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
        return b.view(torch.float8_e4m3fn), torch.rand(*grid, generator=g) * 1e-3 + 1e-4

    sizes = {"fp8_experts": 0, "fp8_other": 0, "other": 0, "total": 0}
    wmap = {}

    def shard(name, tensors):
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for k, t in tensors.items():
            wmap[k] = name
            sizes["total"] += t.numel() * t.element_size()

    per_layer: dict[int, dict] = {i: {} for i in range(layers)}
    rest = {}
    for name, p in skeleton.named_parameters():
        parts = name.split(".")
        if parts[:2] != ["model", "layers"]:
            rest[name] = (torch.rand(*p.shape, generator=g, dtype=torch.bfloat16) - 0.5) * 0.04
            sizes["other"] += p.numel() * 2
            continue
        out = per_layer[int(parts[2])]
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            continue  # written per expert below
        if name.endswith("_proj.weight") and p.dim() == 2:
            out[name], out[name + "_scale_inv"] = fp8(*p.shape)
            sizes["fp8_other"] += p.numel()
        elif name.endswith("e_score_correction_bias"):
            out[name] = torch.zeros(*p.shape)
        else:  # norms (ones) and the router (small random)
            out[name] = (torch.ones(*p.shape) if "norm" in name else torch.randn(*p.shape, generator=g) * 0.02
                         ).to(torch.bfloat16)
            sizes["other"] += p.numel() * 2
    shard("model-rest.safetensors", rest)
    del rest
    E, H, I = shape["n_routed_experts"], shape["hidden_size"], shape["moe_intermediate_size"]
    per_shard = 16  # experts per shard (0.7 GB): safetensors serialises a shard in memory before writing it
    for i in range(layers):
        shard(f"model-layer{i:02d}.safetensors", per_layer[i])
        per_layer[i] = None
        if i < shape["first_k_dense_replace"]:
            continue
        for first in range(0, E, per_shard):
            t = {}
            for e in range(first, min(E, first + per_shard)):
                q = f"model.layers.{i}.mlp.experts.{e}."
                for proj, (r, c) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                    t[q + proj + ".weight"], t[q + proj + ".weight_scale_inv"] = fp8(r, c)
                    sizes["fp8_experts"] += r * c
            shard(f"model-layer{i:02d}-experts{first:03d}.safetensors", t)
            del t
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sizes["total"]}, "weight_map": wmap}, indent=1))
    return sizes


def dequant_rate(seconds: float = 3.0) -> float:
    """FP8 weights dequantised per second (e4m3 codes times their block scales, to bf16) on this machine: one
    DeepSeek-V3 expert's gate and up projections at a time, as the engine does it."""
    from explorer.weightformats import BlockFP8Stack

    st = BlockFP8Stack(torch.randn(2, 4096, 7168).to(torch.float8_e4m3fn), [torch.rand(2, 16, 56)] * 2, [2048, 2048],
                       (FP8_BLOCK, FP8_BLOCK), torch.bfloat16)
    st[0]
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        st[n % 2]
        n += 1
    return n * 4096 * 7168 / (time.perf_counter() - t)


def deepseek_fp8(work: Path, layers: int, tokens: int, seq: int) -> None:
    """stats, eval and preview with --sequential on DeepSeek-V3 at full width in block FP8, each from a cold page
    cache, against the bound: one read of the stored bytes, every FP8 weight dequantised once, and the active
    matrix products (attention projections, router, shared and top-8 routed experts, head) at this CPU's speed."""
    shape = DEEPSEEK_V3
    model_dir = work / "deepseek-v3-fp8"
    t = time.perf_counter()
    sizes_file = model_dir / "bench-sizes.json"
    if sizes_file.exists():  # a checkpoint this bench built before (--workdir ... --keep)
        sizes = json.loads(sizes_file.read_text())
    else:
        sizes = build_fp8(model_dir, shape, layers)
        sizes_file.write_text(json.dumps(sizes))
    moe_layers = layers - shape["first_k_dense_replace"]
    print(f"built DeepSeek-V3 at full width, {layers} decoder layers ({moe_layers} MoE x 256 experts): "
          f"{sizes['total'] / 1e9:.1f} GB ({sizes['fp8_experts'] / 1e9:.1f} G FP8 expert weights), "
          f"{time.perf_counter() - t:.0f}s")
    m = machine(model_dir)
    rate = dequant_rate()
    print(f"this machine: cold read {m['read_bytes_per_s'] / 1e6:.0f} MB/s; matrix products "
          f"{m['compute_flop_per_s'] / 1e9:.0f} GFLOP/s in {m['compute']}; FP8 dequantisation "
          f"{rate / 1e9:.2f} G weights/s")
    H = shape["hidden_size"]
    attn = sum(p for p in (H * 1536, 1536 * 128 * 192, H * 576, 512 * 128 * 256, 128 * 128 * H))
    active = layers * attn + shape["first_k_dense_replace"] * 3 * H * shape["intermediate_size"] + \
        moe_layers * (H * 256 + 9 * 3 * H * shape["moe_intermediate_size"])
    read_s = sizes["total"] / m["read_bytes_per_s"]
    deq_s = (sizes["fp8_experts"] + sizes["fp8_other"]) / rate
    flop_s = 2 * active * tokens / m["compute_flop_per_s"]
    head_s = 2 * shape["vocab_size"] * H * tokens / m["compute_flop_per_s"]
    print(f"bound per pass: read {read_s:.1f}s + dequantise {deq_s:.1f}s + products {flop_s:.1f}s "
          f"(+ head {head_s:.1f}s for perplexity)")
    common = ["--sequential", "--data", "demo", "--block-len", str(seq), "--max-tokens", str(max(1, tokens // 4)),
              "--batch-size", str(max(1, tokens // seq))]  # one batch: each expert is dequantised once per pass
    stats_file = work / "ds-stats.npz"
    print("\n| step | wall s | lower bound s | wall / bound | peak anonymous GiB | of the checkpoint |")
    print("|---|---|---|---|---|---|")
    steps = [("stats", ["stats", str(model_dir), *common, "--out", str(stats_file), "--overwrite"],
              read_s + deq_s + flop_s),
             ("eval", ["eval", str(model_dir), *common], read_s + deq_s + flop_s + head_s)]
    for name, argv, bound in steps:
        drop_cache(model_dir)
        r = run(name, argv)
        print(f"| {name} | {r['wall_s']:.1f} | {bound:.1f} | {r['wall_s'] / bound:.2f} | "
              f"{r['peak_anon'] / 2**30:.2f} | {r['peak_anon'] / sizes['total']:.2f} |", flush=True)
        for line in r["stdout"].splitlines():
            if "layer by layer" in line:
                print("   ", line.strip())


def layerwise(model_dir: Path, work: Path, shape: dict, layers: int, stored: int, token_counts: list[int],
              seq: int) -> None:
    """stats, preview and eval with --sequential at each token count: wall time, peak memory and the ratio to the
    lower bound of the passes each step makes (preview: the original's and the plan's perplexity)."""
    m = machine(model_dir)
    print(f"\nthis machine: cold read of the whole checkpoint {m['whole_read_s']:.1f} s; "
          f"{m['burst_bytes_per_s'] / 1e6:.0f} MB/s over its first third, {m['read_bytes_per_s'] / 1e6:.0f} MB/s over "
          "the last third of a second read right after it (the rate the bounds use: each step follows another that "
          "drew on the disk's burst; the next column uses the burst rate); "
          f"write {m['write_bytes_per_s'] / 1e6:.0f} "
          f"MB/s (fsynced); matrix products "
          f"{m['fp32_flop_per_s'] / 1e9:.0f} GFLOP/s in float32, {m['bf16_flop_per_s'] / 1e9:.0f} GFLOP/s in bf16 "
          f"(bf16 instructions: {'yes' if m['compute'] == 'bf16' else 'no'}, so a bf16 checkpoint computes in "
          f"{m['compute']})")
    start = fixed_cost(work, shape, seq)
    print(f"process start: {start:.1f}s (the same `stats` command on a 1-layer model of this family at a tiny width: "
          "imports, tokenizer, the text's tokenisation, the statistics file; nothing that grows with the model)")
    print("\n| tokens (in total) | step | wall s | lower bound s | (wall - start) / bound | the same at the burst rate | "
          "peak anonymous GiB | of the model |")
    print("|---|---|---|---|---|---|---|---|")
    plan = work / "plan-seq.json"
    done = []  # (tokens, step, wall s, whole-checkpoint reads, passes, bound s) for the table at the best rate
    for tokens in token_counts:
        b = bounds(shape, layers, tokens, stored, m)
        common = ["--sequential", "--data", "demo", "--block-len", str(seq),
                  "--max-tokens", str(max(1, tokens // 4)), "--batch-size", "8"]
        st = work / f"stats-{tokens}.npz"  # JSON of 16 x 64 experts' [E, H] sums is ~170 MB of text
        drop_cache(model_dir)
        rows = [("stats", run("stats", ["stats", str(model_dir), *common, "--out", str(st), "--overwrite"]),
                 b["stats"])]
        real = stats_tokens(st)
        if not plan.exists():
            subprocess.run([sys.executable, "-m", "explorer", "plan", str(model_dir), "--stats", str(st),
                            "--drop-experts", "0.25", "--criterion", "reap", "--out", str(plan)], cwd=ROOT,
                           check=True, capture_output=True)
        drop_cache(model_dir)
        rows.append(("preview (2 passes)", run("preview", ["preview", str(model_dir), str(plan), *common]),
                     2 * b["perplexity"]))
        drop_cache(model_dir)
        rows.append(("eval", run("eval", ["eval", str(model_dir), *common]), b["perplexity"]))
        if tokens == token_counts[0]:  # the cut out of core: every byte read once and the kept ones written once
            cut = work / "cut-seq"
            shutil.rmtree(cut, ignore_errors=True)
            kept = 0.75  # the plan drops a quarter of the experts
            drop_cache(model_dir)
            rows.append(("apply --out-of-core (25% drop)", run("apply", ["apply", str(model_dir), str(plan),
                                                                        "--out-of-core", "--out", str(cut)]),
                         stored / m["read_bytes_per_s"] + kept * stored / m["write_bytes_per_s"]))
        for name, r, bound in rows:
            reads = 2 if name.startswith("preview") else 1  # whole-checkpoint reads the step makes
            at_burst = bound - reads * stored * (1 / m["read_bytes_per_s"] - 1 / m["burst_bytes_per_s"])
            print(f"| {real:,} | {name} | {r['wall_s']:.1f} | {bound:.1f} | {(r['wall_s'] - start) / bound:.2f} | "
                  f"{(r['wall_s'] - start) / at_burst:.2f} | {r['peak_anon'] / 2**30:.2f} | "
                  f"{r['peak_anon'] / stored:.2f} |", flush=True)
            done.append((real, name, r["wall_s"], reads, bound))
    after = gemm_rates()
    best = max(m["compute_flop_per_s"], after["compute_flop_per_s"])
    print(f"\nmatrix products again after the steps: {after['compute_flop_per_s'] / 1e9:.0f} GFLOP/s in "
          f"{after['compute']} (before: {m['compute_flop_per_s'] / 1e9:.0f}). Against the best of the two "
          f"({best / 1e9:.0f}), a bound's product part shrinks by {m['compute_flop_per_s'] / best:.2f}:")
    print("\n| tokens (in total) | step | wall s | lower bound s at the best rate | (wall - start) / bound |")
    print("|---|---|---|---|---|")
    for real, name, wall, reads, bound in done:
        if not name.startswith("apply"):  # apply does no products: its bound stays
            io = reads * stored / m["read_bytes_per_s"]
            bound = io + (bound - io) * m["compute_flop_per_s"] / best
        print(f"| {real:,} | {name} | {wall:.1f} | {bound:.1f} | {(wall - start) / bound:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="olmoe-1b-7b")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the published count)")
    ap.add_argument("--max-memory", default="cpu=5GiB")
    ap.add_argument("--tokens", type=int, default=1024, help="calibration / evaluation tokens per domain (with "
                    "--stats-only, 0: no cap)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--workdir", default=None, help="where the checkpoint goes (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--sequential", action="store_true", help="the layer-by-layer engine (no device map): stats, "
                    "preview and eval at 1,024 and 4,096 calibration tokens in total, against their lower bounds")
    ap.add_argument("--stats-only", action="store_true", help="with a device map: only `stats`, against its lower "
                    "bound and the process start, and what it left in the offload folder (the issue's 2-layer check: "
                    "--layers 2 --max-memory cpu=600MiB)")
    ap.add_argument("--deepseek-fp8", action="store_true", help="DeepSeek-V3 at full width in block FP8 (1 dense + "
                    "2 MoE layers unless --layers), stats and eval layer by layer against their bounds")
    a = ap.parse_args()
    if a.deepseek_fp8:
        work = Path(a.workdir or tempfile.mkdtemp(prefix="explorer-deepseek-fp8-"))
        try:
            deepseek_fp8(work, a.layers or 3, a.tokens, a.seq)
        finally:
            if not a.keep:
                shutil.rmtree(work, ignore_errors=True)
        return
    shape = SHAPES[a.shape]
    layers = a.layers or shape["num_hidden_layers"]
    work = Path(a.workdir or tempfile.mkdtemp(prefix="explorer-real-size-"))
    model_dir, offload = work / "model", work / "offload"
    try:
        t = time.perf_counter()
        total, largest = build(model_dir, shape, layers)
        print(f"built {a.shape} x {layers} layers: {total / 2**30:.2f} GiB in bf16, largest tensor "
              f"{largest / 2**20:.0f} MiB, {time.perf_counter() - t:.0f}s")
        if a.sequential:
            layerwise(model_dir, work, shape, layers, total, [1024, 4096], a.seq)
            return
        dev = ["--device-map", "auto", "--max-memory", a.max_memory, "--offload-folder", str(offload)]
        common = dev + ["--data", "demo", "--max-tokens", str(a.tokens), "--block-len", str(a.seq), "--batch-size", "2"]
        if a.stats_only:  # the command as a user types it: the CLI's own batch size and block length
            offload.mkdir(exist_ok=True)
            m = machine(model_dir)
            start = fixed_cost(work, shape, a.seq)
            drop_cache(model_dir)
            cap = ["--max-tokens", str(a.tokens)] if a.tokens else []  # --tokens 0: all the demo's calibration text
            r = run("stats", ["stats", str(model_dir), *dev, *cap, "--out", str(work / "stats.npz"), "--overwrite"])
            st = stats_tokens(work / "stats.npz")
            b = bounds(shape, layers, st, total, m)["stats"]
            left = sorted(str(f.relative_to(offload)) for f in offload.rglob("*"))
            print(f"cold read {m['read_bytes_per_s'] / 1e6:.0f} MB/s (first third {m['burst_bytes_per_s'] / 1e6:.0f}); "
                  f"process start {start:.1f} s")
            print(f"stats {' '.join(dev)}: {st:,} tokens in total, wall {r['wall_s']:.1f} s, lower bound {b:.1f} s, "
                  f"(wall - start) / bound {(r['wall_s'] - start) / b:.2f}; peak anonymous "
                  f"{r['peak_anon'] / 2**30:.2f} GiB; offload folder after it: {left or 'empty'}")
            return
        plan = work / "plan.json"
        rows = [run("stats", ["stats", str(model_dir), *common, "--out", str(work / "stats.json")])]
        offload_bytes = sum(f.stat().st_size for f in offload.rglob("*") if f.is_file()) if offload.exists() else 0
        rows.append(run("plan", ["plan", str(model_dir), "--stats", str(work / "stats.json"), "--drop-experts", "0.25",
                                 "--criterion", "reap", "--out", str(plan), *dev]))
        rows.append(run("preview", ["preview", str(model_dir), str(plan), *common]))
        rows.append(run("apply --out-of-core", ["apply", str(model_dir), str(plan), "--out-of-core",
                                                "--out", str(work / "cut")]))
        rows.append(run("eval (cut)", ["eval", str(work / "cut"), *common]))
        print("\n| step | wall s | peak RSS GiB (of which anonymous) | anonymous / largest tensor | anonymous / model |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['step']} | {r['wall_s']:.1f} | {r['peak_rss'] / 2**30:.2f} ({r['peak_anon'] / 2**30:.2f}) | "
                  f"{r['peak_anon'] / largest:.1f} | {r['peak_anon'] / total:.2f} |")
        print(f"\noffload folder after the first load: {offload_bytes / 2**30:.2f} GiB "
              f"({offload_bytes / total:.2f}x the checkpoint)")
        sf = stats_vs_forward(model_dir, a.max_memory, offload, a.seq, max(1, a.tokens // a.seq))
        print(f"stats pass {sf['stats_s']:.1f}s / plain forward {sf['forward_s']:.1f}s on the same device map: "
              f"ratio {sf['ratio']:.2f}")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

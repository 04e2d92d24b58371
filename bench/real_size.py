"""Real-size chain under a memory cap: build a checkpoint shard by shard, then stats, preview, out-of-core apply and
eval with ``--device-map auto --max-memory cpu=...``, each in its own process, printing wall time and peak RSS.

    python bench/real_size.py                       # OLMoE-1B-7B shape (16 layers, 64 experts, 6.9B, 13.8 GB bf16)
    python bench/real_size.py --layers 4            # the same layers, fewer of them (what this project's CI size runs)
    python bench/real_size.py --shape qwen3-30b-a3b --layers 2   # a Qwen3-30B-A3B-shaped slice, 128 experts

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
    """This machine's cold sequential read throughput (the checkpoint's own shards, their cached pages dropped
    with posix_fadvise), its write throughput (1 GiB, fsynced) and its float32 / bf16 matrix-product throughput on
    all its threads."""
    import os

    shards = sorted(folder.glob("*.safetensors"), key=lambda p: -p.stat().st_size)[:3]
    done, t = 0, time.perf_counter()
    for sh in shards:
        with open(sh, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            while chunk := f.read(64 << 20):
                done += len(chunk)
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    read = done / (time.perf_counter() - t)
    buf, probe = os.urandom(64 << 20), folder.parent / "write-probe"
    t = time.perf_counter()
    with open(probe, "wb") as f:
        for _ in range(16):  # 1 GiB, flushed to the disk
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    out = {"read_bytes_per_s": read, "write_bytes_per_s": (16 << 26) / (time.perf_counter() - t)}
    probe.unlink()
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(2048, 2048, dtype=dt), torch.randn(2048, 2048, dtype=dt)
        a @ b
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            a @ b
            n += 1
        out[f"{name}_flop_per_s"] = n * 2 * 2048 ** 3 / (time.perf_counter() - t)
    from explorer.layerwise import cpu_has_fast_bf16

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


def layerwise(model_dir: Path, work: Path, shape: dict, layers: int, stored: int, token_counts: list[int],
              seq: int) -> None:
    """stats, preview and eval with --sequential at each token count: wall time, peak memory and the ratio to the
    lower bound of the passes each step makes (preview: the original's and the plan's perplexity)."""
    m = machine(model_dir)
    print(f"\nthis machine: cold read {m['read_bytes_per_s'] / 1e6:.0f} MB/s, write {m['write_bytes_per_s'] / 1e6:.0f} "
          f"MB/s (fsynced); matrix products "
          f"{m['fp32_flop_per_s'] / 1e9:.0f} GFLOP/s in float32, {m['bf16_flop_per_s'] / 1e9:.0f} GFLOP/s in bf16 "
          f"(bf16 instructions: {'yes' if m['compute'] == 'bf16' else 'no'}, so a bf16 checkpoint computes in "
          f"{m['compute']})")
    start = fixed_cost(work, shape, seq)
    print(f"process start: {start:.1f}s (the same `stats` command on a 1-layer model of this family at a tiny width: "
          "imports, tokenizer, the text's tokenisation, the statistics file; nothing that grows with the model)")
    print("\n| tokens (in total) | step | wall s | lower bound s | (wall - start) / bound | peak anonymous GiB | "
          "of the model |")
    print("|---|---|---|---|---|---|---|")
    plan = work / "plan-seq.json"
    for tokens in token_counts:
        b = bounds(shape, layers, tokens, stored, m)
        common = ["--sequential", "--data", "demo", "--block-len", str(seq),
                  "--max-tokens", str(max(1, tokens // 4)), "--batch-size", "8"]
        st = work / f"stats-{tokens}.npz"  # JSON of 16 x 64 experts' [E, H] sums is ~170 MB of text
        drop_cache(model_dir)
        rows = [("stats", run("stats", ["stats", str(model_dir), *common, "--out", str(st), "--overwrite"]),
                 b["stats"])]
        from explorer.stats import RouterStats

        real = RouterStats.load_file(st).info["tokens"]
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
            print(f"| {real:,} | {name} | {r['wall_s']:.1f} | {bound:.1f} | {(r['wall_s'] - start) / bound:.2f} | "
                  f"{r['peak_anon'] / 2**30:.2f} | {r['peak_anon'] / stored:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="olmoe-1b-7b")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the published count)")
    ap.add_argument("--max-memory", default="cpu=5GiB")
    ap.add_argument("--tokens", type=int, default=1024, help="calibration / evaluation tokens")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--workdir", default=None, help="where the checkpoint goes (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--sequential", action="store_true", help="the layer-by-layer engine (no device map): stats, "
                    "preview and eval at 1,024 and 4,096 calibration tokens in total, against their lower bounds")
    a = ap.parse_args()
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

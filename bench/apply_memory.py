"""Out-of-core apply against the in-memory apply on a synthetic MoE of about 2 GB on disk, one run.

Builds a Qwen3-MoE-config model with random bf16 weights in several shards, then applies a 25% expert drop twice,
each in a fresh process: out of core (``apply --out-of-core``: the shards are edited, the model never loaded) and in
memory (load, apply_plan, export). Prints wall time and peak memory (RSS) of each; the peak the apply itself
added (over the process after its imports) divided by the model size is the figure to watch (goal <= 0.25).
  python bench/apply_memory.py [--gb 2] [--keep]
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import torch, transformers  # imports first: the figure is what the apply adds on top
from explorer.apply import apply_plan, export
from explorer.checkpoint import apply_checkpoint
from explorer.loading import load_model
from explorer.plan import Plan
def rss():  # the high-water mark of this process's resident memory (VmHWM; ru_maxrss survives exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
src, plan_path, out, mode = sys.argv[2:6]
plan = Plan.load(plan_path)
base = rss()
t = time.perf_counter()
if mode == "out-of-core":
    apply_checkpoint(src, plan, out)
else:
    model, tok, view = load_model(src, device="cpu", dtype="auto", with_tokenizer=False)
    new, _, layout = apply_plan(model, view, plan)
    export(new, None, plan, out, layout=layout)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss": rss(), "base_rss": base}))
"""


def build(folder: Path, gb: float) -> int:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    layers = max(2, round(24 * gb / 2))
    cfg = Qwen3MoeConfig(hidden_size=1024, intermediate_size=2816, moe_intermediate_size=256, num_experts=64,
                         num_experts_per_tok=8, num_hidden_layers=layers, num_attention_heads=16,
                         num_key_value_heads=4, head_dim=64, vocab_size=32000, decoder_sparse_step=1,
                         mlp_only_layers=[], tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(folder, max_shard_size="400MB")
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run(mode: str, src: Path, plan: Path, out: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(src), str(plan), str(out), mode],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.0, help="approximate size on disk of the synthetic model")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--build", default=None, help=argparse.SUPPRESS)  # internal: build the model in a child
    args = ap.parse_args()
    if args.build:
        build(Path(args.build), args.gb)
        return
    work = Path(tempfile.mkdtemp(prefix="apply-memory-"))
    try:
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build", str(work / "model"), "--gb", str(args.gb)], check=True)
        size = sum(f.stat().st_size for f in (work / "model").glob("*.safetensors"))
        n_shards = len(list((work / "model").glob("*.safetensors")))
        print(f"synthetic Qwen3-MoE: {size / 2**30:.2f} GiB in {n_shards} shards, built in {time.perf_counter() - t:.0f}s")
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(work / "model")
        E, L = cfg.num_experts, cfg.num_hidden_layers
        plan = {"drop_experts": {str(i): list(range(0, E, 4)) for i in range(L)}}  # 25% of every layer
        (work / "plan.json").write_text(json.dumps(plan))
        res = {m: run(m, work / "model", work / "plan.json", work / f"out-{m}") for m in ("out-of-core", "in-memory")}
        for m, r in res.items():
            added = r["peak_rss"] - r["base_rss"]
            print(f"{m:12s} {r['seconds']:7.1f}s  peak RSS {r['peak_rss'] / 2**30:.2f} GiB (after imports "
                  f"{r['base_rss'] / 2**30:.2f} GiB; added {added / 2**30:.2f} GiB = {added / size:.2f} x model)")
        o, i = res["out-of-core"], res["in-memory"]
        print(f"time out-of-core / in-memory: {o['seconds'] / i['seconds']:.2f}")
        print(f"ratio (peak RSS added by the out-of-core apply / model size): "
              f"{(o['peak_rss'] - o['base_rss']) / size:.3f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

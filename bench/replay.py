"""Prototype a cut on the demo model, replay its recipe on a bigger model, end to end, with the CLI's own commands.

  python bench/replay.py                       # the target is a synthetic Mixtral 8 layers x 16 experts (random)
  python bench/replay.py --target /path/to/your/model --max-memory "0=70GiB,cpu=200GiB" --data my_text/

Steps (each printed as the command a user would type):
  1. statistics and a 25% REAP drop plan on the demo model (the prototype; its plan carries the recipe);
  2. statistics on the target, loaded with a device map (weights spread over GPUs and CPU; a --max-memory that
     cannot hold the model runs it layer by layer instead, each weight read once per pass);
  3. the recipe replayed on the target's own statistics (`plan --recipe`);
  4. the what-if perplexity of that plan on the device-mapped target (`preview`);
  5. the plan applied to the target's checkpoint out of core (`apply --out-of-core`: the model is never loaded);
  6. the exported model evaluated: its perplexity equals the preview's.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from explorer.cli import main as cli  # noqa: E402
from explorer.loading import DEMO_MODEL  # noqa: E402


def run(*args) -> float:
    args = [str(a) for a in args]
    print("\n$ python -m explorer " + " ".join(shlex.quote(a) for a in args), flush=True)
    t = time.perf_counter()
    code = cli(args)
    if code != 0:
        raise SystemExit(f"step failed with exit code {code}")
    return time.perf_counter() - t


def synthetic_target(folder: Path) -> None:
    """A Mixtral twice as deep with twice the experts of the demo, random weights, the demo's tokenizer, 3 shards."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig

    demo = json.loads((DEMO_MODEL / "config.json").read_text())
    cfg = MixtralConfig(vocab_size=demo["vocab_size"], hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=4, num_local_experts=16, num_experts_per_tok=2,
                        max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder, max_shard_size="40MB")
    AutoTokenizer.from_pretrained(DEMO_MODEL).save_pretrained(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=None, help="your model folder (default: a synthetic Mixtral)")
    ap.add_argument("--max-memory", default="cpu=60MB", help="device-map budget for the target (the default is "
                    "smaller than the synthetic model, which then runs layer by layer)")
    ap.add_argument("--data", default="demo", help="calibration/evaluation text for the target")
    ap.add_argument("--max-tokens", default="1024")
    ap.add_argument("--work", default=None, help="folder for the files (default: a temporary one, removed)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="replay-"))
    work.mkdir(parents=True, exist_ok=True)
    small = ["--max-tokens", args.max_tokens, "--block-len", "128"]
    try:
        target = Path(args.target) if args.target else work / "target"
        if not args.target:
            synthetic_target(target)
        mapped = ["--device-map", "auto", "--max-memory", args.max_memory, "--offload-folder", work / "offload"]
        times = {}
        times["prototype statistics"] = run("stats", "demo", *small, "--out", work / "proto-stats.json")
        times["prototype plan"] = run("plan", "demo", "--stats", work / "proto-stats.json", "--drop-experts", "0.25",
                                      "--criterion", "reap", "--out", work / "proto-plan.json")
        times["target statistics (device map)"] = run("stats", target, *mapped, "--data", args.data, *small,
                                                      "--out", work / "target-stats.json")
        times["recipe replayed"] = run("plan", target, *mapped, "--stats", work / "target-stats.json", "--recipe",
                                       work / "proto-plan.json", "--out", work / "target-plan.json")
        times["preview (device map)"] = run("preview", target, work / "target-plan.json", *mapped, "--data",
                                            args.data, *small)
        times["apply out of core"] = run("apply", target, work / "target-plan.json", "--out-of-core",
                                         "--out", work / "target-cut")
        times["evaluate the cut model"] = run("eval", work / "target-cut", "--data", args.data, *small)
        plan = json.loads((work / "target-plan.json").read_text())
        print(f"\nreplayed recipe: {plan['recipe']}")
        print("experts dropped per layer on the target:", {k: len(v) for k, v in plan["drop_experts"].items()})
        for k, v in times.items():
            print(f"  {k:34s} {v:6.1f}s")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Train the bundled demo MoE (assets/demo-moe) from scratch on the four-domain demo corpus.

A Mixtral-family model (4 layers, 8 experts, top-2, load-balancing auxiliary loss) with a byte-level BPE
tokenizer trained on the same corpus. Fixed seed; uses a GPU when there is one. About an hour on 2 CPU cores.

Run:  python assets/build_corpus.py && python assets/train_demo.py
Then: python assets/make_model_card.py   (measures the card's figures from the evaluation split)
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

from explorer.apply import portable_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "build" / "corpus"
OUT = ROOT / "assets" / "demo-moe"
DOMAINS = ("code", "docs", "shakespeare", "bible")


def train_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(TRAIN / d / "train.txt") for d in DOMAINS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=1024)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = train_tokenizer(4096)
    streams = []
    for d in DOMAINS:
        docs = (TRAIN / d / "train.txt").read_text(encoding="utf-8").split("\n\n")
        ids = tok("<|endoftext|>".join(docs))["input_ids"]
        streams.append(torch.tensor(ids, dtype=torch.long))
        print(f"{d}: {len(ids):,} train tokens")

    config = MixtralConfig(
        vocab_size=len(tok), hidden_size=192, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=6, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=1024, router_aux_loss_coef=0.01, output_router_logits=False,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, rms_norm_eps=1e-6, router_jitter_noise=0.0,
    )
    model = MixtralForCausalLM(config).to(device)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters on {device}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    gen = torch.Generator().manual_seed(args.seed)
    per = args.batch // len(streams)
    losses, t0 = [], time.time()
    model.train()
    bar = tqdm(range(args.steps), desc="train", unit="step")
    for step in bar:
        rows = []
        for s in streams:
            starts = torch.randint(0, len(s) - args.seq - 1, (per,), generator=gen)
            rows += [s[i:i + args.seq] for i in starts.tolist()]
        x = torch.stack(rows).to(device)
        out = model(input_ids=x, labels=x, output_router_logits=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(out.loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}",
                            tok_s=f"{(step + 1) * x.numel() / (time.time() - t0):.0f}")
    model.eval()
    model.config.output_router_logits = False
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    portable_tokenizer(args.out)  # a class name transformers 4 (llama.cpp's converter) reads too
    log = {"steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr, "seed": args.seed,
           "tokens": args.steps * args.batch * args.seq, "seconds": round(time.time() - t0, 1), "device": device,
           "loss": [round(v, 4) for v in losses]}
    (args.out / "training_log.json").write_text(json.dumps(log))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        k = 20
        sm = [sum(losses[max(0, i - k):i + 1]) / len(losses[max(0, i - k):i + 1]) for i in range(len(losses))]
        plt.figure(figsize=(6, 3.2))
        plt.plot(losses, alpha=0.3, label="loss (LM + aux)")
        plt.plot(sm, label=f"moving mean ({k})")
        plt.xlabel("step"); plt.ylabel("loss"); plt.legend(); plt.tight_layout()
        plt.savefig(args.out / "loss_curve.png", dpi=100)
    except ImportError:
        print("matplotlib not installed: loss curve image skipped (the numbers are in training_log.json)")
    print(f"saved to {args.out} in {time.time() - t0:.0f}s; final loss {sum(losses[-50:]) / len(losses[-50:]):.3f}")


if __name__ == "__main__":
    main()

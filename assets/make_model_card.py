"""Measure the demo model on the evaluation split and write its model card (assets/demo-moe/README.md, card.json,
domain_expert_load.png). Everything in the card is computed here, from the shipped evaluation split.

Run:  python assets/make_model_card.py
"""
from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from explorer import collect_stats, load_data, load_model, perplexity  # noqa: E402
from explorer.data import CORPUS  # noqa: E402

OUT = ROOT / "assets" / "demo-moe"
BLOCK = 256


def jsd(dists: np.ndarray) -> float:
    """Generalised Jensen-Shannon divergence (nats) of the rows of ``dists`` with equal weights."""
    def h(p):
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())
    return h(dists.mean(0)) - float(np.mean([h(d) for d in dists]))


def unigram_ppl(tok, blocks, domains_train: dict[str, str]) -> dict:
    """Add-one unigram model from the training split, scored on exactly the tokens perplexity scores."""
    counts = Counter()
    for text in domains_train.values():
        counts.update(tok(text)["input_ids"])
    V = len(tok)
    total = sum(counts.values()) + V
    logp = np.log(np.array([counts.get(i, 0) + 1 for i in range(V)]) / total)
    out = {}
    for d, name in enumerate(blocks.domains + ["all"]):
        rows = range(len(blocks)) if name == "all" else (blocks.domain == d).nonzero().flatten().tolist()
        nll, n = 0.0, 0
        for r in rows:
            ids = blocks.input_ids[r, 1: int(blocks.lengths[r])].numpy()
            nll -= logp[ids].sum()
            n += len(ids)
        out[name] = math.exp(nll / n)
    return out


def main() -> None:
    torch.manual_seed(0)
    model, tok, view = load_model(OUT, device="cpu")
    data = load_data(tok, "demo", block_len=BLOCK)
    ev = data.eval
    res = perplexity(model, ev)
    train_dir = ROOT / "build" / "corpus"
    source = "train" if train_dir.exists() else "calib"
    texts = {d: (train_dir / d / "train.txt").read_text() if source == "train" else (CORPUS / d / "calib.txt").read_text()
             for d in ev.domains}
    uni = unigram_ppl(tok, ev, texts)
    stats = collect_stats(model, view, ev)
    E, k = view.num_experts[0], view.top_k
    layers = []
    for i in range(len(view)):
        dl = stats.domain_load(i)  # rows: domains, share of routing slots; uniform = 1/E (= k/E of tokens)
        ratio = dl * E
        d_max, e_max = np.unravel_index(np.argmax(ratio), ratio.shape)
        layers.append({"jsd": jsd(dl), "max_ratio": float(ratio.max()), "max_domain": ev.domains[d_max],
                       "max_expert": int(e_max), "ratio": ratio.round(3).tolist(), "balance": stats.balance(i)})
    log = json.loads((OUT / "training_log.json").read_text())
    card = {
        "eval": {"ppl": res.ppl, "bpb": res.bpb, "tokens": res.tokens, "block_len": BLOCK, "blocks": res.blocks,
                 "per_domain": res.per_domain},
        "unigram": uni, "unigram_source": source,
        "specialisation": layers, "domains": ev.domains, "experts": E, "top_k": k,
        "params": sum(p.numel() for p in model.parameters()), "training": {k_: v for k_, v in log.items() if k_ != "loss"},
    }
    (OUT / "card.json").write_text(json.dumps(card, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 2.8), sharey=True)
        for i, (ax, lay) in enumerate(zip(np.atleast_1d(axes), layers)):
            im = ax.imshow(np.array(lay["ratio"]), cmap="magma", vmin=0, vmax=max(2.5, max(l["max_ratio"] for l in layers)))
            ax.set_title(f"layer {i}  JSD {lay['jsd']:.3f}")
            ax.set_xticks(range(E))
            ax.set_xlabel("expert")
            ax.set_yticks(range(len(ev.domains)), ev.domains)
        fig.colorbar(im, ax=axes, label="load / uniform share (k/E)")
        fig.savefig(OUT / "domain_expert_load.png", dpi=90, bbox_inches="tight")
    except ImportError:
        print("matplotlib not installed: heatmap image skipped")
    rows = "\n".join(f"| {d} | {v['ppl']:.2f} | {uni[d]:.1f} | {v['ppl'] / uni[d]:.3f} | {v['bpb']:.3f} | {v['tokens']:,} |"
                     for d, v in res.per_domain.items())
    spec = "\n".join(f"| {i} | {l['jsd']:.3f} | {l['max_ratio']:.2f}x | expert {l['max_expert']} on {l['max_domain']} |"
                     f" {l['balance']['cv']:.2f} |" for i, l in enumerate(layers))
    t = card["training"]
    (OUT / "README.md").write_text(f"""# demo-moe: the explorer's bundled MoE

A {card['params'] / 1e6:.1f}M-parameter Mixtral-family model ({len(view)} layers, {E} experts per layer, top-{k}
routing, load-balancing auxiliary loss 0.01, hidden 192, vocabulary {len(tok)}, byte-level BPE trained on the same
corpus), trained from scratch by `assets/train_demo.py` (seed {t['seed']}, {t['steps']} steps of {t['batch']}x{t['seq']}
tokens = {t['tokens']:,} tokens, {t['seconds'] / 60:.0f} min on {t['device']}) on four domains of real text: Python standard
library source (`code`), Python documentation (`docs`), Shakespeare (`shakespeare`) and the King James Bible
(`bible`); see `../corpus/DATA_CARD.md`. Load it offline with plain transformers:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("assets/demo-moe"); tok = AutoTokenizer.from_pretrained("assets/demo-moe")
```

## Perplexity on the evaluation split

Blocks of {BLOCK} tokens, {res.tokens:,} scored tokens in all; perplexity {res.ppl:.2f}, {res.bpb:.3f} bits per byte.
The unigram baseline is an add-one unigram model fitted on the {source} split, scored on the same tokens.

| domain | perplexity | unigram | ratio | bits/byte | tokens |
|---|---|---|---|---|---|
{rows}
| all | {res.ppl:.2f} | {uni['all']:.1f} | {res.ppl / uni['all']:.3f} | {res.bpb:.3f} | {res.tokens:,} |

## Do experts specialise by domain?

Per layer: the Jensen-Shannon divergence (nats; 0 = every domain uses the experts alike, ln 4 = 1.386 at most) between
the four domains' expert-load distributions, and the largest share of one domain's routing slots that one expert
gets, as a multiple of the uniform share k/E.

| layer | JSD | max load / uniform | where | load CV |
|---|---|---|---|---|
{spec}

![domain x expert load](domain_expert_load.png)

![training loss](loss_curve.png)

Reproduce: `python assets/build_corpus.py && python assets/train_demo.py && python assets/make_model_card.py`.
""")
    print(f"ppl {res.ppl:.3f} (unigram {uni['all']:.1f}); max specialisation {max(l['max_ratio'] for l in layers):.2f}x")


if __name__ == "__main__":
    main()

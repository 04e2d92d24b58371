"""Error-compensating rounding (GPTQ) and pruning (SparseGPT) of one weight matrix, given its input Hessian.

Both walk the input columns in order; each column's error (rounding it, or zeroing some of its weights) is spread
over the columns not yet done, in proportion to the inverse Hessian, so the layer's output on the calibration
inputs moves as little as it can (Optimal Brain Surgeon, made column-sequential). The inverse Hessian's upper
Cholesky factor gives every update at once (Frantar et al., GPTQ, 2023; SparseGPT, 2023). ``W`` is [out, in],
``H = Σ x xᵀ`` over the calibration inputs [in, in].

GPTQ here keeps the explorer's grid: symmetric, group-wise along the input, the scale of a group taken (and rounded
to 16 bits, as the export stores it) when the walk reaches the group's first column, from the weights as updated so
far; so its export is the same compressed-tensors ``pack-quantized`` format as round-to-nearest.
"""
from __future__ import annotations

import torch

MIN_TOKENS = 16  # an expert routed fewer calibration tokens is rounded to nearest (its Hessian says too little)
DAMP = 0.01  # dampening, as a share of the mean diagonal of H (GPTQ's and SparseGPT's default)
BLOCK = 128  # columns updated together (lazy batch updates); the result does not depend on it


def _inverse_factor(H: torch.Tensor, W: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of (H + λI)⁻¹. Dead inputs (zero on every calibration token) get a unit diagonal:
    their weights are rounded or pruned by magnitude alone and kept, not zeroed as the papers' code does, since
    other text may use them (an expert no calibration token reached is rounded to nearest, or pruned by
    magnitude)."""
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    lam = damp * torch.mean(torch.diag(H))
    H += lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True).to(W.dtype)


def gptq(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, damp: float = DAMP,
         block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantised weights [out, in], scales [out, groups]) of GPTQ on ``W`` with integer ``bits``."""
    W = W.detach().float().clone()
    rows, cols = W.shape
    U = _inverse_factor(H.to(W.device), W, damp)
    Q = torch.zeros_like(W)
    n_groups = -(-cols // group_size)
    scales = torch.ones(rows, n_groups, dtype=torch.float32, device=W.device)
    qmax, qmin, half = 2 ** (bits - 1) - 1, -(2 ** (bits - 1)), (2 ** bits - 1) / 2
    block = group_size * max(1, block // group_size)  # a group never straddles two blocks: its scale sees updates
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            c = i1 + i
            if c % group_size == 0:  # the group's scale from its weights as updated so far
                g = c // group_size
                amax = W1[:, i:i + group_size].abs().amax(1)
                s = torch.where(amax > 0, amax / half, torch.ones_like(amax)).to(torch.bfloat16).float()
                scales[:, g] = s
            s = scales[:, c // group_size]
            w = W1[:, i]
            q = torch.clamp(torch.round(w / s), qmin, qmax) * s
            Q[:, c] = q
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return Q, scales


def sparsegpt(W: torch.Tensor, H: torch.Tensor, sparsity: float, nm=None, damp: float = DAMP,
              block: int = BLOCK) -> torch.Tensor:
    """``W`` [out, in] with weights zeroed by SparseGPT and the rest updated to compensate: unstructured, each row
    keeps the same count in every block of ``block`` columns (``round(width · sparsity)`` zeroed, chosen where
    ``w² / [H⁻¹]²_ii`` is smallest, adaptively as the walk goes); or N:M (``nm=(n, m)``: ``m - n`` of every ``m``)."""
    W = W.detach().float().clone()
    rows, cols = W.shape
    U = _inverse_factor(H.to(W.device), W, damp)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        d = torch.diag(U1)
        Err1 = torch.zeros_like(W1)
        mask = torch.zeros_like(W1, dtype=torch.bool)  # True: zeroed
        if nm is None:
            k = int(round((i2 - i1) * sparsity))
            if k:
                score = W1 ** 2 / d[None, :] ** 2
                mask.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0 and i + nm[1] <= i2 - i1:
                n, m = int(nm[0]), int(nm[1])
                score = W1[:, i:i + m] ** 2 / d[None, i:i + m] ** 2
                mask[:, i:i + m].scatter_(1, torch.topk(score, m - n, dim=1, largest=False).indices, True)
            w = W1[:, i]
            q = torch.where(mask[:, i], torch.zeros_like(w), w)
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W


def pruned_per_row(width: int, sparsity: float, nm=None, block: int = BLOCK) -> int:
    """Weights SparseGPT zeroes in one row of ``width`` inputs."""
    if nm is not None:
        n, m = int(nm[0]), int(nm[1])
        return sum((min(i1 + block, width) - i1) // m * (m - n) for i1 in range(0, width, block))
    return sum(int(round((min(i1 + block, width) - i1) * sparsity)) for i1 in range(0, width, block))

"""The paper's two proxies of how signal reaches the sink (Appendix E), and their parallel counterparts, exact and
batched. The epsilon-mixing time its theory bounds (Theorem 2.9) and the walks live in walks.py.

Input: one layer's attention (H, T, T) or a batch (..., H, T, T), NumPy or torch (any device); rows are queries,
so every matrix is row-stochastic. A (T, T) matrix is read as one head. The heads are combined as
C = sum_h w_h A_h with w the head weights normalised to sum 1 (uniform when None); weights are (H,) or (..., H).
Each function returns a float for one layer, else a float64 NumPy array of the batch shape. Maths runs in float64
on the input's device.

    import proxies
    w = proxies.head_weights(model.layers[0].attn)        # learned weights: norms of the output projection
    proxies.minimax_fidelity(attn, w)                      # percent
    proxies.mixing_time(attn, w)                           # exact expectation of the authors' Monte Carlo walk
    proxies.mixing_time_mc(attn, w, num_simulations=500)   # the authors' Monte Carlo procedure, vectorised
    proxies.mixing_time_normalized(attn, w)                # principled walk: columns renormalised, no quirks
    proxies.parallel_minimax_fidelity(attn, w)             # the heads as parallel channels: no path switches heads
    proxies.head_set_fidelities(attn, w)                   # each head's, the combination's and the parallel one at once
    proxies.parallel_mixing_time(attn, w)                  # a walk that draws one head, then stays on it
    proxies.converged_minimax_fidelity(diffusion)          # the fidelity at an unlimited horizon, certified

The authors' walk (their code's mixing-time estimate): from position c the walk reads column c of C (how much each
later query attends to c) as a cumulative distribution, clipped at 1, and sends any deficit to the sink. Two quirks
follow and are reproduced by default because the published numbers depend on them: a column's mass above 1 is cut
off, and since A[0, 0] = 1 in every causal head, a walk started at position 0 never moves and scores max_steps.
"""
import math
import threading
import warnings
from contextlib import contextmanager
from functools import cache
from typing import List

import numpy as np
import torch

ROW_SUM_TOLERANCE = 1e-4  # float32 softmax rows sum to 1 within ~1e-6 at T = 100
CPU_CHUNK = 16  # matrices per chunk on the CPU: small enough that a chunk stays in cache through all the steps
STEP_BLOCK = 128  # a causal matrix of more rows is stepped in column blocks of this width (CausalSteps)


def head_weights(attn_module):
    """Learned head weights: L2 norm of each head's (E, d) block of the output projection, normalised to sum 1."""
    weight = attn_module.out_proj.weight.detach().double()  # (E_out, E_in), input features grouped by head
    E, H = weight.shape[0], attn_module.num_heads
    norms = weight.reshape(E, H, -1).square().sum(dim=(0, 2)).sqrt()
    return (norms / norms.sum()).cpu().numpy()


def model_head_weights(model):
    """head_weights of every layer of a Transformer: (L, H)."""
    return np.stack([head_weights(layer.attn) for layer in model.layers])


_LAYER = threading.local()  # .trusted: (_layer_key, T, whether zero above its diagonal blocks, _band_ends, {} for its
# heads' column blocks once built) of the layer within trusted_layer in this thread (study_values studies two layers
# at once, each in a thread of its own)


def _trusted(T=None):
    """The layer trusted in this thread (_LAYER.trusted), if any, and of T tokens where T is given; else None."""
    layer = getattr(_LAYER, "trusted", None)
    return layer if layer is not None and T in (None, layer[1]) else None


def _layer_key(attn):
    """What identifies a checked layer's rows: its memory, its rows' shape and strides, its element count and its
    version (bumped by every in-place change); a view of all of it with the same rows (attn[..., None, :, :]) has
    the same key, a transposed or partial one another."""
    return attn.data_ptr(), tuple(attn.shape[-2:]), attn.stride()[-2:], attn.numel(), attn._version


@contextmanager
def trusted_layer(attn):
    """Within it, check_layer takes attn (float64, as check_layer returns it) and any view of all of it with the same
    rows as checked, without reading them again: one layer's studies check their attention once, not once per
    proxy. And every T x T matrix stepped in blocks (CausalSteps, _walk_steps) is taken to be zero where all the
    layer's heads are, as every matrix the studies derive from them is (their combination, their walks; the authors'
    walk but for its column to the sink, which no stepped row reads): whether they are zero above their diagonal
    blocks, and where their bands end, is read once from the attention, not from each; the heads' own column blocks
    are copied once (shared_blocks), for every study that steps them or builds their walks. Yields the checked
    attention."""
    attn = check_layer(attn)
    T, outer = attn.shape[-1], _trusted()
    heads, _LAYER.trusted = attn.reshape(-1, 1, T, T), None  # read from this layer's heads themselves
    causal = T > STEP_BLOCK and zero_above_diagonal_blocks(heads[:, 0])
    _LAYER.trusted = (_layer_key(attn), T, causal, _band_ends([heads]) if causal else None, {})
    try:
        yield attn
    finally:
        _LAYER.trusted = outer


def check_layer(attn):
    """The attention as a float64 tensor (..., H, T, T), or a ValueError that says what is wrong (not read again
    within trusted_layer)."""
    if isinstance(attn, np.ndarray):
        attn = torch.from_numpy(attn)
    elif not isinstance(attn, torch.Tensor):
        raise ValueError(f"attention must be a NumPy array or a torch tensor, got {type(attn).__name__}")
    attn = attn.detach()
    if not (attn.is_floating_point() and attn.ndim >= 2 and attn.shape[-1] == attn.shape[-2]):
        raise ValueError(f"attention must be a float array (..., H, T, T) of square T x T matrices, "
                         f"got shape {tuple(attn.shape)} of {attn.dtype}")
    if attn.ndim == 2:
        attn = attn[None]
    attn = attn.to(torch.float64)
    layer = _trusted()
    if layer is not None and _layer_key(attn) == layer[0]:
        return attn
    row_sums = attn.sum(-1)  # any NaN or inf shows in its row's sum
    if not torch.isfinite(row_sums).all():
        raise ValueError("attention contains NaN or infinite entries")
    if attn.numel() and attn.amin().item() < -ROW_SUM_TOLERANCE:
        raise ValueError(f"attention has negative entries (min {attn.amin().item():.3g})")
    worst = (row_sums - 1).abs().max().item() if row_sums.numel() else 0.0
    if worst > ROW_SUM_TOLERANCE:
        raise ValueError(f"attention rows must sum to 1 (row-stochastic, rows = queries); "
                         f"worst row is off by {worst:.3g} (tolerance {ROW_SUM_TOLERANCE})")
    return attn


def check_weights(head_weights, attn):
    """Head weights as a float64 tensor broadcastable to attn's (..., H), normalised to sum 1."""
    H = attn.shape[-3]
    if head_weights is None:
        return torch.full((H,), 1.0 / H, dtype=torch.float64, device=attn.device)
    w = torch.as_tensor(np.asarray(head_weights) if not isinstance(head_weights, torch.Tensor) else head_weights)
    w = w.detach().to(device=attn.device, dtype=torch.float64)
    if w.ndim == 0 or w.shape[-1] != H:
        raise ValueError(f"head_weights must have one weight per head: expected last dimension {H}, "
                         f"got shape {tuple(w.shape)}")
    try:
        torch.broadcast_shapes(w.shape, attn.shape[:-2])
    except RuntimeError:
        raise ValueError(f"head_weights of shape {tuple(w.shape)} do not broadcast to the batch of heads "
                         f"{tuple(attn.shape[:-2])}") from None
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"head_weights must be finite and non-negative, got {w.cpu().numpy()}")
    total = w.sum(-1, keepdim=True)
    if (total <= 0).any():
        raise ValueError("head_weights must not all be zero")
    return w / total


def combine_heads(attn, head_weights=None):
    """The multi-head diffusion matrix C = sum_h w_h A_h, float64 (..., T, T); validates both inputs."""
    attn = check_layer(attn)
    return weighted_sum(check_weights(head_weights, attn), attn)


def weighted_sum(w, matrices):
    """sum_h w_h M_h of checked weights (..., H) and matrices (..., H, T, T)."""
    if matrices.shape[-3] == 1:
        return matrices[..., 0, :, :]
    T = matrices.shape[-1]
    w = w.expand(*matrices.shape[:-2])[..., None, :]  # (..., 1, H)
    return (w @ matrices.flatten(-2)).reshape(*matrices.shape[:-3], T, T)  # one matmul, no (..., H, T, T) temporary


def _over_chunks(fn, C, *aligned, item_dims=2):
    """fn applied to chunks of a batch C (..., *item) of items of `item_dims` dims ((T, T) matrices by default, about
    CPU_CHUNK matrices a chunk on the CPU), with the same rows of each `aligned` tensor (..., *rest); results
    reshaped back to the batch shape."""
    batch_shape, item = C.shape[:-item_dims], C.shape[-item_dims:]
    flat = C.reshape(-1, *item)
    rows = [a.reshape(len(flat), *a.shape[len(batch_shape):]) for a in aligned]
    size = len(flat) if flat.is_cuda else max(1, CPU_CHUNK // math.prod(item[:-2]))
    out = (torch.cat([fn(flat[i:i + size], *(r[i:i + size] for r in rows)) for i in range(0, len(flat), size)])
           if len(flat) else fn(flat, *rows))
    return out.reshape((*batch_shape, *out.shape[1:]))


def zero_above_diagonal_blocks(M):
    """Whether every matrix of M (B, T, T) is zero above its diagonal blocks of STEP_BLOCK x STEP_BLOCK, as every
    causal one is: what CausalSteps and _walk_steps keep their column blocks on (the layer's, within trusted_layer)."""
    layer = _trusted(M.shape[-1])
    if layer is not None:
        return layer[2]
    b = STEP_BLOCK
    return not any(bool(M[:, :j, j:j + b].any()) for j in range(b, M.shape[-1], b))


def _band_ends(parts):
    """Per column block j of CausalSteps (columns j..j+b-1): how many of its rows, from row j down, hold a non-zero in
    some matrix of parts (N, k, T, T). T - j in the last block and in a full causal matrix, whose last row (the
    sink's query) reads every key, found from that row alone; fewer in a sliding-window layer, where query i reads
    keys i - W < j <= i only: its zeros below the band (a sixth of Gemma 3's at 1,024 tokens) are then neither copied
    nor read."""
    T, ends, layer = parts[0].shape[-1], [], _trusted(parts[0].shape[-1])
    if layer is not None and layer[3] is not None:
        return layer[3]  # the layer's, within trusted_layer
    for j in range(0, T, STEP_BLOCK):
        if j + STEP_BLOCK >= T or any(bool(part[..., -1, j:j + STEP_BLOCK].any()) for part in parts):
            ends.append(T - j)
            continue
        rows = torch.stack([part[..., j:, j:j + STEP_BLOCK].any(-1).flatten(0, -2).any(0) for part in parts]).any(0)
        ends.append(int(rows.nonzero().max()) + 1 if rows.any() else 1)
    return ends


TRANSPOSE_ROWS = 32  # a transposing copy goes this many source rows at a time (_copy_transposed)


def _copy_transposed(destination, source):
    """destination (..., b, e) <- source (..., e, b) transposed, TRANSPOSE_ROWS of source's rows at a time: each
    tile's reads and writes stay in cache, about twice as fast as one transposing copy of the whole block (a
    layer's column blocks at 1,024 tokens). The same values, copied. Returns destination."""
    for i in range(0, source.shape[-2], TRANSPOSE_ROWS):
        destination[..., i:i + TRANSPOSE_ROWS] = source[..., i:i + TRANSPOSE_ROWS, :].transpose(-1, -2)
    return destination


def column_blocks(parts, shared=True):
    """CausalSteps' column blocks (block j: M[j:j+e, j:j+b]^T, contiguous, e from _band_ends) of the matrices of
    parts (N, k, T, T) joined along dim 1: (N * K, b, e) each, K the sum of the parts' k, each part copied once (from
    its shared_blocks where it has them, a plain copy; with shared=False never)."""
    N, T, K = len(parts[0]), parts[0].shape[-1], sum(part.shape[1] for part in parts)
    sources = [shared_blocks(part) if shared else None for part in parts]
    blocks = []
    for n, (j, end) in enumerate(zip(range(0, T, STEP_BLOCK), _band_ends(parts))):
        block = parts[0].new_empty(N, K, min(STEP_BLOCK, T - j), end)
        first = 0
        for part, source in zip(parts, sources):
            k = part.shape[1]
            if source is not None:
                block[:, first:first + k] = source[n].reshape(N, k, *source[n].shape[1:])
            else:
                _copy_transposed(block[:, first:first + k], part[..., j:j + end, j:j + STEP_BLOCK])
            first += k
        blocks.append(block.flatten(0, 1))
    return blocks


def shared_blocks(part):
    """The column blocks (column_blocks) of part (N, k, T, T) where it is all of the heads of the layer trusted in
    this thread, in their order (a contiguous view of it: _layer_key's, with the same rows): copied once a layer and
    shared by every study that steps the heads or builds their walks, so they are only read, never written. Else
    None."""
    layer = _trusted(part.shape[-1])
    if layer is None or not layer[2] or not part.is_contiguous() or _layer_key(part) != layer[0]:
        return None
    if "heads" not in layer[4]:
        layer[4]["heads"] = column_blocks([part], shared=False)
    return layer[4]["heads"]


def read_only_blocks(part):
    """column_blocks([part]) of part (N, k, T, T), not to be written: its shared_blocks where it has them."""
    shared = shared_blocks(part)
    return shared if shared is not None else column_blocks([part])


class CausalSteps:
    """r -> r M for a batch of matrices M (B, T, T) and rows r (B, k, T), the one product every stepped proxy and
    walk repeats up to a hundred times (and more) on the same M. Where T > STEP_BLOCK = b and every M is zero above
    its diagonal blocks of b x b (as every causal M is: attention, its walks, the authors' transposed walk), M is
    kept as its column blocks from the diagonal down, each transposed and contiguous (block j: M[j:, j:j+b]^T), and
    r M is [M[j:, j:j+b]^T r[j:]^T]^T block by block: the zeros above them (about half of a long M) are never read,
    and a matrix times a vector reads its matrix faster than a vector times a matrix; a block ends at the last row
    with a non-zero (_band_ends: a sliding-window layer's band). The sums then run in another order (within 1e-15
    relative of r @ M). Otherwise, r @ M itself, as before (the toy models' T = 100). steps[keep] is the steps of a
    subset of the batch (a walk set aside); CausalSteps.joined those of several batches side by side."""

    def __init__(self, M=None, blocks=None):
        """M (B, T, T), or its blocks where the caller has them (__getitem__)."""
        if blocks is None and M.shape[-1] > STEP_BLOCK and zero_above_diagonal_blocks(M):
            blocks = read_only_blocks(M[:, None])  # CausalSteps never writes its blocks
        self.M, self.blocks = (M, None) if blocks is None else (None, blocks)  # what __call__ reads

    @classmethod
    def joined(cls, *parts):
        """The steps of torch.cat(parts, dim=1) flattened to (N * K, T, T), parts (N, k, T, T) with K the sum of their
        k (a batch of heads and their combination), without that concatenation: each block copied once, from its
        part."""
        T = parts[0].shape[-1]
        if T > STEP_BLOCK and all(zero_above_diagonal_blocks(part.reshape(-1, T, T)) for part in parts):
            return cls(blocks=column_blocks(parts))
        return cls(torch.cat(parts, dim=1).flatten(0, 1))

    def __call__(self, r):
        if self.blocks is None:
            return r @ self.M
        return _scripted_blocked_product()(self.blocks, r, STEP_BLOCK)

    def __getitem__(self, keep):
        if self.blocks is None:
            return CausalSteps(self.M[keep])
        return CausalSteps(blocks=[block[keep] for block in self.blocks])

    def __len__(self):
        return len(self.M if self.blocks is None else self.blocks[0])

    @property
    def device(self):
        return (self.M if self.blocks is None else self.blocks[0]).device


def blocked_product(blocks: List[torch.Tensor], r: torch.Tensor, width: int) -> torch.Tensor:
    """r M (B, k, T) from M's column blocks (CausalSteps; block j begins at row and column j * width)."""
    parts: List[torch.Tensor] = []
    for j, block in enumerate(blocks):
        start = j * width
        parts.append(torch.matmul(block, r[..., start:start + block.shape[-1]].transpose(-1, -2)).transpose(-1, -2))
    return torch.cat(parts, dim=-1)


@cache
def _scripted_blocked_product():
    """blocked_product compiled by TorchScript where this torch has it (deprecated: torch 2.13 warns, silenced
    here): its ops (four a block) then run in C++ without Python's GIL between them, so the two layers that
    lm_analysis.study_values studies at once on two threads no longer hand the GIL to each other at every op of
    every step (docs/pretrained.md). The same ops on the same tensors: the same values. Else blocked_product."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return torch.jit.script(blocked_product)
        except (AttributeError, RuntimeError):  # a torch without TorchScript
            return blocked_product


def to_numpy(x):
    x = x.cpu().numpy()
    return float(x) if x.ndim == 0 else x


def _sink_rows(C, horizon):
    """Row tau of C^t for t = 1..horizon: (N, horizon, T); entry j = share of source j's signal at the sink."""
    row = C[:, -1:, :]
    rows = [row]
    for _ in range(horizon - 1):
        row = row @ C
        rows.append(row)
    return torch.cat(rows, dim=1)


def check_steps(name, value):
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def sink_signal(attn, head_weights=None, horizon=20):
    """(C^t)[tau, j] for t = 1..horizon: array (..., horizon, T), the curves of Figure 3."""
    check_steps("horizon", horizon)
    return to_numpy(_over_chunks(lambda c: _sink_rows(c, horizon), combine_heads(attn, head_weights)))


def per_node_fidelity(attn, head_weights=None, horizon=100):
    """phi_j = max over t = 1..horizon of (C^t)[tau, j], as a fraction: array (..., T)."""
    check_steps("horizon", horizon)
    C = combine_heads(attn, head_weights)
    return to_numpy(_over_chunks(lambda c: _sink_rows(c, horizon).amax(dim=1), C))


def minimax_fidelity(attn, head_weights=None, horizon=100):
    """min over all positions j (the sink included) of phi_j, in percent, as the authors compute it. Stepped only
    until its value is certain (the certificate of head_set_fidelities), so equal to 100 x the minimum of
    per_node_fidelity within 1e-12 relative."""
    check_steps("horizon", horizon)
    C = combine_heads(attn, head_weights)[..., None, :, :]  # (..., 1, T, T): one matrix each
    return 100 * to_numpy(_over_chunks(lambda c: _certified_fidelities(c, None, horizon)[:, 0], C, item_dims=3))


def walk_transition(C, walk="authors"):
    """Row-stochastic transition matrix P[c, k] of the walk on C (..., T, T); the sink row is absorbing.

    walk="authors": S_k = min(C[0, c] + ... + C[k, c], 1); P[c, k] = S_k - S_{k-1} for k < T-1, and the sink gets
    all the rest, so mass above 1 is cut off and a deficit goes to the sink (the quirks named in the module doc).
    walk="normalized": the principled variant, P[c, k] = C[k, c] / sum_i C[i, c], a proper forward distribution.
    """
    # Built transposed, Pt[k, c] = P[c, k], along C's contiguous rows (the same sums in the same order), and returned
    # as a view: the stepped mixing time reads Pt itself, contiguous.
    if walk == "authors":
        Pt = _authors_steps(C.cumsum(dim=-2).clamp_(max=1.0), dim=-2)
    else:
        Pt = C / _column_mass(C, walk).unsqueeze(-2)
    P = Pt.transpose(-1, -2)
    P[..., -1, :] = 0.0
    P[..., -1, -1] = 1.0
    return P


def _authors_steps(S, dim, sink=True):
    """The authors' walk from clipped cumulative sums S along dim (the rows k of each column c, S_k of column c):
    S_0, S_k - S_{k-1}, and, with sink (S's last k is the sink's), 1 - S_{T-2} to the sink."""
    S = S.movedim(dim, -1)
    steps = torch.empty_like(S)
    steps[..., :1] = S[..., :1]
    torch.sub(S[..., 1:], S[..., :-1], out=steps[..., 1:])
    if sink:
        steps[..., -1] = 1.0 - S[..., -2] if S.shape[-1] > 1 else 1.0
    return steps.movedim(-1, dim)


def _column_mass(C, walk):
    """sum_i C[i, c] (..., T), the normalized walk's denominators; ValueError for another walk than the two, or a
    zero column."""
    if walk not in ("authors", "normalized"):
        raise ValueError(f"walk must be 'authors' or 'normalized', got {walk!r}")
    mass = C.sum(dim=-2) if walk == "normalized" else None
    if mass is not None and (mass <= 0).any():
        raise ValueError("walk='normalized' needs every position to receive some attention (a zero column)")
    return mass


def _walk_steps(C, walk):
    """(r -> r P^T as CausalSteps, P's diagonal (B, T)) of the walk on C (B, T, T) (walk_transition), for rows r
    without mass at the sink (r[T - 1] = 0), as the stepped mixing time's. Where CausalSteps keeps column blocks
    (T > STEP_BLOCK, C zero above its diagonal blocks), they are built from C's own: block j, P[j:j+b, j:], needs
    only C[j:, j:j+b] (column c of C from row j down, zero above row c), so the zeros above C's diagonal blocks are
    neither summed nor copied, and P is never held whole; below a sliding window's band (_band_ends) P is zero but
    for its column to the sink, which r never reads. The same sums in the same order as walk_transition, so the
    same bits."""
    b, T = STEP_BLOCK, C.shape[-1]
    if T <= b or not zero_above_diagonal_blocks(C):
        P = walk_transition(C, walk)
        return CausalSteps(P.transpose(-1, -2)), P.diagonal(dim1=-2, dim2=-1)
    mass, blocks, diagonal = _column_mass(C, walk), [], torch.zeros_like(C[:, 0])
    # C's column blocks (B, b, end): [c, k] = C[j + k, j + c]; the layer's shared ones where C is its heads
    for j, column in zip(range(0, T, b), read_only_blocks(C[:, None])):
        end = column.shape[-1]
        blocks.append(_authors_steps(column.cumsum(dim=-1).clamp_(max=1.0), dim=-1, sink=end == T - j)
                      if walk == "authors" else column / mass[:, j:j + b, None])
        diagonal[:, j:j + min(b, end)] = blocks[-1].diagonal(dim1=-2, dim2=-1)  # 0 past a band's end
    blocks[-1][:, -1] = 0.0  # the sink's row: absorbing
    blocks[-1][:, -1, -1] = 1.0
    diagonal[:, -1] = 1.0
    return CausalSteps(blocks=blocks), diagonal


def _expected_capped_steps(C, max_steps, survival=False, walk="authors"):
    """E[min(hitting time of the sink, max_steps)] of the walk on C (B, T, T) (walk_transition) from every start:
    sum_{t<max_steps} P(not yet at the sink), (B, T); with survival, stacked with P(not at the sink after max_steps
    steps) from every start: (B, 2, T).

    With Q the transitions among the non-sink positions, P(H > t | start s) = (Q^t 1)_s, so the answer is
    s_M = sum_{t<M} Q^t 1. Binary doubling over the bits of M (s_2n = s_n + Q^n s_n; s_n+1 = s_n + Q^n 1) needs
    O(log M) matrix products, O(T^3 log M), instead of M dependent mat-vec steps, O(M T^2): the products win while
    M >= T (the paper's T = M = 100), the steps on long sequences (a language model's T = 1024). The sink scores 0.
    """
    if max_steps < C.shape[-1] - 1:
        out = _capped_steps_by_stepping(*_walk_steps(C, walk), max_steps)
        return out if survival else out[:, 0]
    P = walk_transition(C, walk)
    Q = P[:, :-1, :-1].contiguous()
    ones = torch.ones(*Q.shape[:-1], 1, dtype=P.dtype, device=P.device)
    total, power = torch.zeros_like(ones), None  # total = s_n, power = Q^n (None for n = 0)
    bits = bin(max_steps)[2:]
    for k, bit in enumerate(bits):
        # the last bit needs no further power of Q (an n^3 product saved), unless survival asks for Q^M 1
        last = k == len(bits) - 1 and not survival
        if power is not None:  # n -> 2n
            total = total + power @ total
            power = None if last and bit == "0" else power @ power
        if bit == "1":  # n -> n + 1
            total = total + (ones if power is None else power @ ones)
            power = Q if power is None else None if last else power @ Q
    if not survival:
        return _with_sink(total[..., 0])
    return _with_sink(torch.stack([total[..., 0], (power @ ones)[..., 0]], dim=1))  # power = Q^M


def _with_sink(values):
    """Per-start values (..., T - 1) with the sink's 0 appended."""
    return torch.cat([values, torch.zeros_like(values[..., :1])], dim=-1)


CAPPED_RTOL = 1e-10  # the stepped mixing time stops once the steps left add less than this to any start's total
CAPPED_CHECK_EVERY = 8  # steps between two checks of that condition


def _capped_steps_by_stepping(steps, diagonal, max_steps):
    """(B, 2, T): s_M = 1 + Q 1 + ... + Q^(M-1) 1 and Q^M 1 (Q: P without the sink), the sink's 0 included, of the
    walk whose steps r <- r P^T and diagonal (B, T) _walk_steps gives, by row-vector steps (a vector times a matrix
    reads the matrix about twice as fast as a matrix times a vector here; r's sink entry stays 0, since the sink
    moves nowhere, so the sink's row and column drop out). Survival only falls (Q >= 0, rows summing to <= 1), so the
    steps left from t add at most (M - t) r_t: an item may stop once every r_t is below CAPPED_RTOL / M (the rest
    adds less than CAPPED_RTOL to totals >= 1, and its survival, taken as 0, is off by less), except at starts that
    never move (P[c, c] = 1: r stays 1, so they add exactly M - t and survive)."""
    trapped = diagonal == 1.0
    trapped[:, -1] = False  # the sink: r is 0 there throughout
    out = diagonal.new_zeros(len(diagonal), 2, diagonal.shape[-1])
    active = torch.arange(len(diagonal), device=diagonal.device)
    total = diagonal.new_zeros(len(diagonal), 1, diagonal.shape[-1])  # (B, 1, T) rows
    survive = torch.ones_like(total)
    survive[..., -1] = 0.0
    for t in range(max_steps):
        total = total + survive
        survive = steps(survive)
        left = max_steps - t - 1
        if left and (t + 1) % CAPPED_CHECK_EVERY == 0:
            done = ((survive * max_steps <= CAPPED_RTOL) | trapped[:, None]).all(-1)[:, 0]
            # set aside once the steps it saves outweigh the copy of the rest (about 4 steps of every active walk)
            if done.all() or done.sum() * left >= 4 * len(active):
                kept = trapped[done].to(diagonal.dtype)
                out[active[done]] = torch.stack([total[done, 0] + left * kept, kept], dim=1)
                keep = ~done
                active, steps, trapped, total, survive = (active[keep], steps[keep], trapped[keep], total[keep],
                                                          survive[keep])
                if not len(active):
                    return out
    out[active] = torch.cat([total, survive], dim=1)
    return out


def expected_walk_steps(attn, head_weights=None, max_steps=100, walk="authors", survival=False):
    """Exact expected capped steps to the sink from each start position: array (..., T); the sink scores 0. With
    survival, (..., 2, T): those and each start's probability of not reaching the sink within max_steps."""
    check_steps("max_steps", max_steps)
    C = combine_heads(attn, head_weights)
    return to_numpy(_over_chunks(lambda c: _expected_capped_steps(c, max_steps, survival, walk), C))


def mixing_and_capped_share(attn, head_weights=None, max_steps=100, walk="authors"):
    """(mixing time, capped share) from one pass: mixing_time (walk="authors") or mixing_time_normalized, and the
    share of its walks that the cap stops: over all T starts (the sink's included, at 0), the probability of not
    having reached the sink within max_steps steps, which the mixing time scores max_steps. The authors' walk from
    position 0 never moves: 1 there. Two (...) arrays."""
    steps = expected_walk_steps(attn, head_weights, max_steps, walk, survival=True)
    return np.mean(steps[..., 0, :], axis=-1), np.mean(steps[..., 1, :], axis=-1)


def mixing_time(attn, head_weights=None, max_steps=100):
    """The exact value the authors' Monte Carlo mixing time estimates: mean over all T starts of the expected
    capped hitting time of their walk (start 0 is trapped and scores max_steps)."""
    return np.mean(expected_walk_steps(attn, head_weights, max_steps, "authors"), axis=-1)


def mixing_time_normalized(attn, head_weights=None, max_steps=100):
    """Principled variant of mixing_time: each column renormalised into a forward distribution (no cut-off mass,
    no deficit sent to the sink, no trap at position 0); same cap and same average over starts."""
    return np.mean(expected_walk_steps(attn, head_weights, max_steps, "normalized"), axis=-1)


def mixing_time_mc(attn, head_weights=None, num_simulations=500, max_steps=100, seed=0):
    """The authors' Monte Carlo estimate: num_simulations walks from every start, each scored by its steps to the
    sink capped at max_steps; mean over walks, then over starts. Vectorised over walkers and starts (only those
    still walking are stepped), seeded."""
    check_steps("num_simulations", num_simulations)
    check_steps("max_steps", max_steps)
    C = combine_heads(attn, head_weights)
    batch_shape, T = C.shape[:-2], C.shape[-1]
    generator = torch.Generator(device=C.device).manual_seed(seed)
    estimates = []
    for c in C.reshape(-1, T, T):  # one layer at a time: the walkers of a layer already fill the vector units
        cdf = c.T.cumsum(dim=-1).clamp(max=1.0)  # cdf[pos, k] = S_k of the walk's step from pos
        pos = torch.arange(T, device=C.device).repeat_interleave(num_simulations)
        steps = torch.zeros_like(pos)
        walking = (pos != T - 1).nonzero().squeeze(1)  # only walkers not yet at the sink are stepped
        for _ in range(max_steps):
            steps[walking] += 1
            r = torch.rand(walking.shape, generator=generator, dtype=torch.float64, device=C.device)
            # first k with S_k >= r; none before the sink means the sink
            nxt = torch.searchsorted(cdf[pos[walking]], r[:, None]).squeeze(-1).clamp(max=T - 1)
            pos[walking] = nxt
            walking = walking[nxt != T - 1]
        estimates.append(steps.double().mean())
    return to_numpy(torch.stack(estimates).reshape(batch_shape)) if estimates else np.zeros(batch_shape)


def head_average(per_head, head_weights=None):
    """sum_h w_h x_h of per-head values (..., H), with the proxies' head weights (normalised; uniform if None)."""
    x = torch.as_tensor(np.asarray(per_head), dtype=torch.float64)
    w = check_weights(head_weights, x[..., None, None])  # the weights' checks, on a stand-in of shape (..., H, 1, 1)
    return to_numpy((w * x).sum(-1))


def parallel_minimax_fidelity(attn, head_weights=None, horizon=100):
    """The counterfactual in which the heads act as parallel channels and no path switches heads: the share of source
    j at the sink after t steps is sum_h w_h (A_h^t)[tau, j]; phi_j is its maximum over t = 1..horizon, and the value
    is 100 x the minimum over all positions j, the sink included (as minimax_fidelity). One head: the plain proxy."""
    return head_set_fidelities(attn, head_weights, horizon)["parallel"]


def head_set_fidelities(attn, head_weights=None, horizon=100, combined=None):
    """The minimax fidelity (percent) of each head alone, of the combination C = sum_h w_h A_h and of the heads as
    parallel channels, from one pass over each head's sink rows: {"heads": (..., H), "combined": (...),
    "parallel": (...)}, the values of minimax_fidelity(attn[..., None, :, :]), minimax_fidelity(attn, w) and
    parallel_minimax_fidelity(attn, w). An item stops before the horizon once all its values are certain
    (converged_minimax_fidelity's certificate: no later step raises phi_i above the signal that sources >= i still
    have at the sink), so each agrees with the full horizon's within 1e-12 relative. combined: C (..., T, T) where the
    caller has it."""
    check_steps("horizon", horizon)
    attn = check_layer(attn)
    w = check_weights(head_weights, attn).expand(*attn.shape[:-2])  # (..., H)
    H = attn.shape[-3]
    C = weighted_sum(w, attn) if combined is None else combined
    fidelity = 100 * to_numpy(_over_chunks(lambda m, c, v: _certified_fidelities(m, v, horizon, combined=c), attn,
                                            C[..., None, :, :], w, item_dims=3))  # heads, combined, parallel
    return {"heads": fidelity[..., :H], "combined": fidelity[..., H], "parallel": fidelity[..., H + 1]}


CERTIFY_EVERY = 4  # steps between two checks of head_set_fidelities' certificate (a check costs about one step)
CERTIFY_RTOL = 1e-12  # the certificate's bounds meet when they are this close


def _certificate(phi, current):
    """The fidelity certificate from running maxima phi (..., T) and the current sink row (..., T): the minimum of
    phi, a lower bound on the final min_j phi_j, and whether it is certain. The signal that source j or any later
    node has at the sink can only fall (the backward walk never moves up), so max(phi_j, sum_{j' >= j} current_j')
    bounds every later phi_j; the value is certain once the least of these meets the least running maximum."""
    tail = current.flip(-1).cumsum(-1).flip(-1)  # sum over j' >= j
    low, high = phi.amin(-1), torch.maximum(phi, tail).amin(-1)
    return low, high - low <= CERTIFY_RTOL * high


def _certified_fidelities(matrices, w, horizon, combined=None):
    """min_j phi_j of each of matrices (N, M, T, T), then of combined (N, 1, T, T) where given (M + 1 of them, as if
    joined along dim 1), and, where weights w (N, M) are given, of the parallel channels of the M matrices: (N, M + 2)
    (else one fewer of each). Each item is stepped until the horizon or until all its values are certain, then set
    aside."""
    w = None if w is None else w[:, None, :]  # (N, 1, M): the parallel row is w @ the heads' rows
    parts = (matrices,) if combined is None else (matrices, combined)
    rows = torch.cat([part[:, :, -1, :] for part in parts], dim=1)  # (N, M [+ 1], T): row tau of each, t = 1
    N, M, T = rows.shape
    steps = CausalSteps.joined(*parts)
    phi = _with_parallel(rows, w)
    result = torch.empty(phi.shape[:2], dtype=phi.dtype, device=phi.device)
    active = torch.arange(N, device=matrices.device)
    for t in range(2, horizon + 1):
        if t % CERTIFY_EVERY == 0:
            low, certain = _certificate(phi, _with_parallel(rows, w))
            certain = certain.all(-1)
            if certain.any():  # set the certain items aside (a copy of the rest: only when something changed)
                result[active[certain]] = low[certain]
                keep = ~certain
                active, rows, phi = active[keep], rows[keep], phi[keep]
                steps = steps[keep.repeat_interleave(M)]
                w = None if w is None else w[keep]
                if not len(active):
                    return result
        rows = steps(rows.reshape(-1, 1, T)).reshape(rows.shape)
        phi[:, :rows.shape[1]] = torch.maximum(phi[:, :rows.shape[1]], rows)
        if w is not None:
            phi[:, -1:] = torch.maximum(phi[:, -1:], w @ rows[:, :-1])
    result[active] = phi.amin(-1)
    return result


def _with_parallel(rows, w):
    """Rows (n, M, T) with the parallel channels' row w @ rows[:, :-1] appended where w is given."""
    return rows.clone() if w is None else torch.cat([rows, w @ rows[:, :-1]], dim=1)


def parallel_mixing_time(attn, head_weights=None, max_steps=100):
    """The counterfactual walk that draws head h with probability w_h once, then walks on A_h alone by the authors'
    rules: sum_h w_h mixing_time(A_h). One head: the plain proxy."""
    attn = check_layer(attn)
    return head_average(mixing_time(attn[..., None, :, :], max_steps=max_steps), check_weights(head_weights, attn))


def converged_minimax_fidelity(diffusion, max_horizon=100_000):
    """min_i phi_i, phi_i = max over t >= 1 of (D^t)[tau, i], for a row-stochastic causal diffusion D (..., n, n),
    iterated until the answer is certain (_certificate: the signal that source i or any later node has at the sink
    can only fall, so max(phi_i(t), sum_{j >= i} (D^t)[tau, j]) bounds phi_i from above); ValueError if not within
    max_horizon. Returns (fidelity, horizon reached) as float and int (or arrays)."""
    D = check_layer(diffusion)  # row-stochastic, as attention
    D = D.reshape(-1, *D.shape[-2:])
    row, steps = D[:, -1:, :], CausalSteps(D)
    phi = row[:, 0].clone()
    for t in range(1, max_horizon + 1):
        low, certain = _certificate(phi, row[:, 0])
        if bool(certain.all()):
            return to_numpy(low.reshape(diffusion.shape[:-2])), t
        row = steps(row)
        phi = torch.maximum(phi, row[:, 0])
    raise ValueError(f"the fidelity did not converge within {max_horizon} steps")

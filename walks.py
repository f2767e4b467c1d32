"""Walks toward the sink and Vitvitskyi et al.'s epsilon-mixing time (ICML 2025), the quantity the paper's
Theorem 2.9 bounds, exact and batched; the theorem's helpers (each node's probability of stepping toward the sink, a
rigorous Hoeffding bound); the walk and diffusion of a feed-forward graph.

    import walks
    W = walks.mixture_walk(attn, w)              # the layer's walk: each head's attention column-normalised, mixed
    walks.epsilon_mixing_times(W)                # {"average": ..., "worst": ...}, their published convention
    walks.epsilon_mixing_time(walks.graph_walk(adjacency))   # ... of a feed-forward graph
    walks.move_probabilities(W), walks.hoeffding_mixing_bound(n, p)

Input as in proxies.py: NumPy or torch, any device, a batch (..., n, n); maths in float64; floats for one walk, else
float64 NumPy arrays of the batch shape.
"""
import math

import numpy as np
import torch

from proxies import (ROW_SUM_TOLERANCE, STEP_BLOCK, CausalSteps, check_layer, check_steps, check_weights,
                     read_only_blocks, to_numpy, weighted_sum, zero_above_diagonal_blocks)

# The epsilon-mixing time of Vitvitskyi et al. (ICML 2025), the quantity Theorem 2.9 bounds. A walk here is
# column-stochastic: W[i, j] = the probability of stepping from node j to node i >= j, the sink tau = n - 1 absorbing.
# From start j the walk's distribution after t steps is column j of W^t, and its L1 distance to the sink's point mass
# is 2 (1 - (W^t)[tau, j]): only row tau of W^t is ever needed.
EPSILON = 0.25
MAX_WALK_STEPS = 10 ** 12  # the epsilon-mixing time's cap; a walk not mixed within it scores inf, never the cap
LINEAR_STEPS = 128  # steps taken one mat-vec at a time (all walks together; n steps on n > 128 nodes) before the
# slow ones switch to squaring
WALK_CHUNK = 256  # walks stepped together (~20 MB of 100 x 100 walks; bench.py times it)
SQUARING_CHUNK = 32  # slow walks squared together: log2(cap) = 40 powers of each are held at once


def _detached(x):
    return x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(x)


def _check_walk(walk, validate=True):
    """A batch of walks as float64 (B, n, n) and its batch shape, or a ValueError that says what is wrong;
    validate=False only reshapes (a walk that head_walks, mix_walks or graph_walk built)."""
    if not validate:
        return walk.reshape(-1, *walk.shape[-2:]), walk.shape[:-2]
    walk = _detached(walk)
    if not (walk.is_floating_point() and walk.ndim >= 2 and walk.shape[-1] == walk.shape[-2] and walk.shape[-1] > 1):
        raise ValueError(f"a walk must be a float array (..., n, n) of square matrices with n >= 2, "
                         f"got shape {tuple(walk.shape)} of {walk.dtype}")
    walk = walk.to(torch.float64)
    if not torch.isfinite(walk).all() or (walk < -ROW_SUM_TOLERANCE).any():
        raise ValueError("a walk must have finite, non-negative entries")
    above = walk.triu(1).abs().amax().item()
    if above > 0:
        raise ValueError(f"a walk must be causal: W[i, j] > 0 only for i >= j (a step goes toward the sink), "
                         f"found {above:.3g} above the diagonal")
    worst = (walk.sum(-2) - 1).abs().amax().item()
    if worst > ROW_SUM_TOLERANCE:
        raise ValueError(f"a walk's columns must sum to 1 (column-stochastic: column j = where a step from j goes); "
                         f"worst column is off by {worst:.3g}")
    return walk.reshape(-1, *walk.shape[-2:]), walk.shape[:-2]


def _column_mass(matrix, what):
    """sum_i M[i, j] (..., n) of matrices (..., n, n), or a ValueError where a column is zero."""
    mass = matrix.sum(-2)
    if (mass <= 0).any():
        raise ValueError(f"{what} has a zero column: some node has nowhere to step (expected a self-loop or an edge "
                         f"out of every node)")
    return mass


def _column_normalised(matrix, what):
    return matrix / _column_mass(matrix, what)[..., None, :]


def head_walks(attn):
    """Each head's walk toward the sink, W_h[i, j] = A_h[i, j] / sum_i' A_h[i', j]: column j of the head's attention
    (how much each later query reads key j) normalised into where a step from j goes. (..., H, T, T)."""
    return _column_normalised(check_layer(attn), "the attention")


def mixture_walk(attn, head_weights=None):
    """The layer's walk of Theorem 2.9, W = sum_h w_h W_h with each head's walk normalised first (head_walks).
    mixing_time_normalized instead normalises the columns of the combined attention sum_h w_h A_h, which weighs
    each head's column by its mass: the two agree for one head, not in general. (..., T, T)."""
    return mix_walks(head_walks(attn), head_weights)


def mix_walks(walks, head_weights=None):
    """sum_h w_h W_h of the heads' walks (..., H, T, T) from head_walks (not checked again), w normalised."""
    return weighted_sum(check_weights(head_weights, walks), walks)


def graph_walk(adjacency):
    """Vitvitskyi et al.'s walk of a feed-forward graph, W[i, j] = a[i, j] / out-degree(j), where a[i, j] = 1 iff
    (j, i) is an edge (j <= i). (..., n, n)."""
    a = _check_adjacency(adjacency)
    return _column_normalised(a, "the adjacency")


def graph_diffusion(adjacency):
    """Vitvitskyi et al.'s diffusion of a feed-forward graph, D[i, j] = a[i, j] / in-degree(i): row-stochastic, as
    uniform causal attention over the graph's edges. (..., n, n)."""
    a = _check_adjacency(adjacency)
    mass = a.sum(-1, keepdim=True)
    if (mass <= 0).any():
        raise ValueError("the adjacency has a zero row: some node receives no edge (expected a self-loop on every "
                         "node)")
    return a / mass


def _check_adjacency(adjacency):
    a = _detached(adjacency)
    if not (a.ndim >= 2 and a.shape[-1] == a.shape[-2]):
        raise ValueError(f"an adjacency must be (..., n, n), got shape {tuple(a.shape)}")
    a = a.to(torch.float64)
    if not torch.isfinite(a).all() or (a < 0).any():
        raise ValueError("an adjacency must have finite, non-negative entries")
    if (a.triu(1) != 0).any():
        raise ValueError("an adjacency must be causal: a[i, j] = 1 iff (j, i) is an edge with j <= i, so nothing "
                         "above the diagonal")
    return a


STARTS = ("average", "worst")


def _sink_share(rows, start):
    """The sink's share of the walk's mass at one step, from row tau of W^t (B, n): averaged over starts or the
    worst start's."""
    return rows.mean(-1) if start == "average" else rows.amin(-1)


def _last_unmixed_by_squaring(W, row, t0, need, max_steps, starts):
    """For walks not mixed (from one of `starts`) at step t0, row = row tau of W^t0: the last step at which each is
    still not mixed, per start (B, len(starts)), or a step >= max_steps if it does not mix by then; by binary lifting
    over W, W^2, W^4, ... shared by the starts (the sink's share only grows, so the search is exact)."""
    def unmixed(rows):  # rows (B, S, 1, n), one search per start -> (B, S): that start not yet mixed
        return torch.stack([_sink_share(rows[:, k, 0], start) <= need for k, start in enumerate(starts)], dim=-1)
    rows = torch.stack([row] * len(starts), dim=1)  # (B, S, 1, n)
    powers = [W]  # W^(2^k), squared only until every walk here has mixed within 2^k more steps (or the cap)
    while 2 ** len(powers) <= max_steps - t0 and unmixed(rows @ powers[-1][:, None]).any():
        powers.append(powers[-1] @ powers[-1])
    t = torch.full((len(row), len(starts)), t0, dtype=torch.long, device=W.device)
    for k in reversed(range(len(powers))):
        candidate = rows @ powers[k][:, None]
        jump = unmixed(candidate)
        rows = torch.where(jump[..., None, None], candidate, rows)
        t = t + jump * 2 ** k
    return t


def _walk_batch(W):
    """A batch of walks W (B, n, n) as _first_mixed_steps reads it: (their steps, the walks at some indices, n)."""
    return CausalSteps(W), lambda index: W[index], W.shape[-1]


def _first_mixed_steps(steps, walks_at, n, need, max_steps, starts=STARTS, group=1):
    """First t <= max_steps at which the sink's share exceeds `need`, for each of `starts` ("average": averaged over
    starts, "worst": the worst start's), per walk of a batch (_walk_batch: its CausalSteps, its walks (k, n, n) at k
    indices, squared where slow): (B, len(starts)), inf where none. A walk is set aside once it has mixed from all of
    them (with the worst start, when that one has). group > 1: the walks in consecutive groups of that size, a group
    set aside once, from each start, one of its walks has mixed: each group's least first step is exact, and its
    slower walks may be left at inf."""
    B, device = len(steps), steps.device
    row = torch.zeros(B, 1, n, dtype=torch.float64, device=device)
    row[..., -1] = 1.0  # t = 0: row tau of the identity
    first = torch.full((B, len(starts)), math.inf, dtype=torch.float64, device=device)
    active, t, found = torch.arange(B, device=device), 0, first.clone()  # found: first[active]
    linear = min(max(LINEAR_STEPS, n), max_steps)  # n steps cost about one n x n squaring: step at least that far
    while len(active) and t < linear:
        for _ in range(min(max(4, t), 32, max_steps - t)):  # compacted after steps 4, 8, 16, 32, 64, 96, ...
            t += 1
            row = steps(row)
            mixed = torch.stack([_sink_share(row[:, 0], start) for start in starts], dim=-1) > need
            found = torch.where(torch.isinf(found) & mixed, float(t), found)
            if not torch.isinf(found.reshape(-1, group, len(starts)).amin(1)).any():
                break  # every walk (group) has mixed from every start: nothing left to step
        first[active] = found
        walking = torch.isinf(found.reshape(-1, group, len(starts)).amin(1)).any(-1).repeat_interleave(group)
        if not walking.all():  # set the mixed walks aside (a copy of the rest: only when something changed)
            active, row, steps, found = active[walking], row[walking], steps[walking], found[walking]
    for i in range(0, len(active) if t < max_steps else 0, SQUARING_CHUNK):
        part = slice(i, i + SQUARING_CHUNK)
        last = _last_unmixed_by_squaring(walks_at(active[part]), row[part], t, need, max_steps, starts)
        found = torch.where(last >= max_steps, math.inf, (last + 1).double())
        first[active[part]] = torch.where(torch.isinf(first[active[part]]), found, first[active[part]])
    return first


def epsilon_mixing_times(walk, epsilon=EPSILON, convention="published", max_steps=MAX_WALK_STEPS, validate=True,
                         starts=STARTS):
    """Vitvitskyi et al.'s epsilon-mixing time of a walk (..., n, n) (column-stochastic, causal: from mixture_walk or
    graph_walk), from both starts in one pass: {"average": ..., "worst": ...}. The first t at which the L1 distance
    of the walk's distribution to the sink, 2 (1 - (W^t)[tau, j]), is below epsilon, averaged over the n starts j
    (their averaged mixing time) or for the worst start. convention="published" counts one step less, as the values
    of their Figure 1 do (the last step at which the distance is still >= epsilon); "first" is the first step below
    it. Exact (no sampling); inf where the walk has not mixed within max_steps. Floats, or float64 arrays of the
    batch shape. validate=False skips the checks of the walk (they read a large batch several times) for walks that
    head_walks, mixture_walk or graph_walk built, valid by construction. starts: the ones wanted (fewer is faster:
    the averaged start mixes long before the worst)."""
    return _epsilon_mixing(walk, epsilon, convention, max_steps, validate, starts)


def fastest_epsilon_mixing_times(walks, epsilon=EPSILON, convention="published", max_steps=MAX_WALK_STEPS,
                                 validate=True, starts=STARTS):
    """The least epsilon_mixing_times over axis -3 of walks (..., H, n, n) (a layer's heads): {start: (...)}. The
    heads of a layer are stepped together only until the fastest has mixed from each start, not until all have."""
    return _epsilon_mixing(walks, epsilon, convention, max_steps, validate, starts, group=walks.shape[-3])


def _epsilon_mixing(walk, epsilon, convention, max_steps, validate, starts, group=1):
    """epsilon_mixing_times, or with group > 1 the least over consecutive groups of that many walks."""
    _check_mixing(epsilon, convention, max_steps, starts)
    flat, batch_shape = _check_walk(walk, validate)
    chunk = max(1, WALK_CHUNK // group) * group  # whole groups a chunk
    return _mixing_times((_walk_batch(flat[i:i + chunk]) for i in range(0, len(flat), chunk)), batch_shape,
                         epsilon, convention, max_steps, starts, group)


def _check_mixing(epsilon, convention, max_steps, starts):
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must lie in (0, 1), got {epsilon!r}")
    if convention not in ("published", "first"):
        raise ValueError(f"convention must be 'published' or 'first', got {convention!r}")
    if not starts or any(start not in STARTS for start in starts):
        raise ValueError(f"starts must be among 'average' and 'worst', got {starts!r}")
    check_steps("max_steps", max_steps)


def _mixing_times(batches, batch_shape, epsilon, convention, max_steps, starts, group=1):
    """{start: (batch_shape) array} of the walk batches (_walk_batch), in order, as _epsilon_mixing returns them."""
    first = [_first_mixed_steps(*batch, 1.0 - epsilon / 2, max_steps, tuple(starts), group) for batch in batches]
    return _times_of(first, batch_shape, convention, starts, group)


def _times_of(first, batch_shape, convention, starts, group=1):
    """_mixing_times from the first mixed steps of its batches, in order (a share > 1 - epsilon / 2: a distance
    2 (1 - share) < epsilon)."""
    first = torch.cat(first) - float(convention == "published")
    if group > 1:
        first, batch_shape = first.reshape(-1, group, len(starts)).amin(1), batch_shape[:-1]
    return {start: to_numpy(first[:, k].reshape(batch_shape)) for k, start in enumerate(starts)}


def epsilon_mixing_time(walk, epsilon=EPSILON, start="average", convention="published", max_steps=MAX_WALK_STEPS,
                        validate=True):
    """epsilon_mixing_times from one start: "average" (Vitvitskyi et al.'s averaged mixing time) or "worst"."""
    if start not in STARTS:
        raise ValueError(f"start must be 'average' or 'worst', got {start!r}")
    return epsilon_mixing_times(walk, epsilon, convention, max_steps, validate, starts=(start,))[start]


def layer_walk_mixing(attn, head_weights=None, epsilon=EPSILON, starts=STARTS, fastest_head=True):
    """Theorem 2.9's measurements of a layer's attention (..., H, T, T) with head weights (uniform when None), in
    one pass: {"move": each head's move_probabilities (..., H, T - 1), "mixture": epsilon_mixing_times of the layer's
    walk (mixture_walk), and with fastest_head "fastest_head": fastest_epsilon_mixing_times of its heads' walks},
    from `starts`, published convention. The values of those functions on head_walks and mix_walks; the walks
    themselves are never held whole at a language model's length (_layer_walks)."""
    A = check_layer(attn)
    w = check_weights(head_weights, A).expand(*A.shape[:-2])
    _check_mixing(epsilon, "published", MAX_WALK_STEPS, starts)
    mass = _column_mass(A, "the attention")  # (..., H, T)
    out = {"move": to_numpy(1.0 - (A.diagonal(dim1=-2, dim2=-1) / mass)[..., :-1])}  # as move_probabilities
    batch, (H, T) = A.shape[:-3], A.shape[-3:-1]
    A, mass, w = A.reshape(-1, H, T, T), mass.reshape(-1, H, T), w.reshape(-1, H)
    first, need, chunk = {"mixture": [], "fastest_head": []}, 1.0 - epsilon / 2, max(1, WALK_CHUNK // H)
    for i in range(0, len(A), chunk):  # about WALK_CHUNK walks a chunk, built and stepped before the next
        heads, mixture = _layer_walks(A[i:i + chunk], mass[i:i + chunk], w[i:i + chunk])
        first["mixture"].append(_first_mixed_steps(*mixture, need, MAX_WALK_STEPS, tuple(starts)))
        if fastest_head:
            first["fastest_head"].append(_first_mixed_steps(*heads, need, MAX_WALK_STEPS, tuple(starts), H))
    out["mixture"] = _times_of(first["mixture"], batch, "published", starts)
    if fastest_head:
        out["fastest_head"] = _times_of(first["fastest_head"], (*batch, H), "published", starts, group=H)
    return out


def _layer_walks(A, mass, w):
    """(the heads' walks, the mixture's) of attention A (N, H, T, T) with column masses (N, H, T) and checked head
    weights (N, H), as _walk_batch gives them. Where CausalSteps keeps column blocks (T > STEP_BLOCK, causal), each
    head's walk is built straight into them from the attention's (proxies.read_only_blocks: within trusted_layer,
    the ones every study of the layer shares): block j of W_h is column c of A_h from row j down, divided by its
    mass (the same division as head_walks, so the same bits), and the mixture's blocks are the heads' weighted; a
    walk is made whole only where a slow one is squared. Else head_walks and mix_walks as they are."""
    N, H, T = A.shape[0], A.shape[1], A.shape[-1]
    if T <= STEP_BLOCK or not zero_above_diagonal_blocks(A.reshape(-1, T, T)):
        W = A / mass[..., None, :]
        return _walk_batch(W.reshape(-1, T, T)), _walk_batch(weighted_sum(w, W))

    def heads_at(index):  # whole walks, only for the slow ones squared
        return A.reshape(-1, T, T)[index] / mass.reshape(-1, T)[index][:, None, :]

    def mixtures_at(index):
        return weighted_sum(w[index], A[index] / mass[index][..., None, :])
    blocks = [block / mass.reshape(-1, T)[:, j:j + block.shape[1], None]  # (N H, b, e) each
              for j, block in zip(range(0, T, STEP_BLOCK), read_only_blocks(A))]
    mixed = [(w[:, None, :] @ block.reshape(N, H, -1)).reshape(N, *block.shape[1:]) for block in blocks]
    return (CausalSteps(blocks=blocks), heads_at, T), (CausalSteps(blocks=mixed), mixtures_at, T)


def move_probabilities(walk, validate=True):
    """Each non-sink node's probability of stepping toward the sink, 1 - W[j, j]: (..., n - 1). Theorem 2.9's p_h
    is its minimum over nodes (what a rigorous bound needs) or, as a heuristic, its mean. validate as in
    epsilon_mixing_times."""
    flat, batch_shape = _check_walk(walk, validate)
    return to_numpy((1.0 - flat.diagonal(dim1=-2, dim2=-1)[:, :-1]).reshape(*batch_shape, -1))


def hoeffding_mixing_bound(n, p, epsilon=EPSILON):
    """A rigorous bound on the worst-start epsilon-mixing time ("first" convention) of a walk on n nodes whose every
    non-sink node steps toward the sink with probability >= p: the least integer t with 2 exp(-2 (t p - N)^2 / t)
    < epsilon, N = n - 1, i.e. floor(((sqrt(c) + sqrt(c + 4 p N)) / (2 p))^2) + 1 with c = ln(2 / epsilon) / 2
    (docs/theory.md); inf for p = 0. Theorem 2.9's 2N/p is at least this whenever N p > ln(2 / epsilon)."""
    p = np.asarray(p, dtype=float)
    if (p < 0).any() or (p > 1).any() or not 0 < epsilon < 1:
        raise ValueError(f"p must lie in [0, 1] and epsilon in (0, 1), got p in [{p.min()}, {p.max()}] and "
                         f"epsilon {epsilon}")
    c, N = math.log(2 / epsilon) / 2, n - 1
    with np.errstate(divide="ignore", over="ignore"):
        return np.floor(((math.sqrt(c) + np.sqrt(c + 4 * p * N)) / (2 * p)) ** 2) + 1

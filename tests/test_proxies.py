"""The proxies against values worked out by hand and against an independent brute-force implementation."""
import numpy as np
import pytest
import torch
from conftest import ROOT, authors_walk_reference  # noqa: F401  (ROOT puts the repo on sys.path)

import proxies
from transformer import MultiHeadAttention

# A 3-node chain 0 <- 1 <- 2 (rows = receivers): C[1] = [.5, .5, 0], C[2] = [0, .5, .5].
CHAIN = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])


def random_causal(shape, T, rng):
    """Random row-stochastic lower-triangular matrices of shape (*shape, T, T)."""
    A = np.tril(rng.random((*shape, T, T)) + 1e-3)
    return A / A.sum(-1, keepdims=True)


def brute_force_walk(C, max_steps):
    """Independent reading of the authors' walk (docs/proxies.md): transition matrix built entry by entry, then the
    distribution of the capped hitting time by propagating the full chain; returns per-start (mean, variance) of
    min(H, max_steps), and P(H > max_steps), the walk's survival of the cap."""
    T = len(C)
    P = authors_walk_reference(C)
    means, variances, survivals = np.zeros(T), np.zeros(T), np.zeros(T)
    for s in range(T - 1):
        dist = np.eye(T)[s]
        first, second = 0.0, 0.0
        for t in range(max_steps):
            survive = 1.0 - dist[T - 1]  # P(H > t)
            first += survive
            second += (2 * t + 1) * survive
            dist = dist @ P
        means[s], variances[s], survivals[s] = first, second - first ** 2, 1.0 - dist[T - 1]
    return means, variances, survivals


def test_chain_fidelity_by_hand():
    # Row 2 of C^t: t=1 [0, .5, .5], t=2 [.25, .5, .25], t=3 [.5, .375, .125]; node 0 absorbs the signal over time.
    assert np.allclose(proxies.sink_signal(CHAIN, horizon=3), [[0, .5, .5], [.25, .5, .25], [.5, .375, .125]])
    assert np.allclose(proxies.per_node_fidelity(CHAIN, horizon=3), [0.5, 0.5, 0.5])
    assert proxies.minimax_fidelity(CHAIN) == pytest.approx(50.0)
    assert proxies.minimax_fidelity(CHAIN, horizon=1) == pytest.approx(0.0)  # node 0 is 2 hops away


def test_chain_walk_by_hand():
    # Column 0 = [1, .5, 0]: S_0 = 1, the start-0 trap. Column 1 = [0, .5, .5]: stay .5, sink .5 -> geometric.
    steps = proxies.expected_walk_steps(CHAIN, max_steps=100)
    assert np.allclose(steps, [100, 2 * (1 - 0.5 ** 100), 0])
    assert proxies.mixing_time(CHAIN) == pytest.approx((100 + 2) / 3)
    assert proxies.mixing_time(CHAIN, max_steps=4) == pytest.approx((4 + 2 * (1 - 1 / 16)) / 3)
    # Normalized walk: from 0, stay 2/3 and move to 1 w.p. 1/3: 3 steps to leave, then 2 more.
    assert proxies.mixing_time_normalized(CHAIN) == pytest.approx((5 + 2) / 3, abs=1e-9)


def test_walk_cuts_mass_above_one_and_sends_deficit_to_sink():
    C = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, .9, .1, 0], [0, .9, 0, .1]])
    # Column 1 sums to 2.8: S_1 = 1 already, so position 1 is a trap too. Column 2 = [0, 0, .1, 0]: deficit .9 -> sink.
    P = proxies.walk_transition(torch.tensor(C))
    assert np.allclose(P[1].numpy(), [0, 1, 0, 0]) and np.allclose(P[2].numpy(), [0, 0, .1, .9])
    assert np.allclose(proxies.expected_walk_steps(C, max_steps=100), [100, 100, (1 - .1 ** 100) / .9, 0])


def test_start_zero_trap_in_every_causal_head():
    rng = np.random.default_rng(1)
    A = random_causal((5, 3), 7, rng)
    assert np.all(proxies.expected_walk_steps(A[..., None, :, :], max_steps=37)[..., 0] == 37)
    assert np.all(proxies.mixing_time(A) >= 37 / 7)


def test_exact_walk_equals_brute_force():
    rng = np.random.default_rng(2)
    A, w = random_causal((3,), 6, rng), np.array([0.2, 0.5, 0.3])
    C = np.tensordot(w, A, axes=1)
    means, _, _ = brute_force_walk(C, 25)
    assert np.allclose(proxies.expected_walk_steps(A, w, max_steps=25), means, atol=1e-12)
    assert proxies.mixing_time(A, w, max_steps=25) == pytest.approx(means.mean(), abs=1e-12)


def test_long_sequences_step_and_agree_with_doubling():
    """Caps below T (a language model's long inputs) sum M mat-vec steps instead of doubling: the same exact value,
    checked against the brute-force walk, and both paths agree to rounding."""
    rng = np.random.default_rng(5)
    A, w = random_causal((2,), 12, rng), np.array([0.7, 0.3])
    means, _, _ = brute_force_walk(np.tensordot(w, A, axes=1), 5)
    assert np.allclose(proxies.expected_walk_steps(A, w, max_steps=5), means, atol=1e-12)
    C = torch.from_numpy(np.tensordot(w, A, axes=1))[None]
    for M in (3, 10, 11, 40):
        stepped = proxies._capped_steps_by_stepping(*proxies._walk_steps(C, "authors"), M)  # (1, 2, 12)
        assert torch.allclose(proxies._expected_capped_steps(C, M, survival=True), stepped, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_monte_carlo_within_four_standard_errors(seed):
    rng = np.random.default_rng(seed)
    T, n = 6, 2000
    A = random_causal((2,), T, rng)
    A[..., 1:, 1:] *= 3  # heavier columns, so some columns exceed 1 and get cut
    A = A / A.sum(-1, keepdims=True)
    _, variances, _ = brute_force_walk(A.mean(0), 100)
    standard_error = np.sqrt(variances.sum() / n) / T
    exact = proxies.mixing_time(A)
    estimate = proxies.mixing_time_mc(A, num_simulations=n, seed=seed)
    assert abs(estimate - exact) < 4 * standard_error
    assert proxies.mixing_time_mc(A, num_simulations=n, seed=seed) == estimate  # seeded


def test_batch_equals_per_layer_and_backends_agree():
    rng = np.random.default_rng(6)
    A = random_causal((2, 3, 4), 8, rng)  # (S, L, H, T, T)
    w = rng.random((3, 4))  # per-layer weights (L, H)
    for fn in (proxies.minimax_fidelity, proxies.mixing_time, proxies.mixing_time_normalized):
        batch = fn(A, w)
        assert batch.shape == (2, 3)
        for s in range(2):
            for l in range(3):
                assert batch[s, l] == pytest.approx(fn(A[s, l], w[l]), rel=1e-12)
        assert np.allclose(fn(torch.tensor(A, dtype=torch.float32), torch.tensor(w)), batch, rtol=1e-5)
    assert isinstance(proxies.minimax_fidelity(A[0, 0]), float)


def test_chunking_does_not_change_results(monkeypatch):
    A = random_causal((40, 2), 9, np.random.default_rng(7))
    whole = proxies.mixing_time(A), proxies.minimax_fidelity(A)
    monkeypatch.setattr(proxies, "CPU_CHUNK", 3)
    assert np.array_equal(proxies.mixing_time(A), whole[0]) and np.array_equal(proxies.minimax_fidelity(A), whole[1])


def test_weights_are_normalised_and_default_uniform():
    A = random_causal((3,), 6, np.random.default_rng(8))
    w = np.array([1.0, 2.0, 5.0])
    assert proxies.minimax_fidelity(A, w) == pytest.approx(proxies.minimax_fidelity(A, 7 * w))
    assert proxies.mixing_time(A) == pytest.approx(proxies.mixing_time(A, [1, 1, 1]))
    C = proxies.combine_heads(A, w).numpy()
    assert np.allclose(C, np.tensordot(w / w.sum(), A, axes=1))
    assert proxies.mixing_time(A, w) == pytest.approx(proxies.mixing_time(C))


def test_head_weights_are_normalised_block_norms():
    attn = MultiHeadAttention(embed_dim=4, num_heads=2, dropout=0.0, causal=True)
    with torch.no_grad():
        attn.out_proj.weight[:, :2] = 1.0  # head 0's input features: norm sqrt(8)
        attn.out_proj.weight[:, 2:] = 2.0  # head 1's: norm 2 sqrt(8)
    assert np.allclose(proxies.head_weights(attn), [1 / 3, 2 / 3])


GOOD = np.array([[1.0, 0.0], [0.5, 0.5]])


@pytest.mark.parametrize("attn, weights, message", [
    (np.ones((2, 3)), None, "square"),
    (GOOD.tolist(), None, "NumPy array or a torch tensor"),
    (np.array([[1, 0], [1, 1]]), None, "float"),
    (np.array([[np.nan, 1.0], [0.5, 0.5]]), None, "NaN"),
    (np.array([[1.0, 0.0], [0.7, 0.5]]), None, "sum to 1"),
    (np.array([[1.0, 0.0], [-0.5, 1.5]]), None, "negative"),
    (np.stack([GOOD, GOOD]), [1.0], "one weight per head"),
    (np.stack([GOOD, GOOD]), [1.0, -1.0], "non-negative"),
    (np.stack([GOOD, GOOD]), [0.0, 0.0], "all be zero"),
    (np.stack([GOOD, GOOD])[None].repeat(3, 0), np.ones((4, 2)), "broadcast"),
])
def test_bad_input_is_refused_with_a_clear_error(attn, weights, message):
    with pytest.raises(ValueError, match=message):
        proxies.minimax_fidelity(attn, weights)


def test_bad_step_counts_are_refused():
    with pytest.raises(ValueError, match="horizon"):
        proxies.minimax_fidelity(GOOD, horizon=0)
    with pytest.raises(ValueError, match="max_steps"):
        proxies.mixing_time(GOOD, max_steps=2.5)
    with pytest.raises(ValueError, match="num_simulations"):
        proxies.mixing_time_mc(GOOD, num_simulations=0)


def example2_heads():
    import example2
    graphs = example2.graphs()
    return np.stack([graphs["head1"], graphs["head2"]])


def test_parallel_proxies_on_example2_by_hand():
    heads = example2_heads()
    # Sink rows by hand: head 1 t=1 [0, 0, 1/2, 1/2], t=2 [0, 1/4, 1/2, 1/4]; head 2 t=1 [0, 1/3, 1/3, 1/3],
    # t=2 [1/9, 5/9, 2/9, 1/9]. Parallel over t = 1, 2: phi = [1/18, 29/72, 5/12, 5/12], so the minimum is u's 1/18;
    # the combination's C^2 row gives u 1/9: besides u -> w -> tau (head 2 alone), the path u -> v (head 1) then
    # v -> tau (head 2) switches heads, and only the combination has it.
    assert proxies.parallel_minimax_fidelity(heads, [0.5, 0.5], horizon=2) == pytest.approx(100 / 18)
    assert proxies.minimax_fidelity(heads, [0.5, 0.5], horizon=2) == pytest.approx(100 / 9)
    # The authors' walk: head 1 scores (100 trap + 4 from v + 2 from w + 0) / 4 = 26.5; head 2 traps u and v
    # (column v = [0, 1, 1/3, 1/3] fills S at v), w leaves with 2/3: (100 + 100 + 1.5) / 4 = 50.375.
    assert proxies.mixing_time(heads[0]) == pytest.approx(26.5)
    assert proxies.mixing_time(heads[1]) == pytest.approx(50.375)
    assert proxies.parallel_mixing_time(heads, [0.5, 0.5]) == pytest.approx((26.5 + 50.375) / 2)
    assert proxies.parallel_mixing_time(heads, [3, 1]) == pytest.approx(0.75 * 26.5 + 0.25 * 50.375)


def brute_force_parallel_fidelity(heads, weights, horizon):
    """Entry by entry: each head's matrix powers by repeated products, the weighted share of each source, max, min."""
    H, T = heads.shape[0], heads.shape[-1]
    phi = np.zeros(T)
    powers = [np.eye(T) for _ in range(H)]
    for _ in range(horizon):
        powers = [p @ a for p, a in zip(powers, heads)]
        for j in range(T):
            share = sum(weights[h] / sum(weights) * powers[h][T - 1, j] for h in range(H))
            phi[j] = max(phi[j], share)
    return 100 * phi.min()


def test_parallel_proxies_equal_brute_force_batched_and_one_head_is_the_plain_proxy():
    rng = np.random.default_rng(11)
    attn = random_causal((2, 3, 4), 7, rng)  # (batch 2, layers 3, heads 4)
    weights = rng.random((2, 3, 4))
    fidelity = proxies.parallel_minimax_fidelity(attn, weights, horizon=9)
    mixing = proxies.parallel_mixing_time(torch.from_numpy(attn).float(), torch.from_numpy(weights), max_steps=30)
    assert fidelity.shape == mixing.shape == (2, 3)
    for b in range(2):
        for layer in range(3):
            A, w = attn[b, layer], weights[b, layer]
            assert fidelity[b, layer] == pytest.approx(brute_force_parallel_fidelity(A, w, 9), abs=1e-10)
            walk = [brute_force_walk(A[h], 30)[0].mean() for h in range(4)]
            assert mixing[b, layer] == pytest.approx(np.dot(w / w.sum(), walk), abs=1e-5)
    one = attn[..., :1, :, :]
    assert np.allclose(proxies.parallel_minimax_fidelity(one, horizon=9), proxies.minimax_fidelity(one, horizon=9))
    assert np.allclose(proxies.parallel_mixing_time(one, max_steps=30), proxies.mixing_time(one, max_steps=30))
    with pytest.raises(ValueError, match="one weight per head"):
        proxies.parallel_minimax_fidelity(attn, [1, 2])
    with pytest.raises(ValueError, match="rows must sum to 1"):
        proxies.parallel_mixing_time(attn * 2)


@pytest.mark.parametrize("peak", [1.0, 30.0])  # near-uniform rows certify in a few steps, peaked ones run long
def test_certified_fidelities_equal_the_full_horizon(peak):
    """minimax_fidelity and head_set_fidelities stop once their value is certain; they must equal the full
    horizon's value: the minimum of per_node_fidelity (every step), and the parallel channels by matrix powers."""
    rng = np.random.default_rng(5)
    attn = random_causal((6, 3), 9, rng) ** peak
    attn = attn / attn.sum(-1, keepdims=True)
    weights = rng.random((6, 3))
    values = proxies.head_set_fidelities(attn, weights, horizon=40)
    full = lambda a, w=None: 100 * proxies.per_node_fidelity(a, w, horizon=40).min(-1)
    assert np.allclose(values["combined"], full(attn, weights), rtol=1e-12, atol=0)
    assert np.allclose(proxies.minimax_fidelity(attn, weights, horizon=40), full(attn, weights), rtol=1e-12, atol=0)
    assert np.allclose(values["heads"], full(attn[:, :, None]), rtol=1e-12, atol=0)
    parallel = [brute_force_parallel_fidelity(attn[b], weights[b], 40) for b in range(6)]
    assert np.allclose(values["parallel"], parallel, rtol=1e-10, atol=0)


def test_capped_share_by_hand():
    """Three tokens, C = [[1, 0, 0], [a, 1 - a, 0], [b, c, 1 - b - c]]. The authors' walk from 0 uses column 0
    (S_0 = 1: it never moves), from 1 column 1 (stays with 1 - a, else the sink): capped after M steps with
    (1 - a)^M. The principled walk renormalises the columns: from 0 (1, a, b) / (1 + a + b), from 1
    (0, 1 - a, c) / (1 - a + c); its share is the mean of Q^M 1 over the starts (the sink's 0 included), Q^M by
    numpy's matrix power."""
    a, b, c, M = 0.5, 0.2, 0.3, 3
    C = torch.tensor([[1, 0, 0], [a, 1 - a, 0], [b, c, 1 - b - c]], dtype=torch.float64)[None]
    assert np.isclose(proxies.mixing_and_capped_share(C, max_steps=M)[1], (1 + (1 - a) ** M + 0) / 3, rtol=1e-12)
    Q = np.array([[1, a], [0, 1 - a]]) / np.array([[1 + a + b], [1 - a + c]])
    survive = np.linalg.matrix_power(Q, M) @ np.ones(2)
    assert np.isclose(proxies.mixing_and_capped_share(C, max_steps=M, walk="normalized")[1], (survive.sum() + 0) / 3,
                      rtol=1e-12)
    assert np.isclose(proxies.mixing_and_capped_share(C, max_steps=1)[1], (1 + (1 - a)) / 3)  # M < T - 1: stepped
    eye = torch.eye(5, dtype=torch.float64)
    assert np.isclose(proxies.mixing_and_capped_share(eye, max_steps=100)[1], 4 / 5)  # every start trapped


def test_stepped_walk_stops_early_and_equals_the_brute_force():
    """T = 150 > M = 100: the stepped path, which sets a walk aside once its remaining steps cannot count. Peaked
    heads (they stop early), a head whose row 60 attends to itself alone (a trapped start that earlier ones reach:
    no early stop) and a slow chain; every start's expected capped steps and survival equal the brute force's."""
    rng = np.random.default_rng(3)
    T, M = 150, 100
    peaked = np.tril(np.exp(4 * rng.standard_normal((2, T, T))))
    trapped = np.tril(rng.random((T, T)))
    trapped[60] = np.eye(T)[60]
    chain = 0.97 * np.eye(T) + 0.03 * np.eye(T, k=-1)
    chain[0, 0] = 1.0
    heads = np.concatenate([peaked, trapped[None], chain[None]])
    heads /= heads.sum(-1, keepdims=True)
    steps = proxies.expected_walk_steps(heads[:, None], max_steps=M, survival=True)  # (4, 2, T)
    for h in range(4):
        means, _, survivals = brute_force_walk(heads[h], M)
        assert np.allclose(steps[h, 0], means, rtol=1e-11, atol=0), h
        assert np.allclose(steps[h, 1], survivals, rtol=1e-9, atol=1e-13), h
    assert steps[2, 1, 60] == 1.0 and steps[2, 0, 60] == M


def test_causal_steps_are_row_times_matrix_in_blocks_and_keep_subsets():
    """CausalSteps on causal matrices longer than a block: r M as NumPy computes it (within 1e-13 relative), for
    several rows at once, a subset kept, and a length that is not a multiple of the block; a matrix with an entry
    above its diagonal blocks, and a short one, stepped as r @ M itself."""
    rng = np.random.default_rng(2)
    for T in (proxies.STEP_BLOCK + 1, 3 * proxies.STEP_BLOCK + 17):
        M = np.tril(rng.random((4, T, T)))
        r = rng.random((4, 2, T))
        steps = proxies.CausalSteps(torch.from_numpy(M))
        assert steps.blocks is not None and steps.M is None  # the zeros above the diagonal blocks are not kept
        assert np.allclose(steps(torch.from_numpy(r)).numpy(), r @ M, rtol=1e-13, atol=0)
        keep = torch.tensor([True, False, False, True])
        assert len(steps[keep]) == 2
        assert np.allclose(steps[keep](torch.from_numpy(r[[0, 3]])).numpy(), r[[0, 3]] @ M[[0, 3]], rtol=1e-13)
        M[2, 0, -1] = 0.5  # not causal: one entry above the diagonal
        plain = proxies.CausalSteps(torch.from_numpy(M))
        assert plain.blocks is None and np.allclose(plain(torch.from_numpy(r)).numpy(), r @ M, rtol=1e-13, atol=0)
    short = np.tril(rng.random((2, 9, 9)))
    assert proxies.CausalSteps(torch.from_numpy(short)).blocks is None


def test_the_steps_compiled_by_torchscript_are_the_python_steps_bit_for_bit():
    """This torch compiles the blocked product (CausalSteps' steps run without the GIL between their ops), and the
    compiled steps give the Python function's bits: one row and several, one matrix and several, a band."""
    compiled = proxies._scripted_blocked_product()
    assert isinstance(compiled, torch.jit.ScriptFunction)
    rng = np.random.default_rng(3)
    T, b = 2 * proxies.STEP_BLOCK + 41, proxies.STEP_BLOCK
    for B, k in ((1, 1), (4, 1), (3, 2)):
        blocks = [torch.from_numpy(rng.random((B, min(b, T - j), min(b + 50, T - j)))) for j in range(0, T, b)]
        r = torch.from_numpy(rng.random((B, k, T)))
        assert torch.equal(compiled(blocks, r, b), proxies.blocked_product(blocks, r, b)), (B, k)


def _dense_survival(P, M):
    """Independent of proxies: numpy's M steps s <- Q s of a walk's transitions P among its non-sink nodes, from
    every start: (sum of the survivals before each step, the survival after M)."""
    Q, total = P[:-1, :-1], np.zeros(len(P) - 1)
    survive = np.ones(len(P) - 1)
    for _ in range(M):
        total, survive = total + survive, Q @ survive
    return total, survive


def test_sliding_window_heads_are_stepped_on_their_band_alone():
    """Sliding-window heads (query i reads keys i - W < j <= i, as Gemma 3's local layers) at T = 300: CausalSteps
    keeps each column block only down to its band's last row (b + W - 1 rows), and steps as numpy's r @ M; the
    mixing times of both walks built from the band (survival included) equal numpy's dense steps of the reference
    walks; the certified fidelities, the full horizon's minimum (per_node_fidelity)."""
    rng = np.random.default_rng(7)
    T, W, M, b = 300, 40, 100, proxies.STEP_BLOCK
    i, j = np.indices((T, T))
    heads = np.where((i >= j) & (i - j < W), np.exp(2 * rng.standard_normal((3, T, T))), 0.0)
    heads /= heads.sum(-1, keepdims=True)
    steps = proxies.CausalSteps(torch.from_numpy(heads))
    assert [block.shape[-1] for block in steps.blocks] == [b + W - 1, b + W - 1, T - 2 * b]
    r = rng.random((3, 2, T))
    assert np.allclose(steps(torch.from_numpy(r)).numpy(), r @ heads, rtol=1e-13, atol=0)
    authors = proxies.expected_walk_steps(heads[:, None], max_steps=M, survival=True)
    normalized = proxies.expected_walk_steps(heads[:, None], max_steps=M, walk="normalized", survival=True)
    for h, C in enumerate(heads):
        P = C.T / C.sum(0)[:, None]
        P[-1] = np.eye(T)[-1]
        for values, walk in ((authors[h], authors_walk_reference(C)), (normalized[h], P)):
            total, survive = _dense_survival(walk, M)
            assert np.allclose(values[0, :-1], total, rtol=1e-9, atol=0) and values[0, -1] == 0
            assert np.allclose(values[1, :-1], survive, rtol=1e-9, atol=1e-12)
    weights = rng.random(3)
    fidelities = proxies.head_set_fidelities(heads, weights, horizon=30)
    full = lambda a, w=None: 100 * proxies.per_node_fidelity(a, w, horizon=30).min(-1)
    assert np.allclose(fidelities["heads"], full(heads[:, None]), rtol=1e-12, atol=0)
    assert np.isclose(fidelities["combined"], full(heads, weights), rtol=1e-12, atol=0)


def test_a_trusted_layer_is_read_once_and_its_derived_matrices_step_on_its_band():
    """Within trusted_layer a sliding-window layer (T = 300) is checked once: the proxies of it, of a view of all of
    it with the same rows and of its combination equal those outside, bit for bit (its band read from the
    attention, not from each matrix; its heads' column blocks copied once, shared by every view of all of them in
    their order and by no other); an in-place change moves the tensor's version, so it is read again and
    refused; a bad layer is refused on entry, as check_layer refuses it."""
    rng = np.random.default_rng(9)
    T, W = 300, 40
    i, j = np.indices((T, T))
    attn = np.where((i >= j) & (i - j < W), rng.random((2, 3, T, T)) + 0.01, 0.0)
    attn /= attn.sum(-1, keepdims=True)
    weights = rng.random(3)
    outside = (proxies.head_set_fidelities(attn, weights)["combined"],
               proxies.expected_walk_steps(attn[:, :, None], max_steps=50, survival=True),
               proxies.converged_minimax_fidelity(proxies.combine_heads(attn, weights))[0])
    with proxies.trusted_layer(torch.from_numpy(attn.copy())) as layer:
        inside = (proxies.head_set_fidelities(layer, weights)["combined"],
                  proxies.expected_walk_steps(layer[:, :, None], max_steps=50, survival=True),
                  proxies.converged_minimax_fidelity(proxies.combine_heads(layer, weights))[0])
        assert proxies._band_ends([layer[:1, :1]]) == [128 + W - 1, 128 + W - 1, T - 256]
        shared = proxies.shared_blocks(layer)  # the heads' blocks, copied once for every study of the layer
        assert shared is proxies.shared_blocks(layer.reshape(-1, 1, T, T)) and len(shared) == 3
        assert all(torch.equal(s, b) for s, b in zip(shared, proxies.column_blocks([layer], shared=False)))
        assert proxies.shared_blocks(layer.transpose(0, 1)) is None  # the heads in another order: not theirs
        assert proxies.shared_blocks(layer[:1]) is None  # some of them
        layer[1, 2, 250, 0] = -0.5  # in place: read again
        with pytest.raises(ValueError, match="negative entries"):
            proxies.mixing_time(layer)
    for a, b in zip(outside, inside):
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="rows must sum to 1"):
        with proxies.trusted_layer(torch.from_numpy(2 * attn)):
            pass


def test_the_converged_fidelity_of_a_long_diffusion_is_the_minimum_at_its_horizon():
    """converged_minimax_fidelity steps a long causal diffusion in blocks; its value is per_node_fidelity's minimum at
    the horizon it reports (rows of D^t by dense products), within 1e-12."""
    rng = np.random.default_rng(11)
    D = random_causal((2,), 260, rng) ** 4
    D /= D.sum(-1, keepdims=True)
    fidelity, horizon = proxies.converged_minimax_fidelity(D)
    assert np.allclose(fidelity, proxies.per_node_fidelity(D[:, None], horizon=horizon).min(-1), rtol=1e-12, atol=0)


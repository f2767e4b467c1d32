"""The fused CPU attention kernel (cpu_attention.py) against an independent float64 computation, its dropout bits
against the Philox4x32-10 reference, and its statistics."""
import subprocess
import warnings

import pytest
import torch
from conftest import ROOT, reference_attention

import cpu_attention
import transformer

pytestmark = pytest.mark.skipif(not cpu_attention.available(),
                                reason=f"no kernel: {cpu_attention.unavailable_reason()}")


def outputs_and_grads(fn, q, k, v, grad):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad.to(out.dtype))
    return [out.double()] + [x.grad.double() for x in (q, k, v)]


def seed_of_next_call():
    """The Philox key the next attention call will draw from torch's generator (without drawing it)."""
    state = torch.get_rng_state()
    seed = int(torch.randint(0, 2 ** 63 - 1, (1,)))
    torch.set_rng_state(state)
    return seed


@pytest.mark.parametrize("counter, key, expected", [  # Random123's known-answer vectors (its kat_vectors)
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
])
def test_philox_matches_random123(counter, key, expected):
    assert cpu_attention.philox4x32_10(counter, key) == expected


def test_exp_approximation_is_accurate_to_2e_7():
    x = torch.linspace(-87, 88, 2_000_001)
    relative = (cpu_attention.exp_approx(x).double() / x.double().exp() - 1).abs()
    assert relative.max().item() < 2e-7
    assert cpu_attention.exp_approx(torch.tensor([-87.5, -1e4, float("-inf")])).eq(0).all()


def test_keep_bits_are_the_documented_philox_words():
    N, T, p, seed = 3, 70, 0.3, 0x0123456789ABCDEF
    mask, threshold = cpu_attention.keep_mask(N, T, p, seed), round(p * 2 ** 32)
    for n, i, j in [(0, 0, 0), (1, 5, 7), (2, 69, 69), (2, 40, 33), (0, 17, 63), (1, 69, 64), (2, 3, 31)]:
        words = cpu_attention.philox4x32_10([(j // 32) * 8 + j % 8, i, n, 0], [seed & 0xFFFFFFFF, seed >> 32])
        assert bool(mask[n, i, j]) == (words[(j // 8) % 4] >= threshold), (n, i, j)


def test_builds_are_cached_per_source_compiler_flags_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    compiler = cpu_attention._compilers()[0]
    first = cpu_attention.compile_kernel(["-O1"], compiler)
    assert len(list((tmp_path / "beyondparallelism" / "cpu_attention").glob("*.so"))) == 1
    monkeypatch.setattr(cpu_attention.subprocess, "run", lambda *a, **k: pytest.fail("compiled again"))
    again = cpu_attention.compile_kernel(["-O1"], compiler)  # loaded from the cache
    assert again.philox4x32_10 and first.build == again.build
    monkeypatch.setattr(cpu_attention, "C_SOURCE", cpu_attention.C_SOURCE + "\n")
    with pytest.raises(pytest.fail.Exception, match="compiled again"):
        cpu_attention.compile_kernel(["-O1"], compiler)  # another source is another build


# Builds without -fopenmp ignore the OpenMP pragmas by design; -Wpsabi notes how AVX vectors would be returned
# across a library boundary, which the kernel's vector helpers (static inline) never cross.
SERIAL_BUILD_NOTES = ["-Wno-unknown-pragmas", "-Wno-psabi"]


@pytest.mark.parametrize("flags", [*cpu_attention.COMPILE_FLAGS, cpu_attention.PORTABLE_FLAGS], ids=" ".join)
def test_the_kernel_compiles_without_a_warning(flags, tmp_path):
    """cpu_attention.c with -Wall -Wextra -Werror under every flag set the build may use."""
    compiler = cpu_attention._compilers()[0]
    notes = [] if "-fopenmp" in flags else SERIAL_BUILD_NOTES
    result = subprocess.run([compiler, *flags, *notes, "-std=c99", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
                             str(ROOT / "cpu_attention.c"), "-o", str(tmp_path / "kernel.so"), "-lm"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_compiler_errors_are_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_attention, "C_SOURCE", "this is not C")
    with pytest.raises(RuntimeError, match="-O1: .*error"):
        cpu_attention.compile_kernel(["-O1"], cpu_attention._compilers()[0])


def test_portable_build_draws_the_same_bits_and_computes_the_same_attention():
    portable = cpu_attention.compile_kernel(cpu_attention.PORTABLE_FLAGS, cpu_attention._compilers()[0])
    assert torch.equal(cpu_attention.keep_mask(5, 77, 0.1, 99, lib=portable), cpu_attention.keep_mask(5, 77, 0.1, 99))
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 29, 8) for _ in range(3))
    torch.manual_seed(1)
    fast = cpu_attention.attention(q, k, v, 0.1)
    torch.manual_seed(1)
    assert torch.allclose(cpu_attention.attention(q, k, v, 0.1, lib=portable), fast, atol=1e-6)


@pytest.mark.parametrize("d, T, causal", [(4, 37, True), (16, 100, True), (64, 9, True), (8, 21, False), (3, 1, True)])
def test_matches_float64_attention_without_dropout(d, T, causal):
    torch.manual_seed(d + T)
    q, k, v, grad = (torch.randn(2, 3, T, d) * 2 for _ in range(4))
    fused = outputs_and_grads(lambda *x: cpu_attention.attention(*x, 0.0, causal), q, k, v, grad)
    exact = outputs_and_grads(lambda *x: reference_attention(*x, causal), q, k, v, grad)
    for name, a, b in zip(["out", "dq", "dk", "dv"], fused, exact):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), (name, (a - b).abs().max().item())


@pytest.mark.parametrize("d, T, p, causal", [(4, 45, 0.1, True), (64, 33, 0.5, True), (5, 33, 0.3, False)])
def test_dropout_is_the_exact_computation_with_the_kernels_mask(d, T, p, causal):
    torch.manual_seed(d)
    q, k, v, grad = (torch.randn(2, 4, T, d) for _ in range(4))
    keep = cpu_attention.keep_mask(2 * 4, T, p, seed_of_next_call()).view(2, 4, T, T)
    fused = outputs_and_grads(lambda *x: cpu_attention.attention(*x, p, causal), q, k, v, grad)
    exact = outputs_and_grads(lambda *x: reference_attention(*x, causal, keep, p), q, k, v, grad)
    for name, a, b in zip(["out", "dq", "dk", "dv"], fused, exact):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), (name, (a - b).abs().max().item())


def test_dropout_statistics():
    p, N, T = 0.1, 64, 100
    masks = [cpu_attention.keep_mask(N, T, p, seed).float() for seed in (1, 2)]
    n = N * T * T
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(masks[0].mean().item() - (1 - p)) < 5 * sigma
    # Every position of a 32-key tile (each Philox word and lane) keeps 1 - p.
    by_position = masks[0].view(N, T, -1)[..., :96].reshape(-1, 3, 32).mean((0, 1))
    assert (by_position - (1 - p)).abs().max().item() < 5 * (p * (1 - p) / (n * 96 / T / 32)) ** 0.5
    centred = [m - m.mean() for m in masks]
    for a, b in [(centred[0][..., 1:], centred[0][..., :-1]),   # neighbouring keys
                 (centred[0][:, 1:], centred[0][:, :-1]),       # neighbouring queries
                 (centred[0][1:], centred[0][:-1]),             # neighbouring matrices
                 (centred[0], centred[1])]:                     # two calls
        correlation = (a * b).mean() / (a.std() * b.std())
        assert abs(correlation.item()) < 5 / n ** 0.5
    # Dropout keeps the expected output: the mean over many calls approaches the output without dropout.
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, 4) for _ in range(3))
    mean = torch.stack([cpu_attention.attention(q, k, v, p) for _ in range(2000)]).mean(0)
    assert torch.allclose(mean, cpu_attention.attention(q, k, v, 0.0), atol=0.05)


def test_results_do_not_depend_on_the_thread_count():
    torch.manual_seed(0)
    q, k, v, grad = (torch.randn(3, 4, 50, 16) for _ in range(4))
    before, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(5)
            results.append(outputs_and_grads(lambda *x: cpu_attention.attention(*x, 0.1), q, k, v, grad))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_bad_input_is_refused():
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="float32 CPU tensors .* got torch.float64"):
        cpu_attention.attention(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match=r"one shape \(B, H, T, d\); got \(1, 2, 5, 4\), \(1, 2, 6, 4\)"):
        cpu_attention.attention(q, torch.randn(1, 2, 6, 4), q)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got 1.0"):
        cpu_attention.attention(q, q, q, 1.0)


def test_without_a_compiler_training_warns_once_and_takes_the_pytorch_path(monkeypatch):
    monkeypatch.setattr(cpu_attention, "_library", lambda: "no C compiler found")
    monkeypatch.setattr(cpu_attention, "_warned", False)
    calls = []
    monkeypatch.setattr(transformer, "_attention_cpu_dropout",
                        lambda *args: calls.append(1) or torch.zeros_like(args[0]))
    attention = transformer.MultiHeadAttention(8, 2, dropout=0.1, causal=True).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attention(torch.randn(2, 5, 8))
        attention(torch.randn(2, 5, 8))
    assert len(calls) == 2
    assert [str(w.message) for w in caught] == [
        "cpu_attention: no C compiler found; CPU training takes the slower PyTorch attention path"]

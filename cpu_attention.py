"""Fused causal attention with dropout for CPU training: one C kernel per (batch x head) matrix that never writes
the T x T weights to memory, and a backward pass that recomputes them (as FlashAttention does on a GPU).

    import cpu_attention
    out = cpu_attention.attention(q, k, v, dropout_p=0.1, causal=True)   # q, k, v: (B, H, T, d) float32 on the CPU

Why: at 16 heads the attention weights of one layer are 50 x 16 x 100 x 100 = 8M entries per step, which PyTorch's
eager ops (scores, softmax, keep-mask, product with V, and again backward) write and read several times each; that
traffic, not arithmetic, made a 16-head CPU step several times a 1-head step. Here a row of weights lives in a few
hundred bytes of stack, only the causal entries are computed, and only they draw random bits.

Dropout: each weight is kept with probability 1 - p and the kept ones scaled by 1 / (1 - p), as F.dropout does. The
keep bit of entry (matrix n, query i, key j) comes from Philox4x32-10 (Random123; the generator behind PyTorch's CUDA
dropout): word (j // 8) % 4 of the block at counter ((j // 32) * 8 + j % 8, i, n, 0), under a 64-bit key drawn from
torch's default generator once per call, kept when the word is >= round(p * 2^32): exact to 2^-33. Forward keeps the
keep bits (1 bit a weight) for backward. torch.manual_seed and get_rng_state / set_rng_state govern it as they
govern F.dropout, though the masks differ from F.dropout's (another generator).

The kernel is C, compiled on first use with the system's C compiler ($CC, else cc, gcc or clang), kept in the user's
cache for later processes, and called through ctypes. Its N matrices are shared among torch's intra-op
threads with OpenMP (linked after torch, it runs on torch's own OpenMP runtime); one matrix is computed by one
thread in a fixed order, so results do not depend on the thread count. Without a working compiler `available()` is
False and transformer.py keeps its PyTorch path (with a warning).
"""
import atexit
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from config import cache_dir

MAX_SEQ_LENGTH = 1024  # the kernel keeps nine rows of T + 32 floats on each thread's stack
VECTOR = 8  # V in the C source: keys per block, rows padded to a multiple of it

# The kernel's C source, beside this file; its text is part of every build's cache key.
C_SOURCE = (Path(__file__).resolve().parent / "cpu_attention.c").read_text()

# Tried in order, the first that compiles is used: -march=native for the CPU's widest vectors (and the AVX2 Philox),
# -fopenmp for threads, fused multiply-adds (-std=c99 alone turns their contraction off). Never
# -ffast-math: its startup code would change the whole process's floating-point mode.
COMPILE_FLAGS = (["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"],
                 ["-O3", "-march=native", "-ffp-contract=fast"], ["-O3"])
PORTABLE_FLAGS = ["-O2"]  # no vector extensions: the plain-C Philox path (tests compare it with the default build)
_disabled = False
_warned = False


def _compilers():
    names = [os.environ["CC"]] if os.environ.get("CC") else []
    return [path for path in dict.fromkeys(shutil.which(name) for name in names + ["cc", "gcc", "clang"]) if path]


def _machine():
    """What a -march=native build depends on: the CPU's model and feature flags (Linux), else the platform's names."""
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(sorted({line for line in f if line.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor() + platform.machine()


def compile_kernel(flags, compiler):
    """The kernel built with `compiler` and `flags`, loaded (a ctypes.CDLL); RuntimeError with the compiler's message
    if it does not build. Builds are kept in the user's cache (config.cache_dir()/cpu_attention), keyed by the
    source, compiler, flags and CPU, so that worker processes and later runs load instead of compiling."""
    compiler = os.path.realpath(compiler)
    key = hashlib.sha256(repr((C_SOURCE, compiler, os.stat(compiler).st_mtime, flags, _machine())).encode())
    try:
        folder = cache_dir() / "cpu_attention"
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # no writable cache: build for this process only
        folder = Path(tempfile.mkdtemp(prefix="cpu_attention_"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    target = folder / f"{key.hexdigest()[:20]}.so"
    if not target.is_file():
        with tempfile.TemporaryDirectory() as work:
            source, partial = Path(work, "cpu_attention.c"), f"{target}.{os.getpid()}.tmp"
            source.write_text(C_SOURCE)
            result = subprocess.run([compiler, *flags, "-std=c99", "-shared", "-fPIC", str(source), "-o", partial,
                                     "-lm"], capture_output=True, text=True)
            if result.returncode:
                raise RuntimeError(f"{compiler} {' '.join(flags)}: {result.stderr.strip()[-400:]}")
            os.replace(partial, target)  # whole, even when several processes build at once
    lib = ctypes.CDLL(str(target))
    ptr, i32, f32, u64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_uint64
    lib.attention_forward.argtypes = [ptr] * 6 + [i32] * 7 + [f32, f32, u64]
    lib.attention_backward.argtypes = [ptr] * 10 + [i32] * 7 + [f32, f32]
    lib.keep_mask.argtypes = [ptr, i32, i32, f32, u64]
    lib.philox4x32_10.argtypes = [ptr] * 3
    lib.exp_approx_into.argtypes = [ptr, ptr, i32]
    for fn in (lib.attention_forward, lib.attention_backward, lib.keep_mask, lib.philox4x32_10, lib.exp_approx_into):
        fn.restype = None
    lib.build = " ".join([os.path.basename(compiler), *flags])
    return lib


@cache
def _library():
    """The compiled kernel, or the reason there is none (a str)."""
    errors = []
    for compiler in _compilers():
        for flags in COMPILE_FLAGS:
            try:
                return compile_kernel(flags, compiler)
            except (RuntimeError, OSError) as error:
                errors.append(str(error))
    return "compilation failed: " + " | ".join(errors) if errors else "no C compiler found (cc, gcc, clang or $CC)"


def build():
    """How this process's kernel was built (compiler and flags), or why there is none."""
    return unavailable_reason() or _library().build


def unavailable_reason():
    """Why the kernel cannot run here, or None when it can."""
    lib = _library()
    return lib if isinstance(lib, str) else None


def available():
    """True when the kernel compiled here and is not switched off by `disabled()`."""
    return not _disabled and unavailable_reason() is None


@contextmanager
def disabled():
    """Within this block transformer.py takes its PyTorch path instead (bench.py times both)."""
    global _disabled
    before, _disabled = _disabled, True
    try:
        yield
    finally:
        _disabled = before


def usable(q):
    """Whether attention() can take q: float32 on the CPU, T <= MAX_SEQ_LENGTH, the kernel compiled and enabled."""
    return q.dtype == torch.float32 and q.device.type == "cpu" and q.shape[-2] <= MAX_SEQ_LENGTH and available()


def warn_if_unavailable():
    """One warning per process when CPU training has to take the slower PyTorch path."""
    global _warned
    reason = unavailable_reason()
    if reason and not _warned:
        _warned = True
        warnings.warn(f"cpu_attention: {reason}; CPU training takes the slower PyTorch attention path", stacklevel=2)


def _pointers(*tensors):
    return [ctypes.c_void_p(t.data_ptr()) for t in tensors]


class _FusedAttention(torch.autograd.Function):
    """(B, H, T, d) q, k, v -> (B, H, T, d). q, the output and their gradients live in (B, T, H, d) layout, the
    layout of the projections around them, so no head split or merge is copied; K^T and V^T are copied once,
    zero-padded to Tp keys. Saves q, K^T, V^T, the output, the row log-sum-exps and the keep bits."""

    @staticmethod
    def forward(ctx, q, k, v, dropout_p, causal, lib):
        B, H, T, d = q.shape
        Tp = -(-T // VECTOR) * VECTOR
        q = q.transpose(1, 2).contiguous()  # a view already, when q comes from a (B, T, H * d) projection
        kt, vt = q.new_zeros(B, H, d, Tp), q.new_zeros(B, H, d, Tp)
        kt[..., :T], vt[..., :T] = k.transpose(2, 3), v.transpose(2, 3)
        out, lse = torch.empty_like(q), q.new_empty(B * H, T)
        bits = torch.empty(B * H, T, -(-T // 32) if dropout_p > 0 else 0, dtype=torch.int32)  # the keep bits
        seed = int(torch.randint(0, 2 ** 63 - 1, (1,))) if dropout_p > 0 else 0
        ctx.lib, ctx.constants = lib, (T, Tp, d, H, int(causal), d ** -0.5, float(dropout_p))
        lib.attention_forward(*_pointers(q, kt, vt, out, lse, bits), B * H, _threads(B * H), *ctx.constants, seed)
        ctx.save_for_backward(q, kt, vt, out, lse, bits)
        return out.transpose(1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, kt, vt, out, lse, bits = ctx.saved_tensors
        dq, dkt, dvt = torch.empty_like(q), torch.empty_like(kt), torch.empty_like(vt)
        dout = dout.transpose(1, 2).contiguous()
        N, T = lse.shape
        ctx.lib.attention_backward(*_pointers(q, kt, vt, out, lse, bits, dout, dq, dkt, dvt), N, _threads(N),
                                   *ctx.constants)
        return dq.transpose(1, 2), dkt[..., :T].transpose(2, 3), dvt[..., :T].transpose(2, 3), None, None, None


def _threads(N):
    return max(1, min(torch.get_num_threads(), N))


def attention(q, k, v, dropout_p=0.0, causal=True, lib=None):
    """softmax(q k^T / sqrt(d) + causal mask) with dropout on the weights, @ v, for (B, H, T, d) float32 CPU
    tensors, differentiable in q, k and v. lib: a kernel from compile_kernel (default: this process's build)."""
    if lib is None and not usable(q):
        raise ValueError(f"cpu_attention.attention needs float32 CPU tensors with T <= {MAX_SEQ_LENGTH} and a compiled "
                         f"kernel; got {q.dtype} on {q.device} with T = {q.shape[-2]}"
                         f"{'; ' + unavailable_reason() if unavailable_reason() else ''}")
    if not (q.shape == k.shape == v.shape and q.dim() == 4):
        raise ValueError(f"q, k, v must have one shape (B, H, T, d); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return _FusedAttention.apply(q, k, v, dropout_p, causal, lib or _library())


def keep_mask(N, T, p, seed, lib=None):
    """The (N, T, T) bool keep-mask the kernel draws for `seed` (for tests: the same bits as attention's)."""
    mask = torch.empty(N, T, T, dtype=torch.uint8)
    (lib or _library()).keep_mask(ctypes.c_void_p(mask.data_ptr()), N, T, p, seed)
    return mask.bool()


def exp_approx(x, lib=None):
    """The kernel's vectorisable e^x on a float32 CPU tensor (for the accuracy test)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    (lib or _library()).exp_approx_into(*_pointers(x, out), x.numel())
    return out


def philox4x32_10(counter, key, lib=None):
    """One Philox4x32-10 block, the kernel's reference implementation: four 32-bit words (known-answer tests)."""
    c, k, out = (torch.tensor(x, dtype=torch.int64).to(torch.int32) for x in (counter, key, [0] * 4))
    (lib or _library()).philox4x32_10(*_pointers(c, k, out))
    return [int(x) & 0xFFFFFFFF for x in out]

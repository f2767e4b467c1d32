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

C_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Philox4x32-10 (Salmon et al. 2011, Random123): ctr -> out, key (k0, k1). */
void philox4x32_10(const uint32_t *ctr, const uint32_t *key, uint32_t *out)
{
    uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3], k0 = key[0], k1 = key[1];
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
        c0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0; c2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c1 = (uint32_t)p1; c3 = (uint32_t)p0;
        k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

/* mult[j] = kept if entry (n, i, j) is kept, else 0, for j < len rounded up to a multiple of 32. Keys come in
   tiles of 32: key j takes word (j / 8) % 4 of the Philox block at counter ((j / 32) * 8 + j % 8, i, n, 0), so that
   the eight blocks of a tile run side by side in the lanes of one AVX2 register. */
#ifdef __AVX2__
#include <immintrin.h>
/* (hi, lo) halves of the 32 x 32 -> 64-bit products a * m, lane by lane: even and odd lanes multiplied apart. */
static inline void mulhilo8(__m256i a, __m256i m, __m256i *hi, __m256i *lo)
{
    __m256i even = _mm256_mul_epu32(a, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

static void keep_row(float *restrict mult, int len, uint32_t i, uint32_t n, uint32_t key0, uint32_t key1,
                     uint32_t threshold, float kept)
{
    const __m256i m0 = _mm256_set1_epi32((int)0xD2511F53u), m1 = _mm256_set1_epi32((int)0xCD9E8D57u),
                  flip = _mm256_set1_epi32(INT32_MIN), limit = _mm256_set1_epi32((int)(threshold ^ 0x80000000u));
    const __m256 value = _mm256_set1_ps(kept);
    for (int tile = 0; tile < (len + 31) / 32; tile++) {
        __m256i c0 = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(8 * tile)),
                c1 = _mm256_set1_epi32((int)i), c2 = _mm256_set1_epi32((int)n), c3 = _mm256_setzero_si256(),
                hi0, lo0, hi1, lo1;
        uint32_t k0 = key0, k1 = key1;
        for (int r = 0; r < 10; r++) {
            mulhilo8(c0, m0, &hi0, &lo0);
            mulhilo8(c2, m1, &hi1, &lo1);
            c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32((int)k0));
            c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32((int)k1));
            c1 = lo1; c3 = lo0;
            k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
        }
        __m256i words[4] = {c0, c1, c2, c3};
        for (int w = 0; w < 4; w++) {  /* unsigned word >= threshold, as a signed compare of sign-flipped values */
            __m256i below = _mm256_cmpgt_epi32(limit, _mm256_xor_si256(words[w], flip));
            _mm256_storeu_ps(mult + 32 * tile + 8 * w, _mm256_andnot_ps(_mm256_castsi256_ps(below), value));
        }
    }
}
#else
static void keep_row(float *restrict mult, int len, uint32_t i, uint32_t n, uint32_t key0, uint32_t key1,
                     uint32_t threshold, float kept)
{
    for (int b = 0; b < 8 * ((len + 31) / 32); b++) {
        uint32_t ctr[4] = {(uint32_t)b, i, n, 0}, key[2] = {key0, key1}, word[4];
        philox4x32_10(ctr, key, word);
        for (int w = 0; w < 4; w++) mult[32 * (b / 8) + 8 * w + b % 8] = word[w] >= threshold ? kept : 0.0f;
    }
}
#endif

/* e^x in plain arithmetic that vectorizes (no libm call), relative error below 2e-7 on [-87, 88] (tested against
   double exp): x = n ln2 + r, |r| <= ln2/2, e^r by its degree-7 Taylor polynomial, 2^n from the exponent bits.
   0 below -87 (e^-87 < 2^-125), -inf included. */
static inline float exp_approx(float x)
{
    float y = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = (y * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  /* round to nearest */
    float r = y - n * 0.693145751953125f;
    r = r - n * 1.42860682030941723212e-6f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666667e-1f + r * (4.1666668e-2f + r * (8.3333333e-3f
              + r * (1.3888889e-3f + r * 1.9841270e-4f))))));
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.0f ? 0.0f : p * scale;
}

/* Rows are processed in blocks of V keys (one AVX2 register): a row of length len covers V * blocks(len) keys, the
   padding keys scoring -inf (weight 0). kt and vt are (d, Tp) per matrix, Tp = V * blocks(T), zero-padded. The hot
   loops use GCC/Clang vector types (vf: V floats), so that they vectorize along the keys whatever the compiler's
   heuristics; V partial sums are added in a fixed order. */
#define V 8
typedef float vf __attribute__((vector_size(4 * V)));
static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline int blocks(int len) { return (len + V - 1) / V; }
static inline float vsum(vf v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

/* Queries go R at a time, so that each load of a key, a value or a dK/dV entry serves R rows. */
#define R 4

/* s[r][j] = x[r] . kt[:, j] * scale (s rows W floats apart) for the R rows of x (R x d, packed) and the keys of blocks
   b0..b0+G-1 (G = 1 or 2): R x G independent sums, so that a long d does not make one chain of multiply-adds. */
static inline void block_products(float *restrict s, int W, const float *restrict x, const float *restrict kt, int d,
                                  int Tp, float scale, int b0, int G)
{
    vf acc[R][2] = {{0}};
    for (int c = 0; c < d; c++) {
        const float *kc = kt + (size_t)c * Tp + V * b0;
        vf k0 = load(kc), k1 = G > 1 ? load(kc + V) : k0;
        for (int r = 0; r < R; r++) {
            acc[r][0] += x[r * d + c] * k0;
            if (G > 1) acc[r][1] += x[r * d + c] * k1;
        }
    }
    for (int r = 0; r < R; r++)
        for (int g = 0; g < G; g++) store(s + r * W + V * (b0 + g), acc[r][g] * scale);
}

/* s[r][j] = x[r] . kt[:, j] * scale over blocks(width) blocks, for the R rows of a group. */
static inline void group_products(float *restrict s, int W, const float *restrict x, const float *restrict kt, int d,
                                  int Tp, int width, float scale)
{
    int nb = blocks(width), b = 0;
    for (; b + 2 <= nb; b += 2) block_products(s, W, x, kt, d, Tp, scale, b, 2);  /* constant G: unrolled */
    if (b < nb) block_products(s, W, x, kt, d, Tp, scale, b, 1);
}

/* The rows of a group (src rows ld floats apart) packed into x (R x d), rows past `rows` zero. */
static inline void gather_rows(float *restrict x, const float *restrict src, size_t ld, int rows, int d)
{
    for (int r = 0; r < R; r++)
        for (int c = 0; c < d; c++) x[r * d + c] = r < rows ? src[r * ld + c] : 0.0f;
}

/* The keep bits of a row's mult (1 bit a key, 32 keys a word) for backward, and back. */
static inline void pack_keep(uint32_t *restrict bits, const float *restrict mult, int width)
{
    for (int t = 0; t < (width + 31) / 32; t++) {
        uint32_t word = 0;
        for (int j = 0; j < 32; j++) word |= (uint32_t)(mult[32 * t + j] != 0.0f) << j;
        bits[t] = word;
    }
}

static inline void unpack_keep(float *restrict mult, const uint32_t *restrict bits, int width, float kept)
{
    for (int t = 0; t < (width + 31) / 32; t++)
        for (int j = 0; j < 32; j++) mult[32 * t + j] = (bits[t] >> j) & 1u ? kept : 0.0f;
}

static inline void row_dropout(float *restrict mult, int len, int i, int n, float p, uint64_t seed, float kept)
{
    if (p > 0.0f) {
        keep_row(mult, len, (uint32_t)i, (uint32_t)n, (uint32_t)seed, (uint32_t)(seed >> 32),
                 (uint32_t)llround((double)p * 4294967296.0), kept);
    } else {
        for (int j = 0; j < V * blocks(len); j++) mult[j] = kept;
    }
}

/* Where row 0 of matrix n = (batch b, head h) starts in a (B, T, H, d) tensor: rows follow at a stride of H * d. */
static inline size_t first_row(int n, int T, int H, int d) { return ((size_t)(n / H) * T * H + n % H) * d; }

/* Matrix n of q (B,T,H,d), kt and vt (N,d,Tp), N = B * H: out (B,T,H,d), lse (N,T) = log-sum-exp of each score
   row, and with dropout the keep bits (N, T, ceil(T / 32) words) for backward. */
static void forward_matrix(const float *q, const float *kt, const float *vt, float *out, float *lse, uint32_t *bits,
                           int n, int T, int Tp, int d, int H, int causal, float scale, float p, uint64_t seed)
{
    const int W = T + 32;
    float s[R][W], mult[W], x[R * d];
    const float *ktn = kt + (size_t)n * d * Tp, *vtn = vt + (size_t)n * d * Tp;
    size_t row0 = first_row(n, T, H, d), ld = (size_t)H * d;
    for (int i0 = 0; i0 < T; i0 += R) {
        int rows = T - i0 < R ? T - i0 : R, width = causal ? i0 + rows : T, nb = blocks(width);
        gather_rows(x, q + row0 + i0 * ld, ld, rows, d);
        group_products(&s[0][0], W, x, ktn, d, Tp, width, scale);
        for (int r = 0; r < R; r++) {  /* s[r] = A~ of row i0 + r: softmax, dropout, 1 / (1 - p); zero past its keys */
            int i = i0 + r, len = causal ? i + 1 : T;
            if (r >= rows) {  /* a short last group: a row of zeros */
                for (int j = 0; j < V * nb; j++) s[r][j] = 0.0f;
                continue;
            }
            for (int j = len; j < V * nb; j++) s[r][j] = -INFINITY;
            float top[V], mx = -INFINITY, parts[V] = {0};
            for (int l = 0; l < V; l++) top[l] = -INFINITY;
            for (int b = 0; b < nb; b++)
                for (int l = 0; l < V; l++) top[l] = s[r][V * b + l] > top[l] ? s[r][V * b + l] : top[l];
            for (int l = 0; l < V; l++) mx = top[l] > mx ? top[l] : mx;
            for (int b = 0; b < nb; b++)
                for (int l = 0; l < V; l++) {
                    s[r][V * b + l] = exp_approx(s[r][V * b + l] - mx);
                    parts[l] += s[r][V * b + l];
                }
            float sum = vsum(load(parts));
            row_dropout(mult, width, i, n, p, seed, 1.0f / ((1.0f - p) * sum));
            if (p > 0.0f) pack_keep(bits + ((size_t)n * T + i) * ((T + 31) / 32), mult, width);
            for (int j = 0; j < V * nb; j++) s[r][j] *= mult[j];
            lse[(size_t)n * T + i] = mx + logf(sum);
        }
        float *o0 = out + row0 + i0 * ld;
        for (int c = 0; c < d; c++) {
            const float *vc = vtn + (size_t)c * Tp;
            vf acc[R] = {0};
            for (int b = 0; b < nb; b++) {
                vf v = load(vc + V * b);
                for (int r = 0; r < R; r++) acc[r] += load(&s[r][V * b]) * v;
            }
            for (int r = 0; r < rows; r++) o0[r * ld + c] = vsum(acc[r]);
        }
    }
}

/* Gradients of matrix n from dout (B,T,H,d): dq (B,T,H,d), dkt and dvt (N,d,Tp). With A = softmax(S) and
   A~ = A * keep / (1 - p): dV = A~^T dO, dA~ = dO V^T, dS = A * (dA~ * keep / (1 - p) - rowsum(dO * O)).
   Queries go R at a time. */
static void backward_matrix(const float *q, const float *kt, const float *vt, const float *out, const float *lse,
                            const uint32_t *bits, const float *dout, float *dq, float *dkt, float *dvt, int n, int T,
                            int Tp, int d, int H, int causal, float scale, float p)
{
    const int W = T + 32;
    float a[R][W], mult[W], ds[R][W], x[R * d], g[R * d];
    size_t row0 = first_row(n, T, H, d), ld = (size_t)H * d;
    const float *ktn = kt + (size_t)n * d * Tp, *vtn = vt + (size_t)n * d * Tp;
    float *dktn = dkt + (size_t)n * d * Tp, *dvtn = dvt + (size_t)n * d * Tp;
    memset(dktn, 0, sizeof(float) * d * Tp);
    memset(dvtn, 0, sizeof(float) * d * Tp);
    for (int i0 = 0; i0 < T; i0 += R) {
        int rows = T - i0 < R ? T - i0 : R, width = causal ? i0 + rows : T, nb = blocks(width);
        gather_rows(x, q + row0 + i0 * ld, ld, rows, d);
        gather_rows(g, dout + row0 + i0 * ld, ld, rows, d);
        group_products(&a[0][0], W, x, ktn, d, Tp, width, scale);   /* scores */
        group_products(&ds[0][0], W, g, vtn, d, Tp, width, 1.0f);   /* dA~ */
        for (int r = 0; r < rows; r++) {  /* a[r] = A~ and ds[r] = dS * scale of row i0 + r, zero past its keys */
            int i = i0 + r, len = causal ? i + 1 : T;
            const float *oi = out + row0 + i * ld;
            float l_i = lse[(size_t)n * T + i], rowsum = 0.0f;
            for (int j = len; j < V * nb; j++) a[r][j] = -INFINITY;
            for (int j = 0; j < V * nb; j++) a[r][j] = exp_approx(a[r][j] - l_i);
            if (p > 0.0f) unpack_keep(mult, bits + ((size_t)n * T + i) * ((T + 31) / 32), width, 1.0f / (1.0f - p));
            else for (int j = 0; j < V * nb; j++) mult[j] = 1.0f;
            for (int c = 0; c < d; c++) rowsum += g[r * d + c] * oi[c];
            for (int j = 0; j < V * nb; j++) {
                ds[r][j] = a[r][j] * (ds[r][j] * mult[j] - rowsum) * scale;
                a[r][j] *= mult[j];
            }
        }
        for (int r = rows; r < R; r++)  /* a short last group: rows of zeros */
            for (int j = 0; j < V * nb; j++) a[r][j] = ds[r][j] = 0.0f;
        float *dq0 = dq + row0 + i0 * ld;
        for (int c = 0; c < d; c++) {
            const float *kc = ktn + (size_t)c * Tp;
            float *dkc = dktn + (size_t)c * Tp, *dvc = dvtn + (size_t)c * Tp;
            vf acc[R] = {0};
            for (int b = 0; b < nb; b++) {
                vf k = load(kc + V * b), dk = load(dkc + V * b), dv = load(dvc + V * b);
                for (int r = 0; r < R; r++) {
                    vf dsr = load(&ds[r][V * b]);
                    acc[r] += dsr * k;
                    dk += dsr * x[r * d + c];
                    dv += load(&a[r][V * b]) * g[r * d + c];
                }
                store(dkc + V * b, dk);
                store(dvc + V * b, dv);
            }
            for (int r = 0; r < rows; r++) dq0[r * ld + c] = vsum(acc[r]);
        }
    }
}

/* The exported entry points: the N matrices shared among `threads` OpenMP threads, one matrix per thread at a time
   (so results do not depend on the thread count). Compiled with -fopenmp after torch is loaded, the OpenMP runtime
   is torch's own (same soname), whose threads are already running; without OpenMP the loop is serial. */
void attention_forward(const float *q, const float *kt, const float *vt, float *out, float *lse, uint32_t *bits, int N,
                       int threads, int T, int Tp, int d, int H, int causal, float scale, float p, uint64_t seed)
{
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n++) forward_matrix(q, kt, vt, out, lse, bits, n, T, Tp, d, H, causal, scale, p, seed);
}

void attention_backward(const float *q, const float *kt, const float *vt, const float *out, const float *lse,
                        const uint32_t *bits, const float *dout, float *dq, float *dkt, float *dvt, int N, int threads,
                        int T, int Tp, int d, int H, int causal, float scale, float p)
{
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n++)
        backward_matrix(q, kt, vt, out, lse, bits, dout, dq, dkt, dvt, n, T, Tp, d, H, causal, scale, p);
}

/* exp_approx over an array, for the tests. */
void exp_approx_into(const float *x, float *out, int n)
{
    for (int i = 0; i < n; i++) out[i] = exp_approx(x[i]);
}

/* The keep-mask itself, (N,T,T) bytes (1 kept), for tests: the same bits as the kernels use. */
void keep_mask(uint8_t *mask, int N, int T, float p, uint64_t seed)
{
    float mult[T + 32];
    for (int n = 0; n < N; n++)
        for (int i = 0; i < T; i++) {
            row_dropout(mult, T, i, n, p, seed, 1.0f);
            for (int j = 0; j < T; j++) mask[((size_t)n * T + i) * T + j] = mult[j] != 0.0f;
        }
}
"""

# Tried in order, the first that compiles is used: -march=native for the CPU's widest vectors (and the AVX2 Philox),
# -fopenmp for threads, fused multiply-adds (-std=c99 alone turns their contraction off: 15% slower). Never
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

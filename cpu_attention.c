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
    vf acc[R][2] = {{{0}}};
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
    (void)threads;  /* read only by the OpenMP pragma: unused in a serial build */
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n++) forward_matrix(q, kt, vt, out, lse, bits, n, T, Tp, d, H, causal, scale, p, seed);
}

void attention_backward(const float *q, const float *kt, const float *vt, const float *out, const float *lse,
                        const uint32_t *bits, const float *dout, float *dq, float *dkt, float *dvt, int N, int threads,
                        int T, int Tp, int d, int H, int causal, float scale, float p)
{
    (void)threads;
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

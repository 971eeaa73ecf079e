// AMX-bf16 kernels (built with AVX-512, -mavx512bf16, -mamx-tile, -mamx-bf16; their entry points in linear.c and
// attention.c check the CPU first):
//
// amx_bf16_linear: weight-only int8 linear layer on Intel AMX: y = act(x W^T + b) [+ residual], W = int8
// values x one scale per output channel and group of inputs; act is none or GELU (erf); x, y, residual bf16.
// Why: a short query is memory-bound (each weight byte is read once for a dozen rows), so weights stored in
// int8 halve the bytes of bf16. Each step of weights is widened to bf16 (value x its group's scale) in L1 and
// multiplied on the AMX units.
//   packed [N/32][K/32][2][16][16][2] int8: per block of 32 outputs and step of 32 inputs, two AMX B tiles of
//          16 (input pair) x 16 (output) x 2 (input within the pair);
//   scales [N/32][K/group][2][32] fp32: per block, group and tile, the scale of each lane of a widened row
//          (lane j belongs to output j / 2), so widening is one multiply per 16 weights.
//
// amx_short_attention: softmax(q k^T * scale + bias) v for blocks of at most 32 tokens, one head at a time,
// in fp32 registers. Why: for such blocks SDPA's CPU kernel is all fixed cost (~60 us a layer for one query,
// against ~14 us here), and a single query runs 12 of them.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx_tiles.h"
#include "internal.h"
#include "simd_math.h"

#define STEP_K 32     // inputs per B tile (16 rows of bf16 pairs)
#define BLOCK_N 32    // outputs per block: two 16-column tiles
#define CHUNK_M 32    // rows per pass over a block: two 16-row tiles
#define BLOCK_M 256   // rows whose activations stay in L2 while a block's widened weights are reused
#define PREFETCH_AHEAD 4096  // bytes of packed weights requested ahead of the step being widened (4 steps)

// Tiles (amx_tiles.h): A = x rows, B = widened weights of 16 outputs each, 4 sums.

// GELU(v) = v / 2 (1 + erf(v / sqrt 2)), erf by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7; the result
// is rounded to bf16, ~4e-3 relative, anyway)
static inline __m512 gelu16(__m512 v) {
    const __m512 x = _mm512_abs_ps(_mm512_mul_ps(v, _mm512_set1_ps(0.707106781f)));
    const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(x, _mm512_set1_ps(0.3275911f),
                                                                         _mm512_set1_ps(1.0f)));
    __m512 p = _mm512_set1_ps(1.061405429f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    p = _mm512_mul_ps(p, t);
    const __m512 erf_abs = _mm512_fnmadd_ps(p, exp_nonpositive16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(x, x))),
                                            _mm512_set1_ps(1.0f));
    const __m512 half_v = _mm512_mul_ps(v, _mm512_set1_ps(0.5f));
    // v / 2 (1 + sign(v) erf|.|) = v / 2 + |v| / 2 erf|.|
    return _mm512_fmadd_ps(_mm512_abs_ps(half_v), erf_abs, half_v);
}

static inline __m512 widen16(const int8_t *src, __m512 scale) {
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)src))), scale);
}

// One step (32 outputs x 32 inputs) of int8 weights -> bf16 B tiles. Fully unrolled: as a loop it ran ~1.5x
// slower (fewer weight loads in flight).
static inline void widen_step(const int8_t *src, const float *scales, uint16_t *dst) {
    // every line of a later step, not just its first: ~20% faster than leaving the rest to the hardware prefetcher
    for (int line = 0; line < 1024; line += 64) _mm_prefetch((const char *)(src + PREFETCH_AHEAD + line), _MM_HINT_T0);
    for (int t = 0; t < 2; t++) {
        const __m512 lo = _mm512_loadu_ps(scales + 32 * t), hi = _mm512_loadu_ps(scales + 32 * t + 16);
        _Pragma("GCC unroll 16") for (int i = 512 * t; i < 512 * (t + 1); i += 32) {
            __m512bh pair = _mm512_cvtne2ps_pbh(widen16(src + i + 16, hi), widen16(src + i, lo));
            _mm512_storeu_si512((void *)(dst + i), (__m512i)pair);
        }
    }
}

typedef struct {
    const uint16_t *x;
    const int8_t *packed;
    const float *scales, *bias;
    const uint16_t *residual;
    uint16_t *y;
    int64_t M, N, K, group;
    int gelu;
} amx_linear_args;

// Rows [m0, m0 + rows) x block nb's 32 outputs. widen: 0 = the block's weights are already widened in `panel`;
// 1 = widen them step by step into `panel` for later chunks to reuse; 2 = widen each step into a small buffer
// (no later chunk: the step stays in L1 instead of spilling the whole panel to L2).
static void multiply_chunk(const amx_linear_args *a, int64_t nb, uint16_t *panel, int widen, int64_t m0, int rows) {
    const int64_t K = a->K, n0 = nb * BLOCK_N;
    const int8_t *block = a->packed + nb * K * BLOCK_N;
    const float *block_scales = a->scales + nb * (K / a->group) * 64;
    const int rows0 = rows < 16 ? rows : 16, rows1 = rows - rows0;
    float sums[CHUNK_M][BLOCK_N] __attribute__((aligned(64)));
    uint16_t step[2 * 512] __attribute__((aligned(64)));
    _tile_zero(4); _tile_zero(5);
    if (rows1) { _tile_zero(6); _tile_zero(7); }
    for (int64_t k = 0; k < K; k += STEP_K) {
        uint16_t *b = widen == 2 ? step : panel + k * BLOCK_N;
        if (widen) widen_step(block + k * BLOCK_N, block_scales + (k / a->group) * 64, b);
        _tile_loadd(2, b, 64);
        _tile_loadd(3, b + 512, 64);
        _tile_loadd(0, a->x + m0 * K + k, K * 2);
        _tile_dpbf16ps(4, 0, 2);
        _tile_dpbf16ps(5, 0, 3);
        if (rows1) {
            _tile_loadd(1, a->x + (m0 + 16) * K + k, K * 2);
            _tile_dpbf16ps(6, 1, 2);
            _tile_dpbf16ps(7, 1, 3);
        }
    }
    _tile_stored(4, &sums[0][0], BLOCK_N * 4);
    _tile_stored(5, &sums[0][16], BLOCK_N * 4);
    if (rows1) {
        _tile_stored(6, &sums[16][0], BLOCK_N * 4);
        _tile_stored(7, &sums[16][16], BLOCK_N * 4);
    }
    const __m512 b0 = a->bias ? _mm512_loadu_ps(a->bias + n0) : _mm512_setzero_ps();
    const __m512 b1 = a->bias ? _mm512_loadu_ps(a->bias + n0 + 16) : _mm512_setzero_ps();
    for (int m = 0; m < rows; m++) {
        __m512 v0 = _mm512_add_ps(_mm512_load_ps(sums[m]), b0);
        __m512 v1 = _mm512_add_ps(_mm512_load_ps(sums[m] + 16), b1);
        if (a->gelu) { v0 = gelu16(v0); v1 = gelu16(v1); }
        const int64_t at = (m0 + m) * a->N + n0;
        if (a->residual) {
            const __m512i r = _mm512_loadu_si512((const void *)(a->residual + at));
            v0 = _mm512_add_ps(v0, bf16_to_fp32(_mm512_castsi512_si256(r)));
            v1 = _mm512_add_ps(v1, bf16_to_fp32(_mm512_extracti64x4_epi64(r, 1)));
        }
        _mm512_storeu_si512((void *)(a->y + at), (__m512i)_mm512_cvtne2ps_pbh(v1, v0));
    }
}

// Each thread keeps one panel buffer for the life of the process (freeing and reallocating it per call would cost
// page faults: panels are up to 192 KB, above malloc's mmap threshold).
static uint16_t *thread_panel(size_t weights) {
    static __thread uint16_t *panel = NULL;
    static __thread size_t capacity = 0;
    if (weights > capacity) {
        free(panel);
        panel = aligned_alloc(64, weights * 2);
        capacity = panel ? weights : 0;
    }
    return panel;
}

// x (M, K), packed, scales, bias (N,) fp32 or NULL, residual (M, N) or NULL -> y (M, N); gelu: 0 or 1. N and K
// are multiples of 32, K of group, group of 32. Returns 0, or -1 when a thread could not get its panel buffer.
int amx_bf16_linear(const uint16_t *x, const int8_t *packed, const float *scales, int64_t group,
                         const float *bias, const uint16_t *residual, uint16_t *y, int64_t M, int64_t N, int64_t K,
                         int gelu, int threads) {
    const amx_linear_args args = {x, packed, scales, bias, residual, y, M, N, K, group, gelu};
    int failed = 0;
    for (int64_t mb = 0; mb < M; mb += BLOCK_M) {
        const int64_t mb_rows = M - mb < BLOCK_M ? M - mb : BLOCK_M;
        #pragma omp parallel num_threads(threads) reduction(|:failed)
        {
            uint16_t *panel = thread_panel((size_t)(K * BLOCK_N));
            int configured = -1;
            failed |= panel == NULL;
            #pragma omp for schedule(static)
            for (int64_t nb = 0; nb < N / BLOCK_N; nb++) {
                for (int64_t m0 = mb; panel && m0 < mb + mb_rows; m0 += CHUNK_M) {
                    const int rows = (int)(mb + mb_rows - m0 < CHUNK_M ? mb + mb_rows - m0 : CHUNK_M);
                    if (rows != configured) {
                        configure_tiles(rows < 16 ? rows : 16, rows > 16 ? rows - 16 : 0);
                        configured = rows;
                    }
                    multiply_chunk(&args, nb, panel, m0 > mb ? 0 : mb_rows > CHUNK_M ? 1 : 2, m0, rows);
                }
            }
            if (configured >= 0) _tile_release();
        }
    }
    return failed ? -1 : 0;
}

#define MAX_BLOCK_TOKENS ALLMPNET_AMX_MAX_BLOCK_TOKENS
#define MAX_HEAD_DIM ALLMPNET_AMX_MAX_HEAD_DIM

// qkv (N, 3 H D) and out (N, H D) bf16, packed rows; a group of `blocks` blocks of T <= 32 tokens from row
// `start` on; bias (H, T, T) fp32 (the position bias, -1e30-like between rows sharing a block). D: a multiple
// of 16, at most 128.
void amx_short_attention(const uint16_t *qkv, uint16_t *out, const float *bias, float scale, int64_t start,
                              int64_t blocks, int64_t T, int64_t H, int64_t D, int threads) {
    const int64_t C = H * D;
    const __mmask16 valid0 = (__mmask16)(T >= 16 ? 0xFFFF : (1u << T) - 1);
    const __mmask16 valid1 = (__mmask16)(T >= 32 ? 0xFFFF : T <= 16 ? 0 : (1u << (T - 16)) - 1);
    #pragma omp parallel num_threads(threads)
    {
        // keys that score far below a row's best weigh ~1e-38: their products would be denormals, which cost Intel
        // cores microcode assists; flushed to zero (FTZ, DAZ) instead, this thread's setting restored after
        const unsigned int control = _mm_getcsr();
        _mm_setcsr(control | 0x8040);
        #pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            for (int64_t h = 0; h < H; h++) {
                // keys transposed (D, 32), so one query's 32 scores are two vectors of FMAs; zero past T
                float keys[MAX_HEAD_DIM][MAX_BLOCK_TOKENS] __attribute__((aligned(64)));
                float values[MAX_BLOCK_TOKENS][MAX_HEAD_DIM] __attribute__((aligned(64)));
                float row[MAX_HEAD_DIM] __attribute__((aligned(64)));
                const int64_t row0 = start + b * T;
                for (int64_t j = 0; j < MAX_BLOCK_TOKENS; j++) {
                    const uint16_t *k = qkv + (row0 + j) * 3 * C + C + h * D, *v = k + C;
                    for (int64_t d = 0; d < D; d += 16) {
                        const __m512 kd = j < T ? bf16_to_fp32(_mm256_loadu_si256((const __m256i *)(k + d)))
                                                : _mm512_setzero_ps();
                        _mm512_store_ps(row, kd);
                        for (int e = 0; e < 16; e++) keys[d + e][j] = row[e];
                        if (j < T)
                            _mm512_store_ps(values[j] + d, bf16_to_fp32(_mm256_loadu_si256((const __m256i *)(v + d))));
                    }
                }
                for (int64_t i = 0; i < T; i++) {
                    const uint16_t *q = qkv + (row0 + i) * 3 * C + h * D;
                    for (int64_t d = 0; d < D; d += 16)
                        _mm512_store_ps(row + d, bf16_to_fp32(_mm256_loadu_si256((const __m256i *)(q + d))));
                    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
                    for (int64_t d = 0; d < D; d++) {
                        const __m512 qd = _mm512_set1_ps(row[d]);
                        s0 = _mm512_fmadd_ps(qd, _mm512_load_ps(keys[d]), s0);
                        s1 = _mm512_fmadd_ps(qd, _mm512_load_ps(keys[d] + 16), s1);
                    }
                    const float *bias_row = bias + (h * T + i) * T;
                    const __m512 far = _mm512_set1_ps(-1e30f), by = _mm512_set1_ps(scale);
                    s0 = _mm512_fmadd_ps(s0, by, _mm512_maskz_loadu_ps(valid0, bias_row));
                    s1 = _mm512_fmadd_ps(s1, by, _mm512_maskz_loadu_ps(valid1, bias_row + 16));
                    s0 = _mm512_mask_blend_ps(valid0, far, s0);  // lanes past T take no weight
                    s1 = _mm512_mask_blend_ps(valid1, far, s1);
                    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(_mm512_max_ps(s0, s1)));
                    const __m512 p0 = _mm512_maskz_mov_ps(valid0, exp_nonpositive16(_mm512_sub_ps(s0, top)));
                    const __m512 p1 = _mm512_maskz_mov_ps(valid1, exp_nonpositive16(_mm512_sub_ps(s1, top)));
                    const __m512 norm = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(_mm512_add_ps(p0, p1)));
                    float weights[MAX_BLOCK_TOKENS] __attribute__((aligned(64)));
                    _mm512_store_ps(weights, _mm512_mul_ps(p0, norm));
                    _mm512_store_ps(weights + 16, _mm512_mul_ps(p1, norm));
                    uint16_t *o = out + (row0 + i) * C + h * D;
                    for (int64_t d = 0; d < D; d += 16) {
                        __m512 sum = _mm512_setzero_ps();
                        for (int64_t j = 0; j < T; j++)
                            sum = _mm512_fmadd_ps(_mm512_set1_ps(weights[j]), _mm512_load_ps(values[j] + d), sum);
                        _mm256_storeu_si256((__m256i *)(o + d), (__m256i)_mm512_cvtneps_pbh(sum));
                    }
                }
            }
        }
        _mm_setcsr(control);
    }
}

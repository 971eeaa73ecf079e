// The bf16 products' side of the attention (attention_bf16.c, attention_amx.c: AVX-512 with -mavx512bf16): with
// bf16 q|k|v both products are vdpbf16ps pair dot products (twice the fp32 FMA rate): keys as pairs of inputs
// (k[2p], k[2p+1]) per key, values as pairs of keys (v_2q[d], v_2q+1[d]) per output, so one 32-bit broadcast of a
// query's pair, or of two exp values rounded to bf16 (as SDPA's bf16 path rounds its probabilities; under 64
// tokens, two bf16 parts of each), meets 16 keys (outputs) per vector.
#ifndef ALLMPNET_ATTENTION_BF16_H
#define ALLMPNET_ATTENTION_BF16_H
#include "attention_avx512.h"

// the same with bf16 pairs: queries' pairs read in place, keys (D/2 x padded) pairs
static inline __attribute__((always_inline)) void score_tile_bf16(
    const uint32_t *const *q, const uint32_t *keys, int64_t padded, int V, int64_t j0, int64_t T,
    const float *const *bias, float scale, float *scores, __m512 *top) {
    __m512 s[ATTENTION_ROWS][4];
    __m512bh k[4];
    for (int r = 0; r < ATTENTION_ROWS; r++)
        for (int v = 0; v < V; v++) s[r][v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < ATTENTION_D / 2; p++) {
        for (int v = 0; v < V; v++) k[v] = (__m512bh)_mm512_load_si512(keys + p * padded + j0 + 16 * v);
        for (int r = 0; r < ATTENTION_ROWS; r++) {
            const __m512bh qp = (__m512bh)_mm512_set1_epi32((int)q[r][p]);
            for (int v = 0; v < V; v++) s[r][v] = _mm512_dpbf16_ps(s[r][v], qp, k[v]);
        }
    }
    store_scores(s, V, j0, T, bias, scale, scores, padded, top);
}

static inline __attribute__((always_inline)) void score_rows_bf16(const uint32_t *const *q, const uint32_t *keys,
                                                                 int64_t padded, int64_t T, const float *const *b,
                                                                 float scale, float *scores, __m512 *top) {
    int64_t j0 = 0;
    for (; j0 + 64 <= padded; j0 += 64) score_tile_bf16(q, keys, padded, 4, j0, T, b, scale, scores, top);
    switch ((padded - j0) / 16) {
        case 3: score_tile_bf16(q, keys, padded, 3, j0, T, b, scale, scores, top); break;
        case 2: score_tile_bf16(q, keys, padded, 2, j0, T, b, scale, scores, top); break;
        case 1: score_tile_bf16(q, keys, padded, 1, j0, T, b, scale, scores, top); break;
    }
}

// exponentiate's one-part bf16 weights (blocks of 64 tokens and more): a shorter exp polynomial and this CPU's own
// rounding instruction (16 x 256-token blocks: -8% of the attention's time)
static inline __attribute__((always_inline)) float exponentiate_bf16(
    const float *row, uint16_t *weights, int64_t T, int64_t padded, __m512 top) {
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < padded; j += 16) {
        const __m512 e = _mm512_maskz_mov_ps(keys_before(T, j),
                                             exp_nonpositive16_for_bf16(_mm512_sub_ps(_mm512_load_ps(row + j), m)));
        _mm256_store_si256((__m256i *)(weights + j), (__m256i)_mm512_cvtneps_pbh(e));
        total = _mm512_add_ps(total, e);
    }
    return 1.0f / _mm512_reduce_add_ps(total);
}

// exponentiate as two bf16 parts, the rounded value and what that rounding left out (~16 bits together)
static inline __attribute__((always_inline)) float exponentiate_two_bf16(
    const float *row, uint16_t *weights, uint16_t *rest, int64_t T, int64_t padded, __m512 top) {
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < padded; j += 16) {
        const __m512 x = _mm512_sub_ps(_mm512_load_ps(row + j), m);
        const __m512 e = _mm512_maskz_mov_ps(keys_before(T, j), exp_nonpositive16(x));
        const __m256bh high = _mm512_cvtneps_pbh(e);
        _mm256_store_si256((__m256i *)(weights + j), (__m256i)high);
        const __m512 left = _mm512_sub_ps(e, bf16_to_fp32((__m256i)high));
        _mm256_store_si256((__m256i *)(rest + j), (__m256i)_mm512_cvtneps_pbh(left));
        total = _mm512_add_ps(total, e);
    }
    return 1.0f / _mm512_reduce_add_ps(total);
}

// A bf16 block's keys and values as the pair products and the tiles read them (row j of the block at rows + j * 3C,
// zero past T): keys (D / 2, padded) pairs of inputs per key, values (padded / 2, D, 2) keys j, j + 1 interleaved
// per output.
static inline void stage_pairs(const uint16_t *rows, int64_t T, int64_t C, int64_t padded,
                                                        uint32_t *keys, uint16_t *values) {
    const int64_t D = ATTENTION_D;
    stage_transposed(rows + C, 0, 3 * C / 2, T, D / 2, keys, padded);
    const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                         39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0),
                  high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
    for (int64_t j = 0; j < padded; j += 2) {  // keys j, j + 1 interleaved per output
        const uint16_t *a = rows + j * 3 * C + 2 * C, *b = a + 3 * C;
        for (int half = 0; half < 2; half++) {
            const __m512i x = j < T ? _mm512_loadu_si512(a + 32 * half) : _mm512_setzero_si512(),
                          y = j + 1 < T ? _mm512_loadu_si512(b + 32 * half) : _mm512_setzero_si512();
            _mm512_store_si512(values + j * D + 64 * half, _mm512_permutex2var_epi16(x, low, y));
            _mm512_store_si512(values + j * D + 64 * half + 32, _mm512_permutex2var_epi16(x, high, y));
        }
    }
}
#endif

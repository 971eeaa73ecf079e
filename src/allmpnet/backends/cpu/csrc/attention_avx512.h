// What the AVX-512 attention heads share (attention_avx512.c, attention_bf16.c, attention_amx.c, each built with
// AVX-512 and its own products): staging a block's keys, the scores leaving the registers, the softmax.
//
// Per (block, head) the keys are laid out transposed once (16 x 16 register transposes), and ATTENTION_ROWS query
// rows at a time take their scores in registers, 16 keys per vector (only as many vectors as T needs). The scale,
// the bias and the running maximum are applied as the scores leave the registers, exp and its sum in one pass;
// the weighted values are summed unnormalised and divided by the sum at the end. Scores, softmax and sums stay
// fp32 whatever the products.
#ifndef ALLMPNET_ATTENTION_AVX512_H
#define ALLMPNET_ATTENTION_AVX512_H
#include <immintrin.h>

#include "internal.h"
#include "simd_math.h"

// 16 32-bit lanes at element `index` of p: fp32 / bf16 pairs as they are, or (widen) 16 bf16 as fp32
static inline __attribute__((always_inline)) __m512i load16(const void *p, int64_t index,
                                                                             int widen) {
    if (widen)
        return _mm512_castps_si512(bf16_to_fp32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + index))));
    return _mm512_loadu_si512((const uint32_t *)p + index);
}

// r[i][e] -> r[e][i]: within 128-bit lanes, then the lanes themselves
static inline __attribute__((always_inline)) void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  // r[i + c], lane L: column 4L + c of rows i..i+3
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int c = 0; c < 4; c++) {
        const __m512i x0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88), x1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xDD),
                      y0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88),
                      y1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xDD);
        t[c] = _mm512_shuffle_i32x4(x0, y0, 0x88);
        t[4 + c] = _mm512_shuffle_i32x4(x1, y1, 0x88);
        t[8 + c] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
        t[12 + c] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

// dst (columns x padded): column c of the T rows (row j at src + j * stride, `columns` 32-bit lanes, or bf16
// widened), zero past T
static inline void stage_transposed(const void *src, int widen, int64_t stride, int64_t T,
                                                             int64_t columns, uint32_t *dst, int64_t padded) {
    for (int64_t j0 = 0; j0 < padded; j0 += 16)
        for (int64_t c0 = 0; c0 < columns; c0 += 16) {
            __m512i r[16];
            for (int i = 0; i < 16; i++)
                r[i] = j0 + i < T ? load16(src, (j0 + i) * stride + c0, widen) : _mm512_setzero_si512();
            transpose16(r);
            for (int i = 0; i < 16; i++) _mm512_store_si512(dst + (c0 + i) * padded + j0, r[i]);
        }
}

// 16 fp32 -> bf16, to nearest even as bf16_round (and vcvtneps2bf16, which CPUs without AVX512-BF16 lack)
static inline __attribute__((always_inline)) __m256i bf16_round16(__m512 x) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd,
                                                                       _mm512_set1_epi32(0x7fff))), 16));
}

static inline __attribute__((always_inline)) __mmask16 keys_before(int64_t T, int64_t j) {
    return j + 16 <= T ? (__mmask16)0xFFFF : j < T ? (__mmask16)((1u << (T - j)) - 1) : (__mmask16)0;
}

// scores s (ATTENTION_ROWS x V vectors from key j0) -> scale x s + bias, -inf past T, into scores; row maxima
static inline __attribute__((always_inline)) void store_scores(
    __m512 s[ATTENTION_ROWS][4], int V, int64_t j0, int64_t T, const float *const *bias, float scale,
    float *scores, int64_t padded, __m512 *top) {
    for (int v = 0; v < V; v++) {
        const int64_t j = j0 + 16 * v;
        const __mmask16 real = keys_before(T, j);
        for (int r = 0; r < ATTENTION_ROWS; r++) {
            __m512 x = _mm512_fmadd_ps(s[r][v], _mm512_set1_ps(scale), _mm512_maskz_loadu_ps(real, bias[r] + j));
            x = _mm512_mask_blend_ps(real, _mm512_set1_ps(-__builtin_inff()), x);
            _mm512_store_ps(scores + r * padded + j, x);
            top[r] = _mm512_max_ps(top[r], x);
        }
    }
}

// V (1-4) vectors of 16 keys from j0: fp32 queries (ATTENTION_ROWS x D) against keys (D x padded)
static inline __attribute__((always_inline)) void score_tile_fp32(
    const float *queries, const float *keys, int64_t padded, int V, int64_t j0, int64_t T,
    const float *const *bias, float scale, float *scores, __m512 *top) {
    __m512 s[ATTENTION_ROWS][4], k[4];
    for (int r = 0; r < ATTENTION_ROWS; r++)
        for (int v = 0; v < V; v++) s[r][v] = _mm512_setzero_ps();
    for (int64_t d = 0; d < ATTENTION_D; d++) {
        for (int v = 0; v < V; v++) k[v] = _mm512_load_ps(keys + d * padded + j0 + 16 * v);
        for (int r = 0; r < ATTENTION_ROWS; r++) {
            const __m512 q = _mm512_set1_ps(queries[r * ATTENTION_D + d]);
            for (int v = 0; v < V; v++) s[r][v] = _mm512_fmadd_ps(q, k[v], s[r][v]);
        }
    }
    store_scores(s, V, j0, T, bias, scale, scores, padded, top);
}

// A block of ATTENTION_ROWS query rows against every key: tiles of 4 vectors of 16 keys, then one of the 1-3 left
// (each an instance of the tile with its vector count a constant)
static inline __attribute__((always_inline)) void score_rows_fp32(const float *queries, const float *keys,
                                                                 int64_t padded, int64_t T, const float *const *b,
                                                                 float scale, float *scores, __m512 *top) {
    int64_t j0 = 0;
    for (; j0 + 64 <= padded; j0 += 64) score_tile_fp32(queries, keys, padded, 4, j0, T, b, scale, scores, top);
    switch ((padded - j0) / 16) {
        case 3: score_tile_fp32(queries, keys, padded, 3, j0, T, b, scale, scores, top); break;
        case 2: score_tile_fp32(queries, keys, padded, 2, j0, T, b, scale, scores, top); break;
        case 1: score_tile_fp32(queries, keys, padded, 1, j0, T, b, scale, scores, top); break;
    }
}

// exp(score - row max) over the padded row (zero past T), in place; returns 1 / their sum (exponentiate_bf16 and
// exponentiate_two_bf16: the same as bf16 weights)
static inline __attribute__((always_inline)) float exponentiate(float *row, int64_t T, int64_t padded,
                                                                               __m512 top) {
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < padded; j += 16) {
        const __m512 e = _mm512_maskz_mov_ps(keys_before(T, j), exp_nonpositive16(_mm512_sub_ps(_mm512_load_ps(row + j), m)));
        _mm512_store_ps(row + j, e);
        total = _mm512_add_ps(total, e);
    }
    return 1.0f / _mm512_reduce_add_ps(total);
}
#endif

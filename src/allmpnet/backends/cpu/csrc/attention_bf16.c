// Attention heads in AVX512-BF16 pair dot products (built with AVX-512 and -mavx512bf16), from bf16 q|k|v.
#include "attention_bf16.h"

// one head of one block; qkv, out at the head's first column, row0 the block's first row
void attend_head_bf16(
    const uint16_t *qkv, uint16_t *out, const float *bias, int64_t bias_step, float scale, int64_t row0, int64_t T,
    int64_t C, float *work) {
    const int64_t padded = (T + 15) / 16 * 16, D = ATTENTION_D, P = D / 2;
    uint32_t *keys = (uint32_t *)work;                              // (P, padded) pairs
    uint16_t *values = (uint16_t *)(keys + P * padded);             // (padded / 2, D, 2)
    float *scores = (float *)(values + padded * D);                 // (ATTENTION_ROWS, padded)
    uint16_t *weights = (uint16_t *)(scores + ATTENTION_ROWS * padded);  // (ATTENTION_ROWS, padded) bf16
    // blocks under 64 tokens (sentences) weight the values by ~16-bit probabilities, in two bf16 parts: bf16 ones alone cost their worst sentence (of 2,758 STSBenchmark ones, under auto) 0.99637 -> 0.99562
    // min cosine to fp32; longer blocks, where the products are most of the time, keep one part
    uint16_t *rest = T < 64 ? weights + ATTENTION_ROWS * padded : NULL;  // (ATTENTION_ROWS, padded) bf16
    const uint16_t *rows = qkv + row0 * 3 * C;
    stage_pairs(rows, T, C, padded, keys, values);
    for (int64_t i0 = 0; i0 < T; i0 += ATTENTION_ROWS) {
        const int rows_here = T - i0 < ATTENTION_ROWS ? (int)(T - i0) : ATTENTION_ROWS;
        const uint32_t *q[ATTENTION_ROWS];  // missing rows repeat the first: computed, never stored
        const float *b[ATTENTION_ROWS];
        __m512 top[ATTENTION_ROWS];
        for (int r = 0; r < ATTENTION_ROWS; r++) {
            const int64_t i = i0 + (r < rows_here ? r : 0);
            q[r] = (const uint32_t *)(rows + i * 3 * C);
            b[r] = bias + i * bias_step;
            top[r] = _mm512_set1_ps(-__builtin_inff());
        }
        score_rows_bf16(q, keys, padded, T, b, scale, scores, top);
        float inverse[ATTENTION_ROWS];
        for (int r = 0; r < ATTENTION_ROWS; r++)
            inverse[r] = rest ? exponentiate_two_bf16(scores + r * padded, weights + r * padded, rest + r * padded, T,
                                                      padded, top[r])
                              : exponentiate_bf16(scores + r * padded, weights + r * padded, T, padded, top[r]);
        __m512 o[ATTENTION_ROWS][4];
        for (int r = 0; r < ATTENTION_ROWS; r++)
            for (int v = 0; v < 4; v++) o[r][v] = _mm512_setzero_ps();
        for (int64_t jp = 0; jp < (T + 1) / 2; jp++) {
            const uint16_t *vp = values + jp * D * 2;
            const __m512bh v0 = (__m512bh)_mm512_load_si512(vp), v1 = (__m512bh)_mm512_load_si512(vp + 32),
                           v2 = (__m512bh)_mm512_load_si512(vp + 64), v3 = (__m512bh)_mm512_load_si512(vp + 96);
            for (const uint16_t *part = weights; part; part = part == weights ? rest : NULL)
                for (int r = 0; r < ATTENTION_ROWS; r++) {
                    const __m512bh pp = (__m512bh)_mm512_set1_epi32(((const int32_t *)(part + r * padded))[jp]);
                    o[r][0] = _mm512_dpbf16_ps(o[r][0], pp, v0);
                    o[r][1] = _mm512_dpbf16_ps(o[r][1], pp, v1);
                    o[r][2] = _mm512_dpbf16_ps(o[r][2], pp, v2);
                    o[r][3] = _mm512_dpbf16_ps(o[r][3], pp, v3);
                }
        }
        for (int r = 0; r < rows_here; r++) {
            uint16_t *at = out + (row0 + i0 + r) * C;
            const __m512 w = _mm512_set1_ps(inverse[r]);
            for (int v = 0; v < 4; v++)
                _mm256_storeu_si256((__m256i *)(at + 16 * v), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(o[r][v], w)));
        }
    }
}

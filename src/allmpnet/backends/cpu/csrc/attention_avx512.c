// Attention heads in fp32 FMAs (built with AVX-512), from fp32 or bf16 q|k|v.
#include "attention_avx512.h"

// the same in fp32 FMAs, from fp32 or bf16 q|k|v (widened as staged) into out of the same dtype
void attend_head_fp32(const void *qkv, int bf16, void *out,
                                                             const float *bias, int64_t bias_step, float scale,
                                                             int64_t row0, int64_t T, int64_t C, float *work) {
    const int64_t padded = (T + 15) / 16 * 16, D = ATTENTION_D, size = bf16 ? 2 : 4;
    float *keys = work;                              // (D, padded)
    float *values = keys + D * padded;               // (padded, D)
    float *scores = values + padded * D;             // (ATTENTION_ROWS, padded)
    float *queries = scores + ATTENTION_ROWS * padded;  // (ATTENTION_ROWS, D)
    const char *rows = (const char *)qkv + row0 * 3 * C * size;  // elements of row j: j * 3C on
    stage_transposed(rows + C * size, bf16, 3 * C, T, D, (uint32_t *)keys, padded);
    for (int64_t j = 0; j < T; j++)
        for (int v = 0; v < 4; v++)
            _mm512_store_si512(values + j * D + 16 * v, load16(rows, j * 3 * C + 2 * C + 16 * v, bf16));
    for (int64_t i0 = 0; i0 < T; i0 += ATTENTION_ROWS) {
        const int rows_here = T - i0 < ATTENTION_ROWS ? (int)(T - i0) : ATTENTION_ROWS;
        const float *b[ATTENTION_ROWS];
        __m512 top[ATTENTION_ROWS];
        for (int r = 0; r < ATTENTION_ROWS; r++) {
            const int64_t i = i0 + (r < rows_here ? r : 0);  // missing rows repeat the first: computed, never stored
            for (int v = 0; v < 4; v++)
                _mm512_store_si512(queries + r * D + 16 * v, load16(rows, i * 3 * C + 16 * v, bf16));
            b[r] = bias + i * bias_step;
            top[r] = _mm512_set1_ps(-__builtin_inff());
        }
        score_rows_fp32(queries, keys, padded, T, b, scale, scores, top);
        float inverse[ATTENTION_ROWS];
        for (int r = 0; r < ATTENTION_ROWS; r++) inverse[r] = exponentiate(scores + r * padded, T, padded, top[r]);
        __m512 o[ATTENTION_ROWS][4];
        for (int r = 0; r < ATTENTION_ROWS; r++)
            for (int v = 0; v < 4; v++) o[r][v] = _mm512_setzero_ps();
        for (int64_t j = 0; j < T; j++) {
            const float *vj = values + j * D;
            const __m512 v0 = _mm512_load_ps(vj), v1 = _mm512_load_ps(vj + 16), v2 = _mm512_load_ps(vj + 32),
                         v3 = _mm512_load_ps(vj + 48);
            for (int r = 0; r < ATTENTION_ROWS; r++) {
                const __m512 p = _mm512_set1_ps(scores[r * padded + j]);
                o[r][0] = _mm512_fmadd_ps(p, v0, o[r][0]);
                o[r][1] = _mm512_fmadd_ps(p, v1, o[r][1]);
                o[r][2] = _mm512_fmadd_ps(p, v2, o[r][2]);
                o[r][3] = _mm512_fmadd_ps(p, v3, o[r][3]);
            }
        }
        for (int r = 0; r < rows_here; r++) {
            const int64_t at = (row0 + i0 + r) * C;
            const __m512 w = _mm512_set1_ps(inverse[r]);
            for (int v = 0; v < 4; v++) {
                const __m512 x = _mm512_mul_ps(o[r][v], w);
                if (bf16)
                    _mm256_storeu_si256((__m256i *)((uint16_t *)out + at + 16 * v), bf16_round16(x));
                else
                    _mm512_storeu_ps((float *)out + at + 16 * v, x);
            }
        }
    }
}

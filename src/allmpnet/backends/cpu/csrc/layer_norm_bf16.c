// LayerNorm of bf16 rows (built with AVX-512 and -mavx512bf16).
#include <omp.h>

#include "internal.h"
#include "simd_math.h"

// y = (x - mean) / sqrt(variance + eps) x weight + bias over each row of C (a multiple of 16) of x, M rows; x and y
// bf16 (y may be x), mean and variance in fp32 from two passes over the row (then in L1). Why: torch's bf16
// LayerNorm took 1.2-2 ms for 3,825 x 768 on 2 AMX Xeon cores, 5% of a passage's time under auto (24 a batch).
static void layer_norm_row_bf16(const uint16_t *x, uint16_t *y,
                                                                            const float *weight, const float *bias,
                                                                            float eps, int64_t C) {
    __m512 sum = _mm512_setzero_ps(), squares = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; c += 16)
        sum = _mm512_add_ps(sum, bf16_to_fp32(_mm256_loadu_si256((const __m256i *)(x + c))));
    const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / (float)C);
    for (int64_t c = 0; c < C; c += 16) {
        const __m512 d = _mm512_sub_ps(bf16_to_fp32(_mm256_loadu_si256((const __m256i *)(x + c))), mean);
        squares = _mm512_fmadd_ps(d, d, squares);
    }
    const __m512 inverse = _mm512_set1_ps(1.0f / __builtin_sqrtf(_mm512_reduce_add_ps(squares) / (float)C + eps));
    for (int64_t c = 0; c < C; c += 16) {
        const __m512 d = _mm512_sub_ps(bf16_to_fp32(_mm256_loadu_si256((const __m256i *)(x + c))), mean);
        const __m512 v = _mm512_fmadd_ps(_mm512_mul_ps(d, inverse), _mm512_loadu_ps(weight + c),
                                         _mm512_loadu_ps(bias + c));
        _mm256_storeu_si256((__m256i *)(y + c), (__m256i)_mm512_cvtneps_pbh(v));
    }
}

void layer_norm_rows_bf16(const uint16_t *x, uint16_t *y, const float *weight, const float *bias, float eps,
                          int64_t M, int64_t C, int threads) {
    _Pragma("omp parallel for schedule(static) num_threads(threads < 1 ? 1 : threads)")
    for (int64_t m = 0; m < M; m++) layer_norm_row_bf16(x + m * C, y + m * C, weight, bias, eps, C);
}

// AVX-512 vector maths shared by the files built for AVX-512.
#ifndef ALLMPNET_SIMD_MATH_H
#define ALLMPNET_SIMD_MATH_H
#include <immintrin.h>

// y <= 0 as n ln 2 + r, n whole and |r| <= ln 2 / 2 (returns r); y below -87 as -87 (exp: ~1.6e-38, still a normal
// float)
static inline __attribute__((always_inline, target("avx512f"))) __m512 exp_reduce16(__m512 y, __m512 *n) {
    y = _mm512_max_ps(y, _mm512_set1_ps(-87.0f));
    *n = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_fnmadd_ps(*n, _mm512_set1_ps(0.693147181f), y);
}

// exp(y) for y <= 0, 16 at a time: 2^n exp(r), exp(r) by its degree-6 Taylor polynomial (relative error < 1e-7)
static inline __attribute__((always_inline, target("avx512f"))) __m512 exp_nonpositive16(__m512 y) {
    __m512 n;
    const __m512 r = exp_reduce16(y, &n);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

// The same for values about to be rounded to bf16 (8 bits): degree 4, relative error < 5e-5, 40x below that rounding
static inline __attribute__((always_inline, target("avx512f"))) __m512 exp_nonpositive16_for_bf16(__m512 y) {
    __m512 n;
    const __m512 r = exp_reduce16(y, &n);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.0f / 24), r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

// 16 bf16 -> fp32 (exact)
static inline __attribute__((always_inline, target("avx512f"))) __m512 bf16_to_fp32(__m256i v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

#endif

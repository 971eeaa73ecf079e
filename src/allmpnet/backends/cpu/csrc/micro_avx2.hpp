// 256-bit micro-kernels (AVX2, and A8 on 256-bit vpdpbusd): R rows x 64 outputs over a span of inputs
// (linear_driver.hpp says what they take); 16 registers hold 6 rows x 2 vectors of sums.
#ifndef ALLMPNET_MICRO_AVX2_HPP
#define ALLMPNET_MICRO_AVX2_HPP
#include <immintrin.h>

#include "internal.h"

namespace {

// A16: per pass 8 outputs as 2 vectors of 4 outputs x 2 partial sums
template <int R>
__attribute__((noinline)) void mk_avx2_a16(const int16_t *const *x, int64_t K, const int8_t *panel,
                                           const float *scales, int64_t group, float tile[][NB], int accumulate) {
    const int16_t *r[R];
#pragma GCC unroll 8
    for (int m = 0; m < R; m++) r[m] = x[m];
    for (int part = 0; part < 8; part++) {
        for (int64_t k0 = 0; k0 < K; k0 += group) {
            const int add = accumulate || k0 > 0;
            __m256i c[R][2];
#pragma GCC unroll 8
            for (int m = 0; m < R; m++) c[m][0] = c[m][1] = _mm256_setzero_si256();
            for (int64_t k = k0; k < k0 + group; k += 4) {
                const int8_t *w = panel + k * NB + 32 * part;
                _mm_prefetch((const char *)w + PREFETCH, PREFETCH_HINT);
                const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w));
                const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 16)));
#pragma GCC unroll 8
                for (int m = 0; m < R; m++) {
                    const __m256i xa = _mm256_set1_epi64x(*(const int64_t *)(r[m] + k));
                    c[m][0] = _mm256_add_epi32(c[m][0], _mm256_madd_epi16(xa, w0));
                    c[m][1] = _mm256_add_epi32(c[m][1], _mm256_madd_epi16(xa, w1));
                }
            }
            const float *scale = scales + k0 / group * NB + 8 * part;
#pragma GCC unroll 8
            for (int m = 0; m < R; m++) {
                // [o0 o0 o1 o1 | o2 o2 o3 o3], [o4 .. o7] -> hadd: [o0 o1 o4 o5 | o2 o3 o6 o7] -> in order
                const __m256i sums = _mm256_permute4x64_epi64(_mm256_hadd_epi32(c[m][0], c[m][1]), 0xD8);
                float *t = tile[m] + 8 * part;
                const __m256 before = add ? _mm256_loadu_ps(t) : _mm256_setzero_ps();
                _mm256_storeu_ps(t, _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_loadu_ps(scale), before));
            }
        }
    }
}

// A8 on 256-bit vectors: per pass 16 outputs as 2 vectors of 8 (each lane one output, as A8), so 6 rows' sums fit
// AVX2's 16 registers; the same flush as A8 (sums x scale + where they start), so the outputs are A8's to the bit.
// Dot: vpdpbusd in AVX512-VNNI's EVEX form (vnni256-a8) or AVX-VNNI's VEX form (avxvnni-a8).
enum Dpbusd256 { DPBUSD_EVEX, DPBUSD_VEX };

template <Dpbusd256 D>
inline __m256i dpbusd256(__m256i acc, __m256i xa, __m256i w) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    if constexpr (D == DPBUSD_EVEX) return _mm256_dpbusd_epi32(acc, xa, w);
#endif
#if defined(__AVXVNNI__)
    if constexpr (D == DPBUSD_VEX) return _mm256_dpbusd_avx_epi32(acc, xa, w);
#endif
    __builtin_unreachable();
}

template <Dpbusd256 D, int R>
__attribute__((noinline)) void mk_a8_256(const uint8_t *const *x, int64_t K, const int8_t *panel,
                                         const float *scales, const float *start, int64_t group, float tile[][NB],
                                         int accumulate) {
    const uint8_t *r[R];
#pragma GCC unroll 8
    for (int m = 0; m < R; m++) r[m] = x[m];
    for (int part = 0; part < 4; part++) {
        for (int64_t k0 = 0; k0 < K; k0 += group) {
            const int add = accumulate || k0 > 0;
            __m256i c[R][2];
#pragma GCC unroll 8
            for (int m = 0; m < R; m++) c[m][0] = c[m][1] = _mm256_setzero_si256();
            for (int64_t k = k0; k < k0 + group; k += 4) {
                const int8_t *w = panel + k * NB + 64 * part;
                _mm_prefetch((const char *)w + PREFETCH, PREFETCH_HINT);
                const __m256i w0 = _mm256_loadu_si256((const __m256i *)w);
                const __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + 32));
#pragma GCC unroll 8
                for (int m = 0; m < R; m++) {
                    const __m256i xa = _mm256_set1_epi32(*(const int32_t *)(r[m] + k));
                    c[m][0] = dpbusd256<D>(c[m][0], xa, w0);
                    c[m][1] = dpbusd256<D>(c[m][1], xa, w1);
                }
            }
            const float *scale = scales + k0 / group * NB + 16 * part;
#pragma GCC unroll 8
            for (int m = 0; m < R; m++) {
                float *t = tile[m] + 16 * part;
                const float *before = add ? t : start + 16 * part;
                _mm256_storeu_ps(t, _mm256_fmadd_ps(_mm256_cvtepi32_ps(c[m][0]), _mm256_loadu_ps(scale),
                                                    _mm256_loadu_ps(before)));
                _mm256_storeu_ps(t + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(c[m][1]), _mm256_loadu_ps(scale + 8),
                                                        _mm256_loadu_ps(before + 8)));
            }
        }
    }
}

// F32: per pass 4 outputs as 2 vectors of 2 outputs x 4 partial sums
inline __m256 widen_f32x8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

template <int R>
__attribute__((noinline)) void mk_avx2_f32(const float *const *x, int64_t K, const int8_t *panel,
                                           const float *scales, int64_t group, float tile[][NB], int accumulate) {
    const float *r[R];
#pragma GCC unroll 8
    for (int m = 0; m < R; m++) r[m] = x[m];
    for (int part = 0; part < 16; part++) {
        for (int64_t k0 = 0; k0 < K; k0 += group) {
            const int add = accumulate || k0 > 0;
            __m256 c[R][2];
#pragma GCC unroll 8
            for (int m = 0; m < R; m++) c[m][0] = c[m][1] = _mm256_setzero_ps();
            for (int64_t k = k0; k < k0 + group; k += 4) {
                const int8_t *w = panel + k * NB + 16 * part;
                _mm_prefetch((const char *)w + PREFETCH, PREFETCH_HINT);
                const __m256 w0 = widen_f32x8(w), w1 = widen_f32x8(w + 8);
#pragma GCC unroll 8
                for (int m = 0; m < R; m++) {
                    const __m256 xa = _mm256_broadcast_ps((const __m128 *)(r[m] + k));
                    c[m][0] = _mm256_fmadd_ps(xa, w0, c[m][0]);
                    c[m][1] = _mm256_fmadd_ps(xa, w1, c[m][1]);
                }
            }
            const float *scale = scales + k0 / group * NB + 4 * part;
#pragma GCC unroll 8
            for (int m = 0; m < R; m++) {
                // [o0 x4 | o1 x4], [o2 x4 | o3 x4] -> [o0 o2 o0 o2 | o1 o3 o1 o3] -> o0 o1 o2 o3
                const __m256 h = _mm256_hadd_ps(c[m][0], c[m][1]), h2 = _mm256_hadd_ps(h, h);
                const __m128 sums = _mm_unpacklo_ps(_mm256_castps256_ps128(h2), _mm256_extractf128_ps(h2, 1));
                float *t = tile[m] + 4 * part;
                _mm_storeu_ps(t, _mm_fmadd_ps(sums, _mm_loadu_ps(scale), add ? _mm_loadu_ps(t) : _mm_setzero_ps()));
            }
        }
    }
}

// F32W: 2 outputs x R rows, 8 inputs per step (16 registers: 12 sums, 2 weights, the row's inputs)
template <int R>
__attribute__((noinline)) void mk_avx2_f32w(const float *const *x, int64_t K, const float *w, float tile[][NB],
                                            int j) {
    const float *r[R];
#pragma GCC unroll 8
    for (int m = 0; m < R; m++) r[m] = x[m];
    const char *next = (const char *)(w + 2 * K);  // 8 K bytes, 64 per step of 8 inputs
    __m256 c[R][2];
#pragma GCC unroll 8
    for (int m = 0; m < R; m++) c[m][0] = c[m][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
        _mm_prefetch(next + 8 * k, PREFETCH_HINT);
        const __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + K + k);
#pragma GCC unroll 8
        for (int m = 0; m < R; m++) {
            const __m256 xv = _mm256_loadu_ps(r[m] + k);
            c[m][0] = _mm256_fmadd_ps(xv, w0, c[m][0]);
            c[m][1] = _mm256_fmadd_ps(xv, w1, c[m][1]);
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < R; m++) {
        // hadd: [c0 c0 c1 c1 | c0 c0 c1 c1] partial sums; halves added, then pairs: [sum c0, sum c1]
        const __m256 h = _mm256_hadd_ps(c[m][0], c[m][1]);
        const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        _mm_storel_pi((__m64 *)(tile[m] + j), _mm_hadd_ps(q, q));
    }
}

}  // namespace
#endif

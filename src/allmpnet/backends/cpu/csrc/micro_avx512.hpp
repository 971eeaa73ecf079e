// AVX-512 micro-kernels: R rows x 64 outputs over a span of inputs (linear_driver.hpp says what they take). The
// R rows' sums live in registers: arrays indexed by unrolled loops, which GCC keeps in registers (c[R][4]: 24 of
// the 32 vector registers at R = 6). Included by the files built for AVX-512 (each takes what its flags allow).
#ifndef ALLMPNET_MICRO_AVX512_HPP
#define ALLMPNET_MICRO_AVX512_HPP
#include <immintrin.h>

#include "internal.h"

namespace {

// Two vectors of 8 outputs x 2 partial sums (lanes 2j, 2j+1 = output j) -> 16 outputs in order.
inline __m512i fold_pairs_i32(__m512i lo, __m512i hi) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    return _mm512_add_epi32(_mm512_permutex2var_epi32(lo, even, hi), _mm512_permutex2var_epi32(lo, odd, hi));
}

inline __m512 fold_pairs_f32(__m512 lo, __m512 hi) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    return _mm512_add_ps(_mm512_permutex2var_ps(lo, even, hi), _mm512_permutex2var_ps(lo, odd, hi));
}

// c0..c3: 16 partial sums of 4 outputs -> the 4 outputs
inline __m128 sum4_f32(__m512 c0, __m512 c1, __m512 c2, __m512 c3) {
    // per 128-bit lane: [c0 c1 c0 c1] and [c2 c3 c2 c3] partial sums, then [c0 c1 c2 c3], then the 4 lanes added
    const __m512 a = _mm512_add_ps(_mm512_unpacklo_ps(c0, c1), _mm512_unpackhi_ps(c0, c1));
    const __m512 b = _mm512_add_ps(_mm512_unpacklo_ps(c2, c3), _mm512_unpackhi_ps(c2, c3));
    const __m512d ad = _mm512_castps_pd(a), bd = _mm512_castps_pd(b);
    const __m512 s = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(ad, bd)),
                                   _mm512_castpd_ps(_mm512_unpackhi_pd(ad, bd)));
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// tile = before + sums x scale (before: the tile itself, or where its sums start)
inline void add_to(float *tile, __m512 sums, const float *scale, const float *before) {
    _mm512_storeu_ps(tile, _mm512_fmadd_ps(sums, _mm512_loadu_ps(scale), _mm512_loadu_ps(before)));
}

// tile (+)= sums x scale: added where `add`, else stored (a tile's first group: no zeroed tile to read)
inline void add_scaled(float *tile, __m512 sums, const float *scale, int add) {
    const __m512 before = add ? _mm512_loadu_ps(tile) : _mm512_setzero_ps();
    _mm512_storeu_ps(tile, _mm512_fmadd_ps(sums, _mm512_loadu_ps(scale), before));
}

#if defined(__AVX512VNNI__)
// A8 (VNNI): 4 vectors of 16 outputs per row, each lane one output; a fresh tile starts at the compensation
// (start), which cancels the activations' +128.
template <int R>
__attribute__((noinline)) void mk_vnni_a8(const uint8_t *const *x, int64_t K, const int8_t *panel,
                                          const float *scales, const float *start, int64_t group, float tile[][NB],
                                          int accumulate) {
    const uint8_t *r[R];
#pragma GCC unroll 8
    for (int m = 0; m < R; m++) r[m] = x[m];
    for (int64_t k0 = 0; k0 < K; k0 += group) {
        const int add = accumulate || k0 > 0;
        __m512i c[R][4];
#pragma GCC unroll 8
        for (int m = 0; m < R; m++)
#pragma GCC unroll 4
            for (int v = 0; v < 4; v++) c[m][v] = _mm512_setzero_si512();
        for (int64_t k = k0; k < k0 + group; k += 4) {
            const int8_t *w = panel + k * NB;
            for (int line = 0; line < 256; line += 64) _mm_prefetch((const char *)w + PREFETCH + line, PREFETCH_HINT);
            const __m512i w0 = _mm512_loadu_si512(w), w1 = _mm512_loadu_si512(w + 64);
            const __m512i w2 = _mm512_loadu_si512(w + 128), w3 = _mm512_loadu_si512(w + 192);
#pragma GCC unroll 8
            for (int m = 0; m < R; m++) {
                const __m512i xa = _mm512_set1_epi32(*(const int32_t *)(r[m] + k));
                c[m][0] = _mm512_dpbusd_epi32(c[m][0], xa, w0);
                c[m][1] = _mm512_dpbusd_epi32(c[m][1], xa, w1);
                c[m][2] = _mm512_dpbusd_epi32(c[m][2], xa, w2);
                c[m][3] = _mm512_dpbusd_epi32(c[m][3], xa, w3);
            }
        }
        const float *scale = scales + k0 / group * NB;
#pragma GCC unroll 8
        for (int m = 0; m < R; m++) {
            const float *before = add ? tile[m] : start;
#pragma GCC unroll 4
            for (int v = 0; v < 4; v++)
                add_to(tile[m] + 16 * v, _mm512_cvtepi32_ps(c[m][v]), scale + 16 * v, before + 16 * v);
        }
    }
}
#endif

// A16 and BF16: per pass 32 outputs as 4 vectors of 8 outputs x 2 partial sums; a step's 4 inputs are broadcast
// as one 64-bit pattern, so lane 2j takes inputs 0-1 and lane 2j+1 inputs 2-3 of output j.
enum PairProduct { PAIRS_VNNI16, PAIRS_MADD16, PAIRS_BF16 };

#if defined(__AVX512BF16__)
// 32 int8 weights (8 outputs x 4 inputs) -> 32 bf16, exact (|w| <= 127)
inline __m512 widen_bf16(const int8_t *p) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 16))));
    return (__m512)_mm512_cvtne2ps_pbh(hi, lo);
}
#endif

template <PairProduct P>
inline __m512i widen_pairs(const int8_t *p) {
#if defined(__AVX512BF16__)
    if constexpr (P == PAIRS_BF16) return _mm512_castps_si512(widen_bf16(p));
#endif
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p));
}

template <PairProduct P>
inline __m512i dot_pairs(__m512i acc, __m512i xa, __m512i w) {
#if defined(__AVX512VNNI__)
    if constexpr (P == PAIRS_VNNI16) return _mm512_dpwssd_epi32(acc, xa, w);
#endif
#if defined(__AVX512BF16__)
    if constexpr (P == PAIRS_BF16)
        return _mm512_castps_si512(_mm512_dpbf16_ps(_mm512_castsi512_ps(acc), (__m512bh)xa, (__m512bh)w));
#endif
    return _mm512_add_epi32(acc, _mm512_madd_epi16(xa, w));
}

template <PairProduct P>
inline __m512 pair_sums(__m512i lo, __m512i hi) {  // -> 16 fp32 sums in order
    if constexpr (P == PAIRS_BF16) return fold_pairs_f32(_mm512_castsi512_ps(lo), _mm512_castsi512_ps(hi));
    return _mm512_cvtepi32_ps(fold_pairs_i32(lo, hi));
}

template <PairProduct P, class T, int R>
__attribute__((noinline)) void mk_pairs(const T *const *x, int64_t K, const int8_t *panel, const float *scales,
                                        int64_t group, float tile[][NB], int accumulate) {
    const T *r[R];
#pragma GCC unroll 8
    for (int m = 0; m < R; m++) r[m] = x[m];
    for (int half = 0; half < 2; half++) {
        for (int64_t k0 = 0; k0 < K; k0 += group) {
            const int add = accumulate || k0 > 0;
            __m512i c[R][4];
#pragma GCC unroll 8
            for (int m = 0; m < R; m++)
#pragma GCC unroll 4
                for (int v = 0; v < 4; v++) c[m][v] = _mm512_setzero_si512();
            for (int64_t k = k0; k < k0 + group; k += 4) {
                const int8_t *w = panel + k * NB + 128 * half;
                _mm_prefetch((const char *)w + PREFETCH, PREFETCH_HINT);
                _mm_prefetch((const char *)w + PREFETCH + 64, PREFETCH_HINT);
                const __m512i w0 = widen_pairs<P>(w), w1 = widen_pairs<P>(w + 32), w2 = widen_pairs<P>(w + 64),
                              w3 = widen_pairs<P>(w + 96);
#pragma GCC unroll 8
                for (int m = 0; m < R; m++) {
                    const __m512i xa = _mm512_set1_epi64(*(const int64_t *)(r[m] + k));
                    c[m][0] = dot_pairs<P>(c[m][0], xa, w0);
                    c[m][1] = dot_pairs<P>(c[m][1], xa, w1);
                    c[m][2] = dot_pairs<P>(c[m][2], xa, w2);
                    c[m][3] = dot_pairs<P>(c[m][3], xa, w3);
                }
            }
            const float *scale = scales + k0 / group * NB + 32 * half;
#pragma GCC unroll 8
            for (int m = 0; m < R; m++) {
                add_scaled(tile[m] + 32 * half, pair_sums<P>(c[m][0], c[m][1]), scale, add);
                add_scaled(tile[m] + 32 * half + 16, pair_sums<P>(c[m][2], c[m][3]), scale + 16, add);
            }
        }
    }
}

// F32: per pass 16 outputs as 4 vectors of 4 outputs x 4 partial sums (the step's 4 inputs broadcast as a 128-bit
// pattern).
inline __m512 widen_f32(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

template <int R>
__attribute__((noinline)) void mk_avx512_f32(const float *const *x, int64_t K, const int8_t *panel,
                                             const float *scales, int64_t group, float tile[][NB], int accumulate) {
    const float *r[R];
#pragma GCC unroll 8
    for (int m = 0; m < R; m++) r[m] = x[m];
    for (int quarter = 0; quarter < 4; quarter++) {
        for (int64_t k0 = 0; k0 < K; k0 += group) {
            const int add = accumulate || k0 > 0;
            __m512 c[R][4];
#pragma GCC unroll 8
            for (int m = 0; m < R; m++)
#pragma GCC unroll 4
                for (int v = 0; v < 4; v++) c[m][v] = _mm512_setzero_ps();
            for (int64_t k = k0; k < k0 + group; k += 4) {
                const int8_t *w = panel + k * NB + 64 * quarter;
                _mm_prefetch((const char *)w + PREFETCH, PREFETCH_HINT);
                const __m512 w0 = widen_f32(w), w1 = widen_f32(w + 16), w2 = widen_f32(w + 32), w3 = widen_f32(w + 48);
#pragma GCC unroll 8
                for (int m = 0; m < R; m++) {
                    const __m512 xa = _mm512_broadcast_f32x4(_mm_loadu_ps(r[m] + k));
                    c[m][0] = _mm512_fmadd_ps(xa, w0, c[m][0]);
                    c[m][1] = _mm512_fmadd_ps(xa, w1, c[m][1]);
                    c[m][2] = _mm512_fmadd_ps(xa, w2, c[m][2]);
                    c[m][3] = _mm512_fmadd_ps(xa, w3, c[m][3]);
                }
            }
            const float *scale = scales + k0 / group * NB + 16 * quarter;
#pragma GCC unroll 8
            for (int m = 0; m < R; m++)
                add_scaled(tile[m] + 16 * quarter,
                           fold_pairs_f32(fold_pairs_f32(c[m][0], c[m][1]), fold_pairs_f32(c[m][2], c[m][3])), scale,
                           add);
        }
    }
}

// F32W: 4 outputs (weight rows w, w + K, ...) x R rows, 16 inputs per step, a vector of partial sums per output
// and row; the next 4 weight rows (contiguous after these) are prefetched at the same pace.
template <int R>
__attribute__((noinline)) void mk_avx512_f32w(const float *const *x, int64_t K, const float *w, float tile[][NB],
                                              int j) {
    const float *r[R];
#pragma GCC unroll 8
    for (int m = 0; m < R; m++) r[m] = x[m];
    const char *next = (const char *)(w + 4 * K);  // 16 K bytes, 256 per step of 16 inputs
    __m512 c[R][4];
#pragma GCC unroll 8
    for (int m = 0; m < R; m++)
#pragma GCC unroll 4
        for (int v = 0; v < 4; v++) c[m][v] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        for (int line = 0; line < 256; line += 64) _mm_prefetch(next + 16 * k + line, PREFETCH_HINT);
        const __m512 w0 = _mm512_loadu_ps(w + k), w1 = _mm512_loadu_ps(w + K + k);
        const __m512 w2 = _mm512_loadu_ps(w + 2 * K + k), w3 = _mm512_loadu_ps(w + 3 * K + k);
#pragma GCC unroll 8
        for (int m = 0; m < R; m++) {
            const __m512 xv = _mm512_loadu_ps(r[m] + k);
            c[m][0] = _mm512_fmadd_ps(xv, w0, c[m][0]);
            c[m][1] = _mm512_fmadd_ps(xv, w1, c[m][1]);
            c[m][2] = _mm512_fmadd_ps(xv, w2, c[m][2]);
            c[m][3] = _mm512_fmadd_ps(xv, w3, c[m][3]);
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < R; m++) _mm_storeu_ps(tile[m] + j, sum4_f32(c[m][0], c[m][1], c[m][2], c[m][3]));
}

}  // namespace
#endif

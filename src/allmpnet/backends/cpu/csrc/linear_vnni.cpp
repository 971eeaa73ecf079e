// Linear kernels for AVX512-VNNI CPUs (built with AVX-512 and -mavx512vnni): A8 (W8A8, vpdpbusd), A8 on 256-bit
// vectors (avxvnni-a8's code in the EVEX encoding, so AVX-512 CPUs run and test it), and int16 activations
// (vpdpwssd).
#include "linear_kernels.hpp"
#include "simd_math.h"

// prepare_row for the int8 form on AVX-512, written out: one pass widens the row (times smooth) into buffer and
// takes its largest |v| and sum of squares, a second rounds it to int8 + 128. GCC's vectorisation of the generic
// loops took ~3 cycles an input, a quarter of the FFN down projection's time on AMX. A spiky row (route) keeps its
// largest entries aside here too (prepare_row's loops, which GCC left scalar, took a third of this function's time
// on sentences); a row with NaN or inf, or of a width that is not a multiple of 64, goes through prepare_row.
// `kind` is ACT_U8 (prepare_row's signature, for the drivers).
int prepare_row_a8(const linear_args *a, int kind, int64_t m, float *ALLMPNET_RESTRICT buffer) {
    const int64_t K = a->K;
    if (K % 64) return prepare_row(a, ACT_U8, m, buffer);
    // locals: read through `a` inside the loops, each was reloaded after every store to buffer
    const int bf16 = a->x_bf16;
    const float *ALLMPNET_RESTRICT smooth = a->smooth;
    const int size = bf16 ? 2 : 4;
    const int64_t bytes = K * size;
    const char *ALLMPNET_RESTRICT row = (const char *)a->x + m * bytes, *next = row + bytes;  // a prefetch never faults
    __m512 top = _mm512_setzero_ps(), squares = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        // the next row requested while this one is read: the previous layer's outputs are beyond the caches, and
        // these loads were 40% of this function's samples (1,000 sentences under vnni-a8: 2-5% faster)
        if ((k * size) % 64 == 0) _mm_prefetch(next + k * size, _MM_HINT_T0);
        __m512 v = bf16 ? bf16_to_fp32(_mm256_loadu_si256((const __m256i *)(row + 2 * k)))
                        : _mm512_loadu_ps((const float *)row + k);
        if (smooth) v = _mm512_mul_ps(v, _mm512_loadu_ps(smooth + k));
        _mm512_storeu_ps(buffer + k, v);
        top = _mm512_max_ps(top, _mm512_abs_ps(v));
        squares = _mm512_fmadd_ps(v, v, squares);
    }
    const float sum = _mm512_reduce_add_ps(squares);
    float largest = _mm512_reduce_max_ps(top);
    if (!(sum <= 3.0e38f)) return prepare_row(a, ACT_U8, m, buffer);  // NaN or inf in the row: as it does
    if (a->split_count) a->split_count[m] = 0;
    const float route = a->route;
    if (route > 0.0f && largest * largest * (float)K > route * route * sum) {  // spiky: as prepare_row decides
        const __m512 bar = _mm512_set1_ps(SPLIT_SHARE * SPLIT_SHARE * route * route * sum / (float)K);
        int count = 0;
        for (int64_t k = 0; k < K; k += 16) {
            const __m512 v = _mm512_loadu_ps(buffer + k);
            count += __builtin_popcount(_mm512_cmp_ps_mask(_mm512_mul_ps(v, v), bar, _CMP_GT_OQ));
        }
        if (count > MAX_SPLIT) {
            quantize_i16(buffer, K, largest, a->act16 + m * K, a->row_scale + m);
            return 1;
        }
        int32_t *ALLMPNET_RESTRICT index = a->split_index + m * MAX_SPLIT;
        float *ALLMPNET_RESTRICT value = a->split_value + m * MAX_SPLIT;
        int j = 0;
        top = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
            __m512 v = _mm512_loadu_ps(buffer + k);
            const __mmask16 kept = _mm512_cmp_ps_mask(_mm512_mul_ps(v, v), bar, _CMP_GT_OQ);
            if (kept) {
                for (unsigned bits = kept; bits; bits &= bits - 1) {
                    const int i = __builtin_ctz(bits);
                    index[j] = (int32_t)(k + i);
                    value[j++] = buffer[k + i];
                }
                v = _mm512_maskz_mov_ps((__mmask16)~kept, v);
                _mm512_storeu_ps(buffer + k, v);
            }
            top = _mm512_max_ps(top, _mm512_abs_ps(v));
        }
        largest = _mm512_reduce_max_ps(top);
        a->split_count[m] = count;
    }
    a->row_scale[m] = largest > 0.0f ? largest / 127.0f : 1.0f;  // 1: a row all kept aside divides by it
    const __m512 inverse = _mm512_set1_ps(largest > 0.0f ? 127.0f / largest : 0.0f);
    // 64 inputs at a time: two packs to bytes (within 128-bit lanes, so the dwords come out as [q0 q1 q2 q3] per
    // lane, put back in order by one permute), and + 128 as a flip of the top bit (|q| <= 127): fewer
    // instructions than four vpmovdb and adds, which take two each
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    uint8_t *ALLMPNET_RESTRICT out = (uint8_t *)a->act + m * K;
    for (int64_t k = 0; k < K; k += 64) {  // round to nearest even, as rintf
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(buffer + k), inverse));
        const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(buffer + k + 16), inverse));
        const __m512i q2 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(buffer + k + 32), inverse));
        const __m512i q3 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(buffer + k + 48), inverse));
        const __m512i q8 = _mm512_packs_epi16(_mm512_packs_epi32(q0, q1), _mm512_packs_epi32(q2, q3));
        _mm512_storeu_si512(out + k, _mm512_xor_si512(_mm512_permutexvar_epi32(order, q8), flip));
    }
    return 0;
}


int64_t run_vnni_a8(const linear_args *a, float *buffer) { return drive<VnniA8>(a, buffer); }
int64_t run_vnni_a16(const linear_args *a, float *buffer) { return drive<VnniA16>(a, buffer); }
int64_t run_vnni256_a8(const linear_args *a, float *buffer) { return drive<A8x256<DPBUSD_EVEX>>(a, buffer); }

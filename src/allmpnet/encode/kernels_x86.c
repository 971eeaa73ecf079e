// int8-weight linear layers for x86 CPUs without AMX (compiled and loaded by int8_x86.py).
//
// allmpnet_x86_linear: y = act(x W^T + b) [+ residual], W stored as int8 with one fp32 scale per output channel
// and group of `group` inputs; act is none or GELU (erf); x, residual and y are fp32 or bf16.
//
// One packed weight layout serves every kernel, so a layer keeps a single int8 copy whatever the batch size:
//   packed [N/64][K/4][64][4] int8 (N padded to a multiple of 64): per block of 64 outputs and step of 4 inputs, 64 outputs x 4 inputs (the
//          order AVX512-VNNI's vpdpbusd reads: 16 outputs x 4 inputs per vector);
//   scales [N/64][K/group][64] fp32;
//   compensation [N/64][K/group][64] int32: -128 x (sum of the group's int8 weights), for the int8-activation
//          kernel only (its activations are stored as q + 128, an unsigned byte, since vpdpbusd multiplies
//          unsigned by signed bytes: starting each group's sums from it leaves exactly sum q w).
//
// Kernels, by how the activations are multiplied (`kernel` argument; the caller picks one the CPU has, and the
// function refuses, rather than crashes, when the CPU lacks it):
//   A8   int8 activations, a scale per row (token), vpdpbusd: 64 multiply-adds per instruction. W8A8.
//   A16  int16 activations, a scale per row: vpdpwssd (VNNI) or vpmaddwd (AVX512BW, AVX2), 32 (16 on AVX2)
//        multiply-adds per instruction. Rounding to 1/32767 of the row's largest value is far finer than bf16's
//        8 bits, so this is weight-only int8 in quality, and on AVX2 it is twice the fp32 FMA rate.
//   BF16 bf16 activations, vdpbf16ps (AVX512-BF16); int8 weights are exact in bf16.
//   F32  fp32 activations and FMA (AVX512F, AVX2+FMA).
// Integer kernels sum each group exactly in int32 and add it, times its scale, to fp32 sums at the group's end;
// the float kernels do the same with fp32 group sums. Except A8, the kernels read 4 inputs per step as 2 or 4
// partial sums per output (vector lanes), folded together when a group ends.
//
// Work split: rows in blocks of MB (their activations stay in L2), within each block the 64-output blocks
// shared between threads (OpenMP, torch's own runtime), and per 64-output block chunks of MR rows go through a
// micro-kernel that keeps the chunk's sums in registers.
#ifndef ALLMPNET_MICRO_KERNELS
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define NB 64            // outputs per packed block
#define MR 6             // rows per micro-kernel call
#define MB 192           // rows per block whose prepared activations are reused by every output block
#define PREFETCH 2048    // bytes of packed weights requested ahead of the step being multiplied

enum {
    KERNEL_AVX2_F32 = 1,
    KERNEL_AVX2_A16 = 2,
    KERNEL_AVX512_F32 = 3,
    KERNEL_AVX512_A16 = 4,
    KERNEL_AVX512_BF16 = 5,
    KERNEL_VNNI_A16 = 6,
    KERNEL_VNNI_A8 = 7,
};

enum { ACT_F32, ACT_BF16, ACT_I16, ACT_U8 };

static int activation_kind(int kernel) {
    switch (kernel) {
        case KERNEL_AVX2_F32: case KERNEL_AVX512_F32: return ACT_F32;
        case KERNEL_AVX512_BF16: return ACT_BF16;
        case KERNEL_AVX2_A16: case KERNEL_AVX512_A16: case KERNEL_VNNI_A16: return ACT_I16;
        default: return ACT_U8;
    }
}

// The caller passes what it read from the CPU's flags; this second check keeps a wrong caller from crashing the
// process with an illegal instruction.
int allmpnet_x86_kernel_supported(int kernel) {
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
                       && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    switch (kernel) {
        case KERNEL_AVX2_F32: case KERNEL_AVX2_A16: return avx2;
        case KERNEL_AVX512_F32: case KERNEL_AVX512_A16: return avx512;
        case KERNEL_AVX512_BF16: return avx512 && __builtin_cpu_supports("avx512bf16");
        case KERNEL_VNNI_A16: case KERNEL_VNNI_A8: return avx512 && __builtin_cpu_supports("avx512vnni");
        default: return 0;
    }
}

// ---------------------------------------------------------------- scalar helpers, vectorised by each caller's ISA

static inline __attribute__((always_inline)) float bf16_load(const uint16_t *p) {
    const uint32_t bits = (uint32_t)*p << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline __attribute__((always_inline)) uint16_t bf16_round(float f) {  // to nearest even (no NaN here)
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// exp(y) for y <= 0: 2^n exp(r), |r| <= ln 2 / 2, degree-6 Taylor polynomial (relative error < 1e-7)
static inline __attribute__((always_inline)) float exp_nonpositive(float y) {
    y = y < -87.0f ? -87.0f : y;
    const float n = __builtin_rintf(y * 1.44269504f);
    const float r = y - n * 0.693147181f;
    float p = 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, 4);
    return p * two_n;
}

// GELU(v) = v / 2 (1 + erf(v / sqrt 2)), erf by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7)
static inline __attribute__((always_inline)) float gelu(float v) {
    const float a = __builtin_fabsf(v) * 0.707106781f;
    const float t = 1.0f / (1.0f + 0.3275911f * a);
    const float p = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f
                                                                                      + t * 1.061405429f))));
    const float erf_abs = 1.0f - p * exp_nonpositive(-a * a);
    return 0.5f * v + 0.5f * __builtin_fabsf(v) * erf_abs;  // v / 2 (1 + sign(v) erf|v / sqrt 2|)
}

typedef struct {
    const void *x;
    int x_bf16;
    const float *smooth;
    const int8_t *packed;
    const float *scales;
    const int32_t *compensation;
    int64_t group;
    const float *bias;
    const void *residual;
    void *y;
    int y_bf16;
    int64_t M, N, K;
    int gelu;
    float route;          // > 0: rows with max |v| > route x rms(v) get int16 activations (int8 kernel only)
    void *act;            // prepared activations in the kernel's form, (M, K)
    int16_t *act16;       // (M, K) int16 activations of the routed rows
    float *row_scale;     // (M,)
    int32_t *order;       // (M,): the rows of the kernel's form, then the routed ones
    int32_t *routed;      // (M,): 1 where the row was routed to int16
} linear_args;

static inline __attribute__((always_inline)) void quantize_i16(const float *v, int64_t K, float largest,
                                                              int16_t *out, float *scale) {
    const float inverse = largest > 0.0f ? 32767.0f / largest : 0.0f;
    *scale = largest / 32767.0f;
    for (int64_t k = 0; k < K; k++) out[k] = (int16_t)__builtin_rintf(v[k] * inverse);
}

// Row m of x (times smooth) -> the kernel's activation form; returns 1 when the row was routed to int16. Plain
// loops: each ISA's caller vectorises them.
static inline __attribute__((always_inline)) int prepare_row(const linear_args *a, int kind, int64_t m,
                                                            float *buffer) {
    const int64_t K = a->K;
    const float *smooth = a->smooth;
    if (a->x_bf16) {
        const uint16_t *row = (const uint16_t *)a->x + m * K;
        for (int64_t k = 0; k < K; k++) buffer[k] = bf16_load(row + k);
    } else {
        memcpy(buffer, (const float *)a->x + m * K, K * 4);
    }
    if (smooth)
        for (int64_t k = 0; k < K; k++) buffer[k] *= smooth[k];
    // the largest |v| as an integer max over the bits (same order for non-negative floats): GCC vectorises this
    // reduction, not the float one
    uint32_t top_bits = 0;
    for (int64_t k = 0; k < K; k++) {
        uint32_t bits;
        memcpy(&bits, buffer + k, 4);
        bits &= 0x7fffffffu;
        top_bits = bits > top_bits ? bits : top_bits;
    }
    float largest;
    memcpy(&largest, &top_bits, 4);
    if (kind == ACT_F32) {
        memcpy((float *)a->act + m * K, buffer, K * 4);
    } else if (kind == ACT_BF16) {
        uint16_t *out = (uint16_t *)a->act + m * K;
        for (int64_t k = 0; k < K; k++) out[k] = bf16_round(buffer[k]);
    } else if (kind == ACT_I16) {
        quantize_i16(buffer, K, largest, (int16_t *)a->act + m * K, a->row_scale + m);
    } else {
        if (a->route > 0.0f) {
            float squares = 0.0f;
            _Pragma("omp simd reduction(+:squares)") for (int64_t k = 0; k < K; k++) squares += buffer[k] * buffer[k];
            if (largest * largest * (float)K > a->route * a->route * squares) {
                quantize_i16(buffer, K, largest, a->act16 + m * K, a->row_scale + m);
                return 1;
            }
        }
        const float inverse = largest > 0.0f ? 127.0f / largest : 0.0f;
        a->row_scale[m] = largest / 127.0f;
        uint8_t *out = (uint8_t *)a->act + m * K;
        for (int64_t k = 0; k < K; k++) out[k] = (uint8_t)((int32_t)__builtin_rintf(buffer[k] * inverse) + 128);
    }
    return 0;
}

// tile (rows x 64 fp32 sums of block nb) -> y rows out[0..rows), through row scale, bias, GELU, residual.
static inline __attribute__((always_inline)) void finish_rows(const linear_args *a, const int32_t *out, int rows,
                                                             int64_t nb, float tile[][NB]) {
    const int64_t N = a->N, n0 = nb * NB;
    const int width = N - n0 < NB ? (int)(N - n0) : NB;  // the last block may be partly padding
    const int scaled = a->row_scale != NULL;
    for (int m = 0; m < rows; m++) {
        const float s = scaled ? a->row_scale[out[m]] : 1.0f;
        float *v = tile[m];
        for (int n = 0; n < width; n++) v[n] = v[n] * s + (a->bias ? a->bias[n0 + n] : 0.0f);
        if (a->gelu)
            for (int n = 0; n < width; n++) v[n] = gelu(v[n]);
        const int64_t at = (int64_t)out[m] * N + n0;
        if (a->residual) {
            if (a->y_bf16)
                for (int n = 0; n < width; n++) v[n] += bf16_load((const uint16_t *)a->residual + at + n);
            else
                for (int n = 0; n < width; n++) v[n] += ((const float *)a->residual)[at + n];
        }
        if (a->y_bf16)
            for (int n = 0; n < width; n++) ((uint16_t *)a->y)[at + n] = bf16_round(v[n]);
        else
            memcpy((float *)a->y + at, v, width * 4);
    }
}

// ---------------------------------------------------------------- micro-kernels: R rows x 64 outputs, all of K
// x: the chunk's R activation rows (a chunk of fewer rows repeats its first row: computed, never stored);
// panel: the block's packed weights; scales, compensation: the block's [G][64]; tile: fp32 sums, added to. The sums are named variables, one per register, through the ROWS macro:
// GCC 12 spilled an array of them to the stack on every step (2.5x slower).

#define AVX512 "avx512f,avx512bw,avx512vl,avx512dq,fma,avx2"
#define AVX2 "avx2,fma"

// Two vectors of 8 outputs x 2 partial sums (lanes 2j, 2j+1 = output j) -> 16 outputs in order.
__attribute__((target(AVX512))) static inline __m512i fold_pairs_i32(__m512i lo, __m512i hi) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    return _mm512_add_epi32(_mm512_permutex2var_epi32(lo, even, hi), _mm512_permutex2var_epi32(lo, odd, hi));
}

__attribute__((target(AVX512))) static inline __m512 fold_pairs_f32(__m512 lo, __m512 hi) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    return _mm512_add_ps(_mm512_permutex2var_ps(lo, even, hi), _mm512_permutex2var_ps(lo, odd, hi));
}

__attribute__((target(AVX512))) static inline void add_scaled(float *tile, __m512 sums, const float *scale) {
    _mm512_storeu_ps(tile, _mm512_fmadd_ps(sums, _mm512_loadu_ps(scale), _mm512_loadu_ps(tile)));
}

// 32 int8 weights (8 outputs x 4 inputs) -> 32 bf16, exact (|w| <= 127).
__attribute__((target(AVX512 ",avx512bf16"))) static inline __m512 widen_bf16(const int8_t *p) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 16))));
    return (__m512)_mm512_cvtne2ps_pbh(hi, lo);
}
// Each micro-kernel is compiled for chunks of 6, 4 and 2 rows (this file includes its micro-kernel part, at the
// end, once per row count): a batch's last chunk and a query's few routed rows then pay for at most one extra
// row, not up to 5.
#define ALLMPNET_MICRO_KERNELS
#define PASTE_(a, b) a##_##b
#define PASTE(a, b) PASTE_(a, b)
#define ROWS_NAME(base) PASTE(base, ROW_COUNT)
#define ROW_POINTER(m) const __typeof__(x[0]) r##m = x[m];
#define ROW_COUNT 6
#define ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
#include __FILE__
#undef ROW_COUNT
#undef ROWS
#define ROW_COUNT 4
#define ROWS(X) X(0) X(1) X(2) X(3)
#include __FILE__
#undef ROW_COUNT
#undef ROWS
#define ROW_COUNT 2
#define ROWS(X) X(0) X(1)
#include __FILE__
#undef ROW_COUNT
#undef ROWS
#undef ALLMPNET_MICRO_KERNELS

// ---------------------------------------------------------------- drivers, one per ISA

#include <omp.h>

// Rows list[0..count) through micro-kernel MK (activations of type T at ACT) into y: blocks of MB rows, within
// each the 64-output blocks shared between the threads.
#define RUN_ROWS(MK, T, ACT, EXTRA, list, count)                                                                  \
    for (int64_t mb = 0; mb < (count); mb += MB) {                                                               \
        const int64_t mb_end = mb + MB < (count) ? mb + MB : (count);                                            \
        _Pragma("omp for schedule(static) nowait") for (int64_t nb = 0; nb < blocks; nb++) {                     \
            const int8_t *panel = a->packed + nb * K * NB;                                                       \
            const float *scales = a->scales + nb * (K / a->group) * NB;                                          \
            for (int64_t c0 = mb; c0 < mb_end; c0 += MR) {                                                       \
                const int rows = (int)(mb_end - c0 < MR ? mb_end - c0 : MR);                                     \
                const int32_t *out = (list) + c0;                                                                \
                const T *x[MR];                                                                                  \
                for (int m = 0; m < MR; m++) x[m] = (const T *)(ACT) + (int64_t)out[m < rows ? m : 0] * K;       \
                memset(tile, 0, sizeof tile);                                                                     \
                if (rows > 4)                                                                                     \
                    PASTE(MK, 6)(x, K, panel, scales, EXTRA(nb) a->group, tile);                                 \
                else if (rows > 2)                                                                                \
                    PASTE(MK, 4)(x, K, panel, scales, EXTRA(nb) a->group, tile);                                 \
                else                                                                                              \
                    PASTE(MK, 2)(x, K, panel, scales, EXTRA(nb) a->group, tile);                                 \
                finish_rows(a, out, rows, nb, tile);                                                              \
            }                                                                                                     \
        }                                                                                                         \
    }

#define NO_EXTRA(nb)
#define A8_EXTRA(nb) a->compensation + (nb) * (K / a->group) * NB,

// One function per kernel: prepare the rows (in parallel), list them (int8 rows first, then any routed to
// int16), multiply. ROUTED is the int16 micro-kernel of the same ISA (int8 kernel only).
#define DRIVER(NAME, TARGET, KIND, MK, T, EXTRA, ROUTED)                                                          \
    __attribute__((target(TARGET))) static int64_t NAME(const linear_args *a, float *buffers, int threads) {    \
        const int64_t M = a->M, K = a->K, blocks = (a->N + NB - 1) / NB;                                          \
        int64_t primary = 0;                                                                                      \
        _Pragma("omp parallel num_threads(threads)") {                                                            \
            float *buffer = buffers + (int64_t)omp_get_thread_num() * K;                                         \
            _Pragma("omp for schedule(static)") for (int64_t m = 0; m < M; m++)                                   \
                a->routed[m] = prepare_row(a, KIND, m, buffer);                                                  \
            _Pragma("omp single") {                                                                                \
                /* flags -> row lists; the int8 rows keep their order, then the routed ones */                    \
                int64_t routed = 0;                                                                                \
                for (int64_t m = 0; m < M; m++) routed += a->routed[m];                                           \
                int64_t first = 0, second = M - routed;                                                           \
                primary = second;                                                                                  \
                for (int64_t m = 0; m < M; m++) {                                                                 \
                    a->order[a->routed[m] ? second++ : first++] = (int32_t)m;                                     \
                }                                                                                                  \
            }                                                                                                      \
            float tile[MR][NB] __attribute__((aligned(64)));                                                      \
            RUN_ROWS(MK, T, a->act, EXTRA, a->order, primary)                                                     \
            ROUTED                                                                                                 \
        }                                                                                                           \
        return M - primary;                                                                                        \
    }

#define NOT_ROUTED
#define ROUTED_VNNI RUN_ROWS(mk_vnni_a16, int16_t, a->act16, NO_EXTRA, a->order + primary, M - primary)

DRIVER(run_vnni_a8, AVX512 ",avx512vnni", ACT_U8, mk_vnni_a8, uint8_t, A8_EXTRA, ROUTED_VNNI)
DRIVER(run_vnni_a16, AVX512 ",avx512vnni", ACT_I16, mk_vnni_a16, int16_t, NO_EXTRA, NOT_ROUTED)
DRIVER(run_avx512_a16, AVX512, ACT_I16, mk_avx512_a16, int16_t, NO_EXTRA, NOT_ROUTED)
DRIVER(run_avx512_bf16, AVX512 ",avx512bf16", ACT_BF16, mk_avx512_bf16, uint16_t, NO_EXTRA, NOT_ROUTED)
DRIVER(run_avx512_f32, AVX512, ACT_F32, mk_avx512_f32, float, NO_EXTRA, NOT_ROUTED)
DRIVER(run_avx2_a16, AVX2, ACT_I16, mk_avx2_a16, int16_t, NO_EXTRA, NOT_ROUTED)
DRIVER(run_avx2_f32, AVX2, ACT_F32, mk_avx2_f32, float, NO_EXTRA, NOT_ROUTED)

static const int act_size[] = {[ACT_F32] = 4, [ACT_BF16] = 2, [ACT_I16] = 2, [ACT_U8] = 1};

static int64_t aligned(int64_t bytes) { return (bytes + 63) / 64 * 64; }

// Bytes of scratch the caller provides: the prepared activations (and int16 ones for routed rows), row scales,
// row order and routing flags, and a row of fp32 per thread.
int64_t allmpnet_x86_scratch_bytes(int kernel, int64_t M, int64_t K, int threads) {
    const int64_t routed = kernel == KERNEL_VNNI_A8 ? aligned(M * K * 2) : 0;
    return aligned(M * K * act_size[activation_kind(kernel)]) + routed + 3 * aligned(M * 4)
           + (int64_t)(threads < 1 ? 1 : threads) * K * 4;
}

// Arrays as described at the top, N padded to whole blocks of 64 in packed, scales and compensation (zeros);
// x (M, K), residual and y (M, N); bias (N,) or NULL; smooth (K,) or NULL: x is multiplied by it first;
// route (int8 kernel; 0: off): rows whose largest |x| exceeds route x their root mean square run with int16
// activations instead (a per-token scale set by one huge value leaves the row's other values a few levels);
// scratch: allmpnet_x86_scratch_bytes, 64-byte aligned.
// Returns the number of rows routed to int16 (>= 0); -1 for shapes the kernels do not handle (K % group,
// group % 4, or group > 512 for int16 activations: a group's int32 sums must stay below 2^31; the int8 kernel's
// stay below 2^31 for K < 16k); -2 when this CPU lacks the kernel's instructions.
int64_t allmpnet_x86_linear(int kernel, const void *x, int x_bf16, const float *smooth, const int8_t *packed,
                            const float *scales, const int32_t *compensation, int64_t group, const float *bias,
                            const void *residual, void *y, int y_bf16, int64_t M, int64_t N, int64_t K, int gelu,
                            float route, void *scratch, int threads) {
    if (!allmpnet_x86_kernel_supported(kernel)) return -2;
    const int kind = activation_kind(kernel);
    const int a8 = kernel == KERNEL_VNNI_A8;
    if (N <= 0 || K <= 0 || group <= 0 || group % 4 || K % group || M < 0
        || ((kind == ACT_I16 || (a8 && route > 0.0f)) && group > 512) || (a8 && !compensation))
        return -1;
    if (M == 0) return 0;
    if (threads < 1) threads = 1;
    char *at = (char *)scratch;
    linear_args a = {x, x_bf16, smooth, packed, scales, compensation, group, bias, residual, y, y_bf16, M, N, K,
                     gelu, a8 ? route : 0.0f, NULL, NULL, NULL, NULL, NULL};
    a.act = at;
    at += aligned(M * K * act_size[kind]);
    if (a8) {
        a.act16 = (int16_t *)at;
        at += aligned(M * K * 2);
    }
    a.row_scale = (float *)at;
    at += aligned(M * 4);
    a.order = (int32_t *)at;
    at += aligned(M * 4);
    a.routed = (int32_t *)at;
    at += aligned(M * 4);
    float *buffers = (float *)at;
    if (kind == ACT_F32 || kind == ACT_BF16) a.row_scale = NULL;  // finish_rows: no per-row scale
    const linear_args *args = &a;
    switch (kernel) {
        case KERNEL_VNNI_A8: return run_vnni_a8(args, buffers, threads);
        case KERNEL_VNNI_A16: return run_vnni_a16(args, buffers, threads);
        case KERNEL_AVX512_A16: return run_avx512_a16(args, buffers, threads);
        case KERNEL_AVX512_BF16: return run_avx512_bf16(args, buffers, threads);
        case KERNEL_AVX512_F32: return run_avx512_f32(args, buffers, threads);
        case KERNEL_AVX2_A16: return run_avx2_a16(args, buffers, threads);
        case KERNEL_AVX2_F32: return run_avx2_f32(args, buffers, threads);
        default: return -2;
    }
}

#else  // ALLMPNET_MICRO_KERNELS: the part included once per row count

// A8 (VNNI): 4 vectors of 16 outputs per row, each lane one output.
#define A8_START(m) __m512i c##m##0 = s0, c##m##1 = s1, c##m##2 = s2, c##m##3 = s3;
#define A8_STEP(m)                                                            \
    {                                                                         \
        const __m512i xa = _mm512_set1_epi32(*(const int32_t *)(r##m + k)); \
        c##m##0 = _mm512_dpbusd_epi32(c##m##0, xa, w0);                       \
        c##m##1 = _mm512_dpbusd_epi32(c##m##1, xa, w1);                       \
        c##m##2 = _mm512_dpbusd_epi32(c##m##2, xa, w2);                       \
        c##m##3 = _mm512_dpbusd_epi32(c##m##3, xa, w3);                       \
    }
#define A8_FLUSH(m)                                                                   \
    add_scaled(tile[m], _mm512_cvtepi32_ps(c##m##0), scale);                          \
    add_scaled(tile[m] + 16, _mm512_cvtepi32_ps(c##m##1), scale + 16);                \
    add_scaled(tile[m] + 32, _mm512_cvtepi32_ps(c##m##2), scale + 32);                \
    add_scaled(tile[m] + 48, _mm512_cvtepi32_ps(c##m##3), scale + 48);

__attribute__((target(AVX512 ",avx512vnni"), noinline)) static void
ROWS_NAME(mk_vnni_a8)(const uint8_t *const *x, int64_t K, const int8_t *panel, const float *scales, const int32_t *compensation,
           int64_t group, float tile[][NB]) {
    ROWS(ROW_POINTER)
    for (int64_t k0 = 0; k0 < K; k0 += group) {
        const int32_t *start = compensation + k0 / group * NB;
        const __m512i s0 = _mm512_loadu_si512(start), s1 = _mm512_loadu_si512(start + 16);
        const __m512i s2 = _mm512_loadu_si512(start + 32), s3 = _mm512_loadu_si512(start + 48);
        ROWS(A8_START)
        for (int64_t k = k0; k < k0 + group; k += 4) {
            const int8_t *w = panel + k * NB;
            for (int line = 0; line < 256; line += 64) _mm_prefetch((const char *)w + PREFETCH + line, _MM_HINT_T0);
            const __m512i w0 = _mm512_loadu_si512(w), w1 = _mm512_loadu_si512(w + 64);
            const __m512i w2 = _mm512_loadu_si512(w + 128), w3 = _mm512_loadu_si512(w + 192);
            ROWS(A8_STEP)
        }
        const float *scale = scales + k0 / group * NB;
        ROWS(A8_FLUSH)
    }
}

// A16 and BF16 (AVX512): per pass 32 outputs as 4 vectors of 8 outputs x 2 partial sums; a step's 4 inputs are
// broadcast as one 64-bit pattern, so lane 2j takes inputs 0-1 and lane 2j+1 inputs 2-3 of output j.
#define P_START(m) VEC c##m##0 = ZERO, c##m##1 = ZERO, c##m##2 = ZERO, c##m##3 = ZERO;
#define P_STEP(m)                                                             \
    {                                                                         \
        const __m512i xa = _mm512_set1_epi64(*(const int64_t *)(r##m + k)); \
        c##m##0 = DOT(c##m##0, xa, w0);                                       \
        c##m##1 = DOT(c##m##1, xa, w1);                                       \
        c##m##2 = DOT(c##m##2, xa, w2);                                       \
        c##m##3 = DOT(c##m##3, xa, w3);                                       \
    }
#define P_FLUSH(m)                                                                           \
    add_scaled(tile[m] + 32 * half, TO_F32(FOLD(c##m##0, c##m##1)), scale);                  \
    add_scaled(tile[m] + 32 * half + 16, TO_F32(FOLD(c##m##2, c##m##3)), scale + 16);

#define MK_PAIRS(NAME, TARGET, ACT_T)                                                                            \
    __attribute__((target(TARGET), noinline)) static void NAME(const ACT_T *const *x, int64_t K, const int8_t *panel,             \
                                                     const float *scales, int64_t group, float tile[][NB]) {     \
        ROWS(ROW_POINTER)                                                                                         \
        for (int half = 0; half < 2; half++) {                                                                   \
            for (int64_t k0 = 0; k0 < K; k0 += group) {                                                          \
                ROWS(P_START)                                                                                     \
                for (int64_t k = k0; k < k0 + group; k += 4) {                                                   \
                    const int8_t *w = panel + k * NB + 128 * half;                                               \
                    _mm_prefetch((const char *)w + PREFETCH, _MM_HINT_T0);                                       \
                    _mm_prefetch((const char *)w + PREFETCH + 64, _MM_HINT_T0);                                  \
                    const VEC w0 = WIDEN(w), w1 = WIDEN(w + 32), w2 = WIDEN(w + 64), w3 = WIDEN(w + 96);         \
                    ROWS(P_STEP)                                                                                  \
                }                                                                                                 \
                const float *scale = scales + k0 / group * NB + 32 * half;                                       \
                ROWS(P_FLUSH)                                                                                     \
            }                                                                                                     \
        }                                                                                                         \
    }

#define VEC __m512i
#define ZERO _mm512_setzero_si512()
#define WIDEN(p) _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p)))
#define FOLD fold_pairs_i32
#define TO_F32(v) _mm512_cvtepi32_ps(v)
#define DOT(acc, xa, w) _mm512_dpwssd_epi32(acc, xa, w)
MK_PAIRS(ROWS_NAME(mk_vnni_a16), AVX512 ",avx512vnni", int16_t)
#undef DOT
#define DOT(acc, xa, w) _mm512_add_epi32(acc, _mm512_madd_epi16(xa, w))
MK_PAIRS(ROWS_NAME(mk_avx512_a16), AVX512, int16_t)
#undef VEC
#undef ZERO
#undef WIDEN
#undef FOLD
#undef TO_F32
#undef DOT

#define VEC __m512
#define ZERO _mm512_setzero_ps()
#define WIDEN widen_bf16
#define FOLD fold_pairs_f32
#define TO_F32(v) (v)
#define DOT(acc, xa, w) _mm512_dpbf16_ps(acc, (__m512bh)(xa), (__m512bh)(w))
MK_PAIRS(ROWS_NAME(mk_avx512_bf16), AVX512 ",avx512bf16", uint16_t)
#undef VEC
#undef ZERO
#undef WIDEN
#undef FOLD
#undef TO_F32
#undef DOT

// F32 (AVX512): per pass 16 outputs as 4 vectors of 4 outputs x 4 partial sums (the step's 4 inputs broadcast
// as a 128-bit pattern).
#define F_START(m) __m512 c##m##0 = _mm512_setzero_ps(), c##m##1 = c##m##0, c##m##2 = c##m##0, c##m##3 = c##m##0;
#define F_STEP(m)                                                                 \
    {                                                                             \
        const __m512 xa = _mm512_broadcast_f32x4(_mm_loadu_ps(r##m + k));    \
        c##m##0 = _mm512_fmadd_ps(xa, w0, c##m##0);                               \
        c##m##1 = _mm512_fmadd_ps(xa, w1, c##m##1);                               \
        c##m##2 = _mm512_fmadd_ps(xa, w2, c##m##2);                               \
        c##m##3 = _mm512_fmadd_ps(xa, w3, c##m##3);                               \
    }
#define F_FLUSH(m) \
    add_scaled(tile[m] + 16 * quarter, fold_pairs_f32(fold_pairs_f32(c##m##0, c##m##1), fold_pairs_f32(c##m##2, c##m##3)), scale);
#define WIDEN_F32(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))

__attribute__((target(AVX512), noinline)) static void
ROWS_NAME(mk_avx512_f32)(const float *const *x, int64_t K, const int8_t *panel, const float *scales, int64_t group, float tile[][NB]) {
    ROWS(ROW_POINTER)
    for (int quarter = 0; quarter < 4; quarter++) {
        for (int64_t k0 = 0; k0 < K; k0 += group) {
            ROWS(F_START)
            for (int64_t k = k0; k < k0 + group; k += 4) {
                const int8_t *w = panel + k * NB + 64 * quarter;
                _mm_prefetch((const char *)w + PREFETCH, _MM_HINT_T0);
                const __m512 w0 = WIDEN_F32(w), w1 = WIDEN_F32(w + 16), w2 = WIDEN_F32(w + 32), w3 = WIDEN_F32(w + 48);
                ROWS(F_STEP)
            }
            const float *scale = scales + k0 / group * NB + 16 * quarter;
            ROWS(F_FLUSH)
        }
    }
}

// AVX2: per pass 8 outputs (A16: 2 vectors of 4 outputs x 2 partial sums) or 4 outputs (F32: 2 vectors of 2
// outputs x 4 partial sums); 16 registers hold 6 rows x 2 vectors of sums.
#define H_START(m) __m256i c##m##0 = _mm256_setzero_si256(), c##m##1 = c##m##0;
#define H_STEP(m)                                                                    \
    {                                                                                \
        const __m256i xa = _mm256_set1_epi64x(*(const int64_t *)(r##m + k));    \
        c##m##0 = _mm256_add_epi32(c##m##0, _mm256_madd_epi16(xa, w0));              \
        c##m##1 = _mm256_add_epi32(c##m##1, _mm256_madd_epi16(xa, w1));              \
    }
// [o0 o0 o1 o1 | o2 o2 o3 o3], [o4 .. o7] -> hadd: [o0 o1 o4 o5 | o2 o3 o6 o7] -> in order
#define H_FLUSH(m)                                                                                         \
    {                                                                                                      \
        const __m256i sums = _mm256_permute4x64_epi64(_mm256_hadd_epi32(c##m##0, c##m##1), 0xD8);         \
        float *t = tile[m] + 8 * part;                                                                     \
        _mm256_storeu_ps(t, _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_loadu_ps(scale), _mm256_loadu_ps(t))); \
    }

__attribute__((target(AVX2), noinline)) static void
ROWS_NAME(mk_avx2_a16)(const int16_t *const *x, int64_t K, const int8_t *panel, const float *scales, int64_t group, float tile[][NB]) {
    ROWS(ROW_POINTER)
    for (int part = 0; part < 8; part++) {
        for (int64_t k0 = 0; k0 < K; k0 += group) {
            ROWS(H_START)
            for (int64_t k = k0; k < k0 + group; k += 4) {
                const int8_t *w = panel + k * NB + 32 * part;
                _mm_prefetch((const char *)w + PREFETCH, _MM_HINT_T0);
                const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w));
                const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 16)));
                ROWS(H_STEP)
            }
            const float *scale = scales + k0 / group * NB + 8 * part;
            ROWS(H_FLUSH)
        }
    }
}

#define G_START(m) __m256 c##m##0 = _mm256_setzero_ps(), c##m##1 = c##m##0;
#define G_STEP(m)                                                                    \
    {                                                                                \
        const __m256 xa = _mm256_broadcast_ps((const __m128 *)(r##m + k));      \
        c##m##0 = _mm256_fmadd_ps(xa, w0, c##m##0);                                  \
        c##m##1 = _mm256_fmadd_ps(xa, w1, c##m##1);                                  \
    }
// [o0 x4 | o1 x4], [o2 x4 | o3 x4] -> [o0 o2 o0 o2 | o1 o3 o1 o3] -> o0 o1 o2 o3
#define G_FLUSH(m)                                                                                         \
    {                                                                                                      \
        const __m256 h = _mm256_hadd_ps(c##m##0, c##m##1), h2 = _mm256_hadd_ps(h, h);                     \
        const __m128 sums = _mm_unpacklo_ps(_mm256_castps256_ps128(h2), _mm256_extractf128_ps(h2, 1));    \
        float *t = tile[m] + 4 * part;                                                                     \
        _mm_storeu_ps(t, _mm_fmadd_ps(sums, _mm_loadu_ps(scale), _mm_loadu_ps(t)));                        \
    }
#define WIDEN_F32X8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))

__attribute__((target(AVX2), noinline)) static void
ROWS_NAME(mk_avx2_f32)(const float *const *x, int64_t K, const int8_t *panel, const float *scales, int64_t group, float tile[][NB]) {
    ROWS(ROW_POINTER)
    for (int part = 0; part < 16; part++) {
        for (int64_t k0 = 0; k0 < K; k0 += group) {
            ROWS(G_START)
            for (int64_t k = k0; k < k0 + group; k += 4) {
                const int8_t *w = panel + k * NB + 16 * part;
                _mm_prefetch((const char *)w + PREFETCH, _MM_HINT_T0);
                const __m256 w0 = WIDEN_F32X8(w), w1 = WIDEN_F32X8(w + 8);
                ROWS(G_STEP)
            }
            const float *scale = scales + k0 / group * NB + 4 * part;
            ROWS(G_FLUSH)
        }
    }
}

#endif

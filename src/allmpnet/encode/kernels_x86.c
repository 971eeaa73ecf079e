// int8-weight linear layers for x86 CPUs (compiled and loaded by int8_x86.py); on AMX-int8, W8A8 on the tiles.
//
// allmpnet_x86_linear: y = act(x W^T + b) [+ residual], W stored as int8 with one fp32 scale per output channel
// and group of `group` inputs; act is none or GELU (erf); x, residual and y are fp32 or bf16.
//
// One packed weight layout serves every kernel, so a layer keeps a single int8 copy whatever the batch size:
//   packed [N/64][K/4][64][4] int8 (N padded to a multiple of 64): per block of 64 outputs and step of 4 inputs, 64 outputs x 4 inputs (the
//          order AVX512-VNNI's vpdpbusd reads: 16 outputs x 4 inputs per vector);
//   scales [N/64][K/group][64] fp32;
//   compensation [N/64 x 64] fp32: -128 x sum over groups of (scale x the group's sum of int8 weights), for the
//          int8-activation kernel only (its activations are stored as q + 128, an unsigned byte, since vpdpbusd
//          multiplies unsigned by signed bytes: a row's scaled group sums started there add up to those of q w;
//          one float per output rather than an int32 per output and group, 3% of the bytes a query streams).
//
// Kernels, by how the activations are multiplied (`kernel` argument; the caller picks one the CPU has, and the
// function refuses, rather than crashes, when the CPU lacks it):
//   A8   int8 activations, a scale per row (token), vpdpbusd: 64 multiply-adds per instruction. W8A8. AMX_A8:
//        the same rows and sums on AMX-int8 tiles, tdpbusd (16 rows x 16 outputs x 64 inputs), large batches.
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
#include <cpuid.h>
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "amx_tiles.h"
#include "simd_math.h"

#define NB 64            // outputs per packed block
#define MR 6             // rows per micro-kernel call
#define MB 192           // rows per block whose prepared activations are reused by every output block
#define SMALL_CHUNKS 4   // batches of at most this many chunks of MR rows go through each output block group by group
// Packed weights are requested this many bytes ahead of the step being multiplied, into L2 (_MM_HINT_T1): 2 KB
// ahead into L1 streamed 9 rows' weights at 17 GB/s of the 29 the memory gives 2 Zen 4 cores, 16 KB into L2 at 21
// (benchmarks/int8_research/kernel_variants.py); large batches are unchanged.
#define PREFETCH 16384
#define PREFETCH_HINT _MM_HINT_T1
#define MAX_TEXT 512  // tokens of one text in allmpnet_x86_encoder (MPNet's 514 positions less the two padding slots)
// A spiky row (int8 kernel, route > 0) keeps its entries above SPLIT_SHARE x route x its RMS aside, exact, when
// there are at most MAX_SPLIT of them (int8_x86.py mirrors both): the rest of the row is int8 at a scale its own
// values set, and each kept entry adds its value times its weight column at the block's end. More than MAX_SPLIT:
// the row runs with int16 activations. Over 600 STSBenchmark sentences and 32 SciFact passages 8.5% of the rows
// were spiky, mostly with 1-4 such entries (<s>, </s>, punctuation; the FFN down projection above all), none with
// more than 8 (benchmarks/int8_research/split_rows.py).
#define SPLIT_SHARE 0.6f
#define MAX_SPLIT 8

enum {
    KERNEL_AVX2_F32 = 1,
    KERNEL_AVX2_A16 = 2,
    KERNEL_AVX512_F32 = 3,
    KERNEL_AVX512_A16 = 4,
    KERNEL_AVX512_BF16 = 5,
    KERNEL_VNNI_A16 = 6,
    KERNEL_VNNI_A8 = 7,
    KERNEL_AVX512_F32W = 8,  // fp32 weights, (N, K) as the model stores them (see F32W below)
    KERNEL_AVX2_F32W = 9,
    KERNEL_AVXVNNI_A8 = 10,  // A8 on 256-bit vectors: AVX-VNNI's VEX vpdpbusd (AVX2 CPUs: Alder Lake, Sierra Forest)
    KERNEL_VNNI256_A8 = 11,  // the same code with AVX512-VNNI's EVEX form on 256 bits (tests and research)
    KERNEL_AMX_A8 = 12,      // A8 on AMX-int8 tiles (Sapphire Rapids on): large batches; the same sums as VNNI_A8
    KERNEL_LAST = KERNEL_AMX_A8,
};

// GCC 11+ and clang 12+ know AVX-VNNI (its header's include guard); older compilers build the rest without it
#if defined(_AVXVNNIINTRIN_H_INCLUDED) || defined(__AVXVNNIINTRIN_H)
#define HAVE_AVXVNNI 1
#else
#define HAVE_AVXVNNI 0
#endif

// The kernels with int8 activations (vpdpbusd): their rows may be spiky, and their sums start at the compensation.
static inline int int8_activations(int kernel) {
    return kernel == KERNEL_VNNI_A8 || kernel == KERNEL_AVXVNNI_A8 || kernel == KERNEL_VNNI256_A8
           || kernel == KERNEL_AMX_A8;
}

// The kernels written for AVX2 CPUs (no AVX-512 instruction): the fused stack pairs them with AVX2's attention.
static inline int avx2_kernel(int kernel) {
    return kernel == KERNEL_AVX2_F32 || kernel == KERNEL_AVX2_A16 || kernel == KERNEL_AVX2_F32W
           || kernel == KERNEL_AVXVNNI_A8;
}

enum { ACT_F32, ACT_BF16, ACT_I16, ACT_U8 };

static int activation_kind(int kernel) {
    switch (kernel) {
        case KERNEL_AVX2_F32: case KERNEL_AVX512_F32: case KERNEL_AVX512_F32W: case KERNEL_AVX2_F32W: return ACT_F32;
        case KERNEL_AVX512_BF16: return ACT_BF16;
        case KERNEL_AVX2_A16: case KERNEL_AVX512_A16: case KERNEL_VNNI_A16: return ACT_I16;
        default: return ACT_U8;
    }
}

// CPUID leaf 7, EDX bits: the tiles themselves and the two kinds of products on them
#define AMX_TILE_BIT 24
#define AMX_INT8_BIT 25
#define AMX_BF16_BIT 22

// AMX-TILE and the products of `bit` (AMX_INT8_BIT, AMX_BF16_BIT), and the tile state granted to this process
// (Linux hands it out on request only; asking again is harmless)
static int amx_ready(int bit) {
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << AMX_TILE_BIT)) || !(edx & (1u << bit)))
        return 0;
    return request_amx_state() == 0;
}

// The caller passes what it read from the CPU's flags; this second check keeps a wrong caller from crashing the
// process with an illegal instruction.
int allmpnet_x86_kernel_supported(int kernel) {
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
                       && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    switch (kernel) {
        case KERNEL_AVX2_F32: case KERNEL_AVX2_A16: case KERNEL_AVX2_F32W: return avx2;
        case KERNEL_AVX512_F32: case KERNEL_AVX512_A16: case KERNEL_AVX512_F32W: return avx512;
        case KERNEL_AVX512_BF16: return avx512 && __builtin_cpu_supports("avx512bf16");
        case KERNEL_VNNI_A16: case KERNEL_VNNI_A8: case KERNEL_VNNI256_A8:
            return avx512 && __builtin_cpu_supports("avx512vnni");
        case KERNEL_AMX_A8: return avx512 && __builtin_cpu_supports("avx512vnni") && amx_ready(AMX_INT8_BIT);
#if HAVE_AVXVNNI  // older compilers reject the name
        case KERNEL_AVXVNNI_A8: return avx2 && __builtin_cpu_supports("avxvnni");
#endif
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

// GELU(v) = v / 2 (1 + erf(v / sqrt 2)), erf by Abramowitz & Stegun 7.1.28: 1 - 1 / p(|x|)^16, p of degree 6
// (absolute error < 3e-7). In the up projection's epilogue it took ~30% fewer cycles than 7.1.26, whose
// exponential needs another polynomial (that layer 3.5% faster on 2 Zen 4 cores).
static inline __attribute__((always_inline)) float gelu(float v) {
    const float a = __builtin_fabsf(v) * 0.707106781f;
    float p = 1.0f + a * (0.0705230784f + a * (0.0422820123f + a * (0.0092705272f + a * (0.0001520143f
                                                                                       + a * (0.0002765672f
                                                                                              + a * 0.0000430638f)))));
    p *= p;
    p *= p;
    p *= p;
    p *= p;  // p^16: inf for |v| above ~19, where erf is 1 in fp32
    const float erf_abs = 1.0f - 1.0f / p;
    return 0.5f * v + 0.5f * __builtin_fabsf(v) * erf_abs;  // v / 2 (1 + sign(v) erf|v / sqrt 2|)
}

typedef struct {
    const void *x;
    int x_bf16;
    const float *smooth;
    const int8_t *packed;
    const float *scales;
    const float *compensation;
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
    int32_t *split_count; // (M,): entries of the row kept aside (int8 kernel), their inputs and values:
    int32_t *split_index; // (M, MAX_SPLIT)
    float *split_value;   // (M, MAX_SPLIT)
} linear_args;

static inline __attribute__((always_inline)) void quantize_i16(const float *v, int64_t K, float largest,
                                                              int16_t *out, float *scale) {
    const float inverse = largest > 0.0f ? 32767.0f / largest : 0.0f;
    *scale = largest / 32767.0f;
    for (int64_t k = 0; k < K; k++) out[k] = (int16_t)__builtin_rintf(v[k] * inverse);
}

// The largest |v[k]|, as an integer max over the bits (same order for non-negative floats): GCC vectorises this
// reduction, not the float one.
static inline __attribute__((always_inline)) float largest_magnitude(const float *v, int64_t K) {
    uint32_t top_bits = 0;
    for (int64_t k = 0; k < K; k++) {
        uint32_t bits;
        memcpy(&bits, v + k, 4);
        bits &= 0x7fffffffu;
        top_bits = bits > top_bits ? bits : top_bits;
    }
    float largest;
    memcpy(&largest, &top_bits, 4);
    return largest;
}

// Entries of v[from..to) whose square exceeds bar -> (index, value) from slot j on, zeroed in v; returns the next slot.
static inline __attribute__((always_inline)) int keep_aside(float *v, int64_t from, int64_t to, float bar,
                                                            int32_t *index, float *value, int j) {
    for (int64_t k = from; k < to; k++)
        if (v[k] * v[k] > bar) {
            index[j] = (int32_t)k;
            value[j++] = v[k];
            v[k] = 0.0f;
        }
    return j;
}

// Row m of x (times smooth) -> the kernel's activation form; returns 1 when the row was routed to int16. Plain
// loops: each ISA's caller vectorises them.
static inline __attribute__((always_inline)) int prepare_row(const linear_args *a, int kind, int64_t m,
                                                            float *buffer) {
    const int64_t K = a->K;
    const float *smooth = a->smooth;
    if (a->split_count) a->split_count[m] = 0;
    if (a->x_bf16) {
        const uint16_t *row = (const uint16_t *)a->x + m * K;
        for (int64_t k = 0; k < K; k++) buffer[k] = bf16_load(row + k);
    } else {
        memcpy(buffer, (const float *)a->x + m * K, K * 4);
    }
    if (smooth)
        for (int64_t k = 0; k < K; k++) buffer[k] *= smooth[k];
    float largest = largest_magnitude(buffer, K);
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
                const float bar = SPLIT_SHARE * SPLIT_SHARE * a->route * a->route * squares / (float)K;
                int count = 0;
                for (int64_t k = 0; k < K; k++) count += buffer[k] * buffer[k] > bar;
                if (count > MAX_SPLIT) {
                    quantize_i16(buffer, K, largest, a->act16 + m * K, a->row_scale + m);
                    return 1;
                }
                int32_t *index = a->split_index + m * MAX_SPLIT;
                float *value = a->split_value + m * MAX_SPLIT;
                // whole vectors of 16 tested at once (a vectorised OR), element by element only where one hit: a
                // loop recording the entries one at a time stays scalar, and on sentences took 3% of all the time
                int j = 0;
                int64_t k0 = 0;
                for (; k0 + 16 <= K; k0 += 16) {
                    int hit = 0;
                    for (int i = 0; i < 16; i++) hit |= buffer[k0 + i] * buffer[k0 + i] > bar;
                    if (hit) j = keep_aside(buffer, k0, k0 + 16, bar, index, value, j);
                }
                keep_aside(buffer, k0, K, bar, index, value, j);
                largest = largest_magnitude(buffer, K);
                a->split_count[m] = count;
            }
        }
        const float inverse = largest > 0.0f ? 127.0f / largest : 0.0f;
        // 1: a split row's kept entries divide by it; NaN (largest, as the bits' max finds it) keeps the row's
        // outputs NaN rather than the finite values its undefined bytes would give
        a->row_scale[m] = largest > 0.0f ? largest / 127.0f : largest == 0.0f ? 1.0f : largest;
        uint8_t *out = (uint8_t *)a->act + m * K;
        for (int64_t k = 0; k < K; k++) out[k] = (uint8_t)((int32_t)__builtin_rintf(buffer[k] * inverse) + 128);
    }
    return 0;
}

// One row of a block: v (width fp32 sums) -> y_row, through scale, bias, GELU, residual. Everything the loops read
// is hoisted into restrict-qualified locals: reading it through `a` in the loop, GCC could not rule out the tile's
// stores changing it, kept the loops scalar, and this epilogue took 20% of a large batch's time.
static inline __attribute__((always_inline)) void finish_row(float *restrict v, int width, float s,
                                                            const float *restrict bias, int gelu_on,
                                                            const void *restrict residual, void *restrict y,
                                                            int bf16) {
    if (bias)
        for (int n = 0; n < width; n++) v[n] = v[n] * s + bias[n];
    else
        for (int n = 0; n < width; n++) v[n] *= s;
    if (gelu_on)
        for (int n = 0; n < width; n++) v[n] = gelu(v[n]);
    if (residual && bf16)
        for (int n = 0; n < width; n++) v[n] += bf16_load((const uint16_t *)residual + n);
    else if (residual)
        for (int n = 0; n < width; n++) v[n] += ((const float *)residual)[n];
    if (bf16)
        for (int n = 0; n < width; n++) ((uint16_t *)y)[n] = bf16_round(v[n]);
    else
        for (int n = 0; n < width; n++) ((float *)y)[n] = v[n];
}

// The lines of y rows out[0..rows) in block nb requested for writing (and the residual's for reading) before the
// chunk's multiply: touched only at its end, they otherwise each waited there for memory (a large batch's outputs
// are far beyond the caches), and the stores alone cost 20% of a large batch's time.
static inline __attribute__((always_inline)) void claim_rows(const linear_args *a, const int32_t *out, int rows,
                                                            int64_t nb) {
    const int size = a->y_bf16 ? 2 : 4;
    const int64_t width = (a->N - nb * NB < NB ? a->N - nb * NB : NB) * size;
    for (int m = 0; m < rows; m++) {
        const int64_t at = ((int64_t)out[m] * a->N + nb * NB) * size;
        for (int64_t line = 0; line < width; line += 64) {
            __builtin_prefetch((const char *)a->y + at + line, 1, 3);
            if (a->residual) __builtin_prefetch((const char *)a->residual + at + line, 0, 3);
        }
    }
}

// The entries row `row` kept aside, times their weights in block nb, added to its sums v (which the row scale s
// multiplies next).
static inline __attribute__((always_inline)) void add_split(const linear_args *a, int64_t row, int64_t nb,
                                                           float *restrict v, float s) {
    const int64_t K = a->K;
    for (int j = 0; j < a->split_count[row]; j++) {
        const int64_t k = a->split_index[row * MAX_SPLIT + j];
        const float c = a->split_value[row * MAX_SPLIT + j] / s;
        const int8_t *restrict w = a->packed + (nb * K + (k & ~3)) * NB + (k & 3);
        const float *restrict scale = a->scales + (nb * (K / a->group) + k / a->group) * NB;
        for (int n = 0; n < NB; n++) v[n] += c * scale[n] * (float)w[4 * n];
    }
}

// tile (rows x 64 fp32 sums of block nb) -> y rows out[0..rows), through row scale, bias, GELU, residual.
static inline __attribute__((always_inline)) void finish_rows(const linear_args *a, const int32_t *out, int rows,
                                                             int64_t nb, float tile[][NB]) {
    const int64_t N = a->N, n0 = nb * NB;
    const int width = N - n0 < NB ? (int)(N - n0) : NB;  // the last block may be partly padding
    const float *row_scale = a->row_scale, *bias = a->bias ? a->bias + n0 : NULL;
    const int gelu_on = a->gelu, bf16 = a->y_bf16, size = bf16 ? 2 : 4;
    const char *residual = (const char *)a->residual;
    char *y = (char *)a->y;
    for (int m = 0; m < rows; m++) {
        const float s = row_scale ? row_scale[out[m]] : 1.0f;
        if (a->split_count && a->split_count[out[m]]) add_split(a, out[m], nb, tile[m], s);
        const int64_t at = ((int64_t)out[m] * N + n0) * size;
        if (width == NB)  // a constant trip count: whole vectors, no remainder loop
            finish_row(tile[m], NB, s, bias, gelu_on, residual ? residual + at : NULL, y + at, bf16);
        else
            finish_row(tile[m], width, s, bias, gelu_on, residual ? residual + at : NULL, y + at, bf16);
    }
}

// ---------------------------------------------------------------- micro-kernels: R rows x 64 outputs, all of K
// x: the chunk's R activation rows (a chunk of fewer rows repeats its first row: computed, never stored);
// panel: the block's packed weights; scales: the block's [G][64]; tile: fp32 sums, added to when `accumulate`,
// else written by the first group (the caller zeroes no tile). The sums are named variables, one per register,
// through the ROWS macro: GCC 12 spilled an array of them to the stack on every step (2.5x slower).

#define AVX512 "avx512f,avx512bw,avx512vl,avx512dq,fma,avx2"
#define AVX2 "avx2,fma"

// prepare_row for the int8 form on AVX-512, written out: one pass widens the row (times smooth) into buffer and
// takes its largest |v| and sum of squares, a second rounds it to int8 + 128. GCC's vectorisation of the generic
// loops took ~3 cycles an input, a quarter of the FFN down projection's time on AMX. A spiky row (route) keeps its
// largest entries aside here too (prepare_row's loops, which GCC left scalar, took a third of this function's time
// on sentences); a row with NaN or inf, or of a width that is not a multiple of 64, goes through prepare_row.
// `kind` is ACT_U8 (prepare_row's signature, for the drivers).
__attribute__((target(AVX512))) static int prepare_row_a8(const linear_args *a, int kind, int64_t m,
                                                          float *restrict buffer) {
    const int64_t K = a->K;
    if (K % 64) return prepare_row(a, ACT_U8, m, buffer);
    // locals: read through `a` inside the loops, each was reloaded after every store to buffer
    const int bf16 = a->x_bf16;
    const float *restrict smooth = a->smooth;
    const int size = bf16 ? 2 : 4;
    const int64_t bytes = K * size;
    const char *restrict row = (const char *)a->x + m * bytes, *next = row + bytes;  // a prefetch never faults
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
        int32_t *restrict index = a->split_index + m * MAX_SPLIT;
        float *restrict value = a->split_value + m * MAX_SPLIT;
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
    uint8_t *restrict out = (uint8_t *)a->act + m * K;
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

__attribute__((target(AVX512))) static inline __m128 sum4_f32(__m512 c0, __m512 c1, __m512 c2, __m512 c3) {
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
__attribute__((target(AVX512))) static inline void add_to(float *tile, __m512 sums, const float *scale,
                                                          const float *before) {
    _mm512_storeu_ps(tile, _mm512_fmadd_ps(sums, _mm512_loadu_ps(scale), _mm512_loadu_ps(before)));
}
// tile (+)= sums x scale: added where `add`, else stored (a tile's first group: no zeroed tile to read)
__attribute__((target(AVX512))) static inline void add_scaled(float *tile, __m512 sums, const float *scale, int add) {
    const __m512 before = add ? _mm512_loadu_ps(tile) : _mm512_setzero_ps();
    _mm512_storeu_ps(tile, _mm512_fmadd_ps(sums, _mm512_loadu_ps(scale), before));
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

// Chunks of MR rows of list[from..to) through micro-kernel MK (activations of type T at ACT), over inputs
// [k0, k0 + span) of output block nb; chunk c's sums are added to tiles[c].
#define MULTIPLY(MK, T, ACT, START, list, from, to, k0, span, tiles, accumulate)                                \
    for (int64_t c0 = (from); c0 < (to); c0 += MR) {                                                             \
        const int rows = (int)((to) - c0 < MR ? (to) - c0 : MR);                                                 \
        const T *x[MR];                                                                                          \
        for (int m = 0; m < MR; m++) x[m] = (const T *)(ACT) + (int64_t)(list)[c0 + (m < rows ? m : 0)] * K + (k0); \
        const int8_t *panel = a->packed + (nb * K + (k0)) * NB;                                                  \
        const float *scales = a->scales + (nb * (K / a->group) + (k0) / a->group) * NB;                          \
        float(*tile)[NB] = (tiles)[(c0 - (from)) / MR];                                                          \
        if (rows > 4)                                                                                             \
            PASTE(MK, 6)(x, span, panel, scales, START(nb) a->group, tile, accumulate);                     \
        else if (rows > 2)                                                                                        \
            PASTE(MK, 4)(x, span, panel, scales, START(nb) a->group, tile, accumulate);                     \
        else                                                                                                      \
            PASTE(MK, 2)(x, span, panel, scales, START(nb) a->group, tile, accumulate);                     \
    }

#define FINISH(list, from, to, tiles)                                                                             \
    for (int64_t c0 = (from); c0 < (to); c0 += MR)                                                               \
        finish_rows(a, (list) + c0, (int)((to) - c0 < MR ? (to) - c0 : MR), nb, (tiles)[(c0 - (from)) / MR]);

// The int8 kernel's micro-kernel starts each output's sums at its compensation (block nb's 64); the others at 0.
#define FROM_COMPENSATION(nb) a->compensation + (nb) * NB,
#define FROM_ZERO(nb)

// Rows list[from..to) against output block nb one chunk at a time, each over all of K.
#define CHUNK_BY_CHUNK(MK, T, ACT, START, list, from, to)                                                         \
    for (int64_t c1 = (from); c1 < (to); c1 += MR) {                                                             \
        const int64_t c2 = c1 + MR < (to) ? c1 + MR : (to);                                                      \
        claim_rows(a, (list) + c1, (int)(c2 - c1), nb);                                                          \
        MULTIPLY(MK, T, ACT, START, list, c1, c2, 0, K, tiles, 0)                                                \
        FINISH(list, c1, c2, tiles)                                                                               \
    }


// A few rows stream the weights from memory, each thread its share of the output blocks (the static schedule of
// the multiplies below): the first `bytes` of its share (blocks of block_bytes) requested into L2 ahead of the
// rows' preparation (or earlier: request_linear), rather than when the micro-kernel's own requests start. By the
// calling team.
static inline __attribute__((always_inline)) void request_share(const void *weights, int64_t block_bytes,
                                                               int64_t blocks, int64_t bytes) {
    int64_t first = -1, mine = 0;
    _Pragma("omp for schedule(static) nowait") for (int64_t nb = 0; nb < blocks; nb++) {
        first = first < 0 ? nb : first;
        mine++;
    }
    if (bytes > mine * block_bytes) bytes = mine * block_bytes;  // this thread's blocks only
    for (int64_t line = 0; line < bytes; line += 64)
        _mm_prefetch((const char *)weights + first * block_bytes + line, PREFETCH_HINT);
}

// One function per kernel, run by every thread of a team (an OpenMP parallel region: the kernel's own, or the
// fused encoder's): prepare the rows, list them (int8 rows first, then any routed to int16), multiply. Returns
// the rows routed to int16; the multiply ends without a barrier (the caller waits before reading y). START: where
// the sums of the kernel's rows start (FROM_COMPENSATION for the int8 kernel, else FROM_ZERO). RMK, RT, RACT:
// the micro-kernel and activations of the routed rows (the int8 kernel's int16 one, which takes no compensation;
// for the other kernels no row is routed, and they repeat their own). PREPARE: prepare_row, or on AVX-512 the int8
// form's written-out prepare_row_a8 (the same bytes as amx-a8's rows: outputs equal to the bit).
//
// Output blocks are shared between the threads. A batch of at most SMALL_CHUNKS chunks (a query) goes through
// each block one group of inputs at a time, every chunk's sums in turn, so the block's weights are read from
// memory once and at the pace of all the rows' arithmetic (chunk after chunk over all of K leaves the memory idle
// while the later chunks re-read the block from cache: 40% slower on a query). Larger batches take blocks of MB
// rows, whose prepared activations stay in L2, and within them chunk after chunk; the routed rows run right after
// the first block's, while the weights are still in cache. A query's output blocks are split statically (the
// split request_share prefetches); a larger batch's go to whichever thread is free, as amx-a8's do: a vCPU
// slowed by a busy SMT sibling otherwise holds the other up at the layer's end (1,000 sentences under vnni-a8
// on the AMX Xeon limited to Zen 4's ISA: 1-4% faster, 17 of 20 alternating rounds; passages unchanged).
#define DRIVER(NAME, TARGET, KIND, MK, T, START, RMK, RT, RACT, PREPARE)                                           \
    __attribute__((target(TARGET))) static int64_t NAME(const linear_args *a, float *buffer) {                  \
        const int64_t M = a->M, K = a->K, blocks = (a->N + NB - 1) / NB;                                          \
        if (M <= SMALL_CHUNKS * MR) request_share(a->packed, K * NB, blocks, PREFETCH);                           \
        _Pragma("omp for schedule(static)") for (int64_t m = 0; m < M; m++)                                       \
            a->routed[m] = PREPARE(a, KIND, m, buffer);                                                          \
        int64_t routed = 0;                                                                                        \
        for (int64_t m = 0; m < M; m++) routed += a->routed[m];                                                   \
        const int64_t primary = M - routed;                                                                        \
        _Pragma("omp single") {                                                                                    \
            /* flags -> row lists; the int8 rows keep their order, then the routed ones */                        \
            int64_t first = 0, second = primary;                                                                   \
            for (int64_t m = 0; m < M; m++) a->order[a->routed[m] ? second++ : first++] = (int32_t)m;             \
        }                                                                                                          \
        float tiles[SMALL_CHUNKS > 1 ? SMALL_CHUNKS : 1][MR][NB] __attribute__((aligned(64)));                                         \
        const int64_t chunks = (primary + MR - 1) / MR;                                                            \
        if (chunks + (routed + MR - 1) / MR <= SMALL_CHUNKS) {                                                     \
            _Pragma("omp for schedule(static) nowait") for (int64_t nb = 0; nb < blocks; nb++) {                 \
                for (int64_t k0 = 0; k0 < K; k0 += a->group) {                                                   \
                    MULTIPLY(MK, T, a->act, START, a->order, 0, primary, k0, a->group, tiles, k0 > 0)            \
                    MULTIPLY(RMK, RT, RACT, FROM_ZERO, a->order, primary, M, k0, a->group, tiles + chunks,       \
                             k0 > 0)                                                                              \
                }                                                                                                 \
                FINISH(a->order, 0, primary, tiles)                                                               \
                FINISH(a->order, primary, M, tiles + chunks)                                                      \
            }                                                                                                     \
            return routed;                                                                                        \
        }                                                                                                          \
        for (int64_t mb = 0; mb < primary; mb += MB) {                                                            \
            const int64_t mb_end = mb + MB < primary ? mb + MB : primary;                                         \
            _Pragma("omp for schedule(dynamic) nowait") for (int64_t nb = 0; nb < blocks; nb++) {                \
                CHUNK_BY_CHUNK(MK, T, a->act, START, a->order, mb, mb_end)                                        \
                if (mb == 0) {                                                                                    \
                    CHUNK_BY_CHUNK(RMK, RT, RACT, FROM_ZERO, a->order, primary, M)                               \
                }                                                                                                  \
            }                                                                                                      \
        }                                                                                                          \
        if (primary == 0) {                                                                                        \
            _Pragma("omp for schedule(static) nowait") for (int64_t nb = 0; nb < blocks; nb++) {                 \
                CHUNK_BY_CHUNK(RMK, RT, RACT, FROM_ZERO, a->order, primary, M)                                   \
            }                                                                                                      \
        }                                                                                                          \
        return routed;                                                                                             \
    }

DRIVER(run_vnni_a8, AVX512 ",avx512vnni", ACT_U8, mk_vnni_a8, uint8_t, FROM_COMPENSATION, mk_vnni_a16, int16_t,
       a->act16, prepare_row_a8)
// 256-bit A8: spiky rows routed to int16 take AVX2's int16 kernel (the CPUs with AVX-VNNI alone have no other)
DRIVER(run_vnni256_a8, AVX512 ",avx512vnni", ACT_U8, mk_vnni256_a8, uint8_t, FROM_COMPENSATION, mk_avx2_a16, int16_t,
       a->act16, prepare_row)
#if HAVE_AVXVNNI
DRIVER(run_avxvnni_a8, AVX2 ",avxvnni", ACT_U8, mk_avxvnni_a8, uint8_t, FROM_COMPENSATION, mk_avx2_a16, int16_t,
       a->act16, prepare_row)
#endif
DRIVER(run_vnni_a16, AVX512 ",avx512vnni", ACT_I16, mk_vnni_a16, int16_t, FROM_ZERO, mk_vnni_a16, int16_t, a->act,
       prepare_row)
DRIVER(run_avx512_a16, AVX512, ACT_I16, mk_avx512_a16, int16_t, FROM_ZERO, mk_avx512_a16, int16_t, a->act,
       prepare_row)
DRIVER(run_avx512_bf16, AVX512 ",avx512bf16", ACT_BF16, mk_avx512_bf16, uint16_t, FROM_ZERO, mk_avx512_bf16,
       uint16_t, a->act, prepare_row)
DRIVER(run_avx512_f32, AVX512, ACT_F32, mk_avx512_f32, float, FROM_ZERO, mk_avx512_f32, float, a->act,
       prepare_row)
DRIVER(run_avx2_a16, AVX2, ACT_I16, mk_avx2_a16, int16_t, FROM_ZERO, mk_avx2_a16, int16_t, a->act, prepare_row)
DRIVER(run_avx2_f32, AVX2, ACT_F32, mk_avx2_f32, float, FROM_ZERO, mk_avx2_f32, float, a->act, prepare_row)

// AMX_A8: the A8 kernel's rows (the same prepared activations, scales, compensation and kept-aside entries) on the
// AMX-int8 tiles, for large batches: one tdpbusd multiplies 16 rows x 64 inputs by 64 inputs x 16 outputs.
// The packed weights are already in the B tiles' layout: the 16 outputs of a tile are 64 bytes of a step's 256,
// one step (4 inputs) per tile row. Per chunk of 32 rows and output block, each group's int32 sums go through the
// tiles' memory into the fp32 sums at the group's end (as the VNNI kernel's registers do). Rows routed to int16
// are computed on the tiles too (their bytes are stale), dropped, and run by the VNNI int16 micro-kernel.
#define AMX_TARGET AVX512 ",avx512vnni,amx-tile,amx-int8"
#define AMX_ROWS 32  // rows per chunk: two A tiles of 16
#define AMX_STEP 64  // inputs per A tile row

// Rows [m0, m0 + rows) of the prepared activations x output block nb -> tile (rows x 64 fp32 sums, from the
// compensation on). The tiles are configured for `rows` (configure_tiles, amx_tiles.h).
__attribute__((target(AMX_TARGET))) static void amx_a8_chunk(const linear_args *a, int64_t nb, int64_t m0, int rows,
                                                             float tile[][NB]) {
    const int64_t K = a->K, group = a->group;
    const uint8_t *x = (const uint8_t *)a->act + m0 * K;
    const int8_t *block = a->packed + nb * K * NB;
    const float *scales = a->scales + nb * (K / group) * NB, *start = a->compensation + nb * NB;
    const int two = rows > 16;
    int32_t sums[AMX_ROWS][NB] __attribute__((aligned(64)));
    for (int m = 0; m < rows; m++) memcpy(tile[m], start, NB * 4);
    for (int64_t k0 = 0; k0 < K; k0 += group) {
        for (int half = 0; half < 2; half++) {
            const int8_t *w = block + half * 128;
            _tile_zero(4);
            _tile_zero(5);
            if (two) {
                _tile_zero(6);
                _tile_zero(7);
            }
            for (int64_t k = k0; k < k0 + group; k += AMX_STEP) {
                _tile_loadd(2, w + k * NB, 4 * NB);
                _tile_loadd(3, w + k * NB + 64, 4 * NB);
                _tile_loadd(0, x + k, K);
                _tile_dpbusd(4, 0, 2);
                _tile_dpbusd(5, 0, 3);
                if (two) {
                    _tile_loadd(1, x + 16 * K + k, K);
                    _tile_dpbusd(6, 1, 2);
                    _tile_dpbusd(7, 1, 3);
                }
            }
            _tile_stored(4, &sums[0][half * 32], NB * 4);
            _tile_stored(5, &sums[0][half * 32 + 16], NB * 4);
            if (two) {
                _tile_stored(6, &sums[16][half * 32], NB * 4);
                _tile_stored(7, &sums[16][half * 32 + 16], NB * 4);
            }
        }
        const float *scale = scales + k0 / group * NB;
        for (int m = 0; m < rows; m++)
            for (int n = 0; n < NB; n += 16)
                add_to(tile[m] + n, _mm512_cvtepi32_ps(_mm512_load_si512(sums[m] + n)), scale + n, tile[m] + n);
    }
}

__attribute__((target(AMX_TARGET))) static int64_t run_amx_a8(const linear_args *a, float *buffer) {
    const int64_t M = a->M, K = a->K, blocks = (a->N + NB - 1) / NB;
    _Pragma("omp for schedule(static)") for (int64_t m = 0; m < M; m++)
        a->routed[m] = prepare_row_a8(a, ACT_U8, m, buffer);
    int64_t routed = 0;
    for (int64_t m = 0; m < M; m++) routed += a->routed[m];
    const int64_t primary = M - routed;
    _Pragma("omp single") {
        int64_t first = 0, second = primary;
        for (int64_t m = 0; m < M; m++) a->order[a->routed[m] ? second++ : first++] = (int32_t)m;
    }
    float tile[AMX_ROWS][NB] __attribute__((aligned(64)));
    float tiles[1][MR][NB] __attribute__((aligned(64)));  // the routed rows' (CHUNK_BY_CHUNK)
    int32_t out[AMX_ROWS];
    int configured = -1;
    for (int64_t mb = 0; mb < M; mb += MB) {
        const int64_t mb_end = mb + MB < M ? mb + MB : M;
        // dynamic: threads may run the tiles at different rates (on a 2-vCPU VM each vCPU's swung between full
        // and half within minutes, most likely an SMT sibling sharing the core's AMX unit: amx_probe.c), and a
        // static split of the output blocks left the faster one waiting; 1,000 sentences under auto 7-10% faster
        // (encode_ab.py, 19 of 24 rounds)
        _Pragma("omp for schedule(dynamic) nowait") for (int64_t nb = 0; nb < blocks; nb++) {
            for (int64_t m0 = mb; m0 < mb_end; m0 += AMX_ROWS) {
                const int rows = (int)(mb_end - m0 < AMX_ROWS ? mb_end - m0 : AMX_ROWS);
                if (rows != configured) {
                    configure_tiles(rows < 16 ? rows : 16, rows > 16 ? rows - 16 : 0);
                    configured = rows;
                }
                for (int i = 0; i < rows; i++) out[i] = (int32_t)(m0 + i);
                claim_rows(a, out, rows, nb);
                amx_a8_chunk(a, nb, m0, rows, tile);
                int kept = 0;
                for (int i = 0; i < rows; i++) {
                    if (a->routed[m0 + i]) continue;
                    if (kept != i) memcpy(tile[kept], tile[i], NB * 4);
                    out[kept++] = (int32_t)(m0 + i);
                }
                finish_rows(a, out, kept, nb, tile);
            }
            if (mb == 0) {
                CHUNK_BY_CHUNK(mk_vnni_a16, int16_t, a->act16, FROM_ZERO, a->order, primary, M)
            }
        }
    }
    if (configured >= 0) _tile_release();
    return routed;
}

// F32W: the model's own fp32 weights, (N, K) row-major (`packed` points at them; scales and groups unused): no
// copy, exact fp32 up to the order of the sums; the fused stack's fp32 path, for a few rows, where a query is the
// weights' 340 MB streamed once. Per output block of 64, micro-kernels of a chunk's rows x OUT outputs over all
// of K, every chunk in turn before the next outputs (their weight rows stay in L1/L2 meanwhile).
#define W_CHUNKS 11  // chunks of MR rows per pass over the weights (66 rows: a fused batch in one pass)
#define F32W_DRIVER(NAME, TARGET, MK, OUT)                                                                         \
    __attribute__((target(TARGET))) static int64_t NAME(const linear_args *a, float *buffer) {                  \
        const int64_t M = a->M, K = a->K, blocks = (a->N + NB - 1) / NB;                                          \
        const float *weight = (const float *)a->packed;                                                           \
        request_share(weight, K * NB * 4, blocks, PREFETCH);                                                      \
        _Pragma("omp for schedule(static)") for (int64_t m = 0; m < M; m++) {                                     \
            prepare_row(a, ACT_F32, m, buffer);                                                                  \
            a->order[m] = (int32_t)m;                                                                            \
        }                                                                                                          \
        float tiles[W_CHUNKS][MR][NB] __attribute__((aligned(64)));                                               \
        _Pragma("omp for schedule(static) nowait") for (int64_t nb = 0; nb < blocks; nb++) {                     \
            const int width = a->N - nb * NB < NB ? (int)(a->N - nb * NB) : NB;                                  \
            for (int64_t g0 = 0; g0 < M; g0 += W_CHUNKS * MR) {                                                  \
                const int64_t g1 = g0 + W_CHUNKS * MR < M ? g0 + W_CHUNKS * MR : M;                              \
                for (int j = 0; j < width; j += OUT) {                                                           \
                    const float *w = weight + (nb * NB + j) * K;                                                 \
                    for (int64_t c0 = g0; c0 < g1; c0 += MR) {                                                   \
                        const int rows = (int)(g1 - c0 < MR ? g1 - c0 : MR);                                     \
                        const float *x[MR];                                                                      \
                        for (int m = 0; m < MR; m++) x[m] = (const float *)a->act + (c0 + (m < rows ? m : 0)) * K; \
                        float(*tile)[NB] = tiles[(c0 - g0) / MR];                                                \
                        if (rows > 4)                                                                             \
                            PASTE(MK, 6)(x, K, w, tile, j);                                                      \
                        else if (rows > 2)                                                                        \
                            PASTE(MK, 4)(x, K, w, tile, j);                                                      \
                        else                                                                                      \
                            PASTE(MK, 2)(x, K, w, tile, j);                                                      \
                    }                                                                                             \
                }                                                                                                 \
                FINISH(a->order, g0, g1, tiles)                                                                   \
            }                                                                                                     \
        }                                                                                                          \
        return 0;                                                                                                  \
    }
F32W_DRIVER(run_avx512_f32w, AVX512, mk_avx512_f32w, 4)
F32W_DRIVER(run_avx2_f32w, AVX2, mk_avx2_f32w, 2)

// One linear layer by the calling team (see DRIVER); buffer: K floats of this thread's own.
static int64_t linear_by_team(int kernel, const linear_args *a, float *buffer) {
    switch (kernel) {
        case KERNEL_AVX512_F32W: return run_avx512_f32w(a, buffer);
        case KERNEL_AVX2_F32W: return run_avx2_f32w(a, buffer);
        case KERNEL_VNNI_A8: return run_vnni_a8(a, buffer);
        case KERNEL_VNNI256_A8: return run_vnni256_a8(a, buffer);
        case KERNEL_AMX_A8: return run_amx_a8(a, buffer);
#if HAVE_AVXVNNI
        case KERNEL_AVXVNNI_A8: return run_avxvnni_a8(a, buffer);
#endif
        case KERNEL_VNNI_A16: return run_vnni_a16(a, buffer);
        case KERNEL_AVX512_A16: return run_avx512_a16(a, buffer);
        case KERNEL_AVX512_BF16: return run_avx512_bf16(a, buffer);
        case KERNEL_AVX512_F32: return run_avx512_f32(a, buffer);
        case KERNEL_AVX2_A16: return run_avx2_a16(a, buffer);
        default: return run_avx2_f32(a, buffer);
    }
}

static const int act_size[] = {[ACT_F32] = 4, [ACT_BF16] = 2, [ACT_I16] = 2, [ACT_U8] = 1};

static int64_t aligned(int64_t bytes) { return (bytes + 63) / 64 * 64; }

// Scratch of one linear layer but the threads' rows: the prepared activations (and, for the int8 kernel, int16
// ones for routed rows and the entries split rows keep aside), row scales, row order and routing flags.
static int64_t linear_scratch_bytes(int kernel, int64_t M, int64_t K) {
    const int64_t spiky =
        int8_activations(kernel) ? aligned(M * K * 2) + aligned(M * 4) + 2 * aligned(M * MAX_SPLIT * 4) : 0;
    return aligned(M * K * act_size[activation_kind(kernel)]) + spiky + 3 * aligned(M * 4);
}

// The most linear_scratch_bytes any kernel takes.
static int64_t widest_linear_scratch_bytes(int64_t M, int64_t K) {
    int64_t most = 0;
    for (int kernel = KERNEL_AVX2_F32; kernel <= KERNEL_LAST; kernel++) {
        const int64_t bytes = linear_scratch_bytes(kernel, M, K);
        most = bytes > most ? bytes : most;
    }
    return most;
}

// Bytes of scratch allmpnet_x86_linear needs: the layer's, and a row of fp32 per thread.
int64_t allmpnet_x86_scratch_bytes(int kernel, int64_t M, int64_t K, int threads) {
    return linear_scratch_bytes(kernel, M, K) + (int64_t)(threads < 1 ? 1 : threads) * K * 4;
}

// 0 when the kernel takes this layer (see allmpnet_x86_linear's return values), else -1 or -2.
static int64_t check_linear(int kernel, const float *compensation, int64_t group, int64_t M, int64_t N,
                            int64_t K, float route) {
    if (!allmpnet_x86_kernel_supported(kernel)) return -2;
    const int a8 = int8_activations(kernel);
    if (N <= 0 || K <= 0 || group <= 0 || group % 4 || K % group || M < 0
        || ((activation_kind(kernel) == ACT_I16 || (a8 && route > 0.0f)) && group > 512) || (a8 && !compensation))
        return -1;
    if (kernel == KERNEL_AMX_A8 && group % AMX_STEP) return -1;  // a tile row is 64 inputs of one group
    if ((kernel == KERNEL_AVX512_F32W && (K % 16 || N % 4)) || (kernel == KERNEL_AVX2_F32W && (K % 8 || N % 4)))
        return -1;
    return 0;
}

// The layer's per-call arrays laid out in scratch (linear_scratch_bytes of it).
static void place_scratch(linear_args *a, int kernel, char *at) {
    const int kind = activation_kind(kernel);
    a->act = at;
    at += aligned(a->M * a->K * act_size[kind]);
    a->act16 = NULL;
    a->split_count = a->split_index = NULL;
    a->split_value = NULL;
    if (int8_activations(kernel)) {
        a->act16 = (int16_t *)at;
        at += aligned(a->M * a->K * 2);
        a->split_count = (int32_t *)at;
        at += aligned(a->M * 4);
        a->split_index = (int32_t *)at;
        at += aligned(a->M * MAX_SPLIT * 4);
        a->split_value = (float *)at;
        at += aligned(a->M * MAX_SPLIT * 4);
    }
    a->row_scale = (float *)at;
    at += aligned(a->M * 4);
    a->order = (int32_t *)at;
    at += aligned(a->M * 4);
    a->routed = (int32_t *)at;
    if (kind == ACT_F32 || kind == ACT_BF16) a->row_scale = NULL;  // finish_rows: no per-row scale
}

// Arrays as described at the top, N padded to whole blocks of 64 in packed, scales and compensation (zeros);
// x (M, K), residual and y (M, N); bias (N,) or NULL; smooth (K,) or NULL: x is multiplied by it first;
// route (int8 kernel; 0: off): rows whose largest |x| exceeds route x their root mean square (a per-token scale
// set by one huge value leaves the row's other values a few levels) keep their few largest entries aside, exact,
// or, with more than MAX_SPLIT of them, run with int16 activations instead (see SPLIT_SHARE);
// scratch: allmpnet_x86_scratch_bytes, 64-byte aligned.
// Returns the number of rows routed to int16 (>= 0); -1 for shapes the kernels do not handle (K % group,
// group % 4, or group > 512 for int16 activations: a group's int32 sums must stay below 2^31; the int8 kernel's
// stay below 2^31 for K < 16k); -2 when this CPU lacks the kernel's instructions.
int64_t allmpnet_x86_linear(int kernel, const void *x, int x_bf16, const float *smooth, const int8_t *packed,
                            const float *scales, const float *compensation, int64_t group, const float *bias,
                            const void *residual, void *y, int y_bf16, int64_t M, int64_t N, int64_t K, int gelu,
                            float route, void *scratch, int threads) {
    const int64_t refused = check_linear(kernel, compensation, group, M, N, K, route);
    if (refused) return refused;
    if (M == 0) return 0;
    if (threads < 1) threads = 1;
    linear_args a = {x, x_bf16, smooth, packed, scales, compensation, group, bias, residual, y, y_bf16, M, N, K,
                     gelu, int8_activations(kernel) ? route : 0.0f};
    place_scratch(&a, kernel, (char *)scratch);
    float *buffers = (float *)((char *)scratch + linear_scratch_bytes(kernel, M, K));
    int64_t routed = 0;
    _Pragma("omp parallel num_threads(threads)") {
        const int64_t count = linear_by_team(kernel, &a, buffers + (int64_t)omp_get_thread_num() * K);
        if (omp_get_thread_num() == 0) routed = count;
    }
    return routed;
}

// ---------------------------------------------------------------- attention over blocks of equal length
// softmax(q k^T * scale + bias) v for `blocks` blocks of T tokens from row `start` of packed q|k|v (N, 3C), heads of
// 64, into rows of out (N, C); qkv and out bf16 or fp32 (`bf16`), bias (H, T, T) fp32. Why: on CPUs without AMX,
// torch's SDPA runs this model's bf16 attention at ~70-90 GFLOP/s (2 Zen 4 cores), a quarter of a 256-token
// passage's time. Per (block, head) the keys are laid out transposed once (16 x 16 register transposes), and 4
// query rows at a time take their scores in registers, 16 keys per vector (only as many vectors as T needs: a
// 28-token block of side-by-side sentences costs 2, not a padded 4). The scale, the bias and the running maximum
// are applied as the scores leave the registers, exp and its sum in one pass; the weighted values are summed
// unnormalised and divided by the sum at the end. With AVX512-BF16 (products 1) and bf16 q|k|v both products are
// vdpbf16ps pair dot products (twice the fp32 FMA rate): keys as pairs of inputs (k[2p], k[2p+1]) per key, values
// as pairs of keys (v_2q[d], v_2q+1[d]) per output, so one 32-bit broadcast of a query's pair, or of two exp
// values rounded to bf16 (as SDPA's bf16 path rounds its probabilities; under 64 tokens, two bf16 parts of each),
// meets 16 keys (outputs) per vector. Otherwise fp32 FMAs. Scores, softmax and sums stay fp32. With AMX-BF16
// (products 2) blocks of 32 tokens and more run on the tiles instead (attend_head_amx).
#define ATTENTION_D 64     // head size the kernel is written for (4 vectors)
#define ATTENTION_ROWS 4   // query rows per register block

#define TILE_ROWS 16        // query rows per pass of the AMX path (one tile of rows)
#define AMX_MIN_TOKENS 32   // shorter blocks take fp32 FMAs on AMX CPUs (3 x 13 tokens: 0.03 ms, tiles 0.05 ms)

// Bytes of scratch allmpnet_x86_attention needs for blocks of T tokens: the larger of the register path's (keys
// D x padded, values padded x D, scores, queries, fp32) and the AMX path's (attend_head_amx; keys padded to 32).
int64_t allmpnet_x86_attention_scratch_bytes(int64_t T, int threads) {
    const int64_t padded = (T + 15) / 16 * 16, padded32 = (T + 31) / 32 * 32;
    const int64_t registers = (2 * ATTENTION_D * padded + ATTENTION_ROWS * padded + ATTENTION_ROWS * ATTENTION_D) * 4;
    // keys, values and queries in bf16; scores fp32 and two bf16 parts of the weights per tile of rows; its sums
    const int64_t tiles = 3 * padded32 * ATTENTION_D * 2 + TILE_ROWS * padded32 * (4 + 2 + 2)
                          + TILE_ROWS * ATTENTION_D * 4;
    return (int64_t)(threads < 1 ? 1 : threads) * (registers > tiles ? registers : tiles);
}

// 16 32-bit lanes at element `index` of p: fp32 / bf16 pairs as they are, or (widen) 16 bf16 as fp32
static inline __attribute__((always_inline, target(AVX512))) __m512i load16(const void *p, int64_t index,
                                                                             int widen) {
    if (widen)
        return _mm512_castps_si512(bf16_to_fp32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + index))));
    return _mm512_loadu_si512((const uint32_t *)p + index);
}

// r[i][e] -> r[e][i]: within 128-bit lanes, then the lanes themselves
static inline __attribute__((always_inline, target(AVX512))) void transpose16(__m512i r[16]) {
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
__attribute__((target(AVX512))) static void stage_transposed(const void *src, int widen, int64_t stride, int64_t T,
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
static inline __attribute__((always_inline, target(AVX512))) __m256i bf16_round16(__m512 x) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd,
                                                                       _mm512_set1_epi32(0x7fff))), 16));
}

static inline __attribute__((always_inline)) __mmask16 keys_before(int64_t T, int64_t j) {
    return j + 16 <= T ? (__mmask16)0xFFFF : j < T ? (__mmask16)((1u << (T - j)) - 1) : (__mmask16)0;
}

// scores s (ATTENTION_ROWS x V vectors from key j0) -> scale x s + bias, -inf past T, into scores; row maxima
static inline __attribute__((always_inline, target(AVX512))) void store_scores(
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
static inline __attribute__((always_inline, target(AVX512))) void score_tile_fp32(
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

// the same with bf16 pairs: queries' pairs read in place, keys (D/2 x padded) pairs
static inline __attribute__((always_inline, target(AVX512 ",avx512bf16"))) void score_tile_bf16(
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

// A block of ATTENTION_ROWS query rows against every key: tiles of 4 vectors of 16 keys, then one of the 1-3 left
// (each a separate instance of the tile, its vector count a constant)
#define SCORE_ROWS(tile, q)                                                                                     \
    do {                                                                                                        \
        int64_t j0 = 0;                                                                                         \
        for (; j0 + 64 <= padded; j0 += 64) tile(q, keys, padded, 4, j0, T, b, scale, scores, top);             \
        switch ((padded - j0) / 16) {                                                                           \
            case 3: tile(q, keys, padded, 3, j0, T, b, scale, scores, top); break;                              \
            case 2: tile(q, keys, padded, 2, j0, T, b, scale, scores, top); break;                              \
            case 1: tile(q, keys, padded, 1, j0, T, b, scale, scores, top); break;                              \
        }                                                                                                       \
    } while (0)

// exp(score - row max) over the padded row (zero past T), in place; returns 1 / their sum (exponentiate_bf16 and
// exponentiate_two_bf16: the same as bf16 weights)
static inline __attribute__((always_inline, target(AVX512))) float exponentiate(float *row, int64_t T, int64_t padded,
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

// exponentiate's one-part bf16 weights (blocks of 64 tokens and more): a shorter exp polynomial and this CPU's own
// rounding instruction (16 x 256-token blocks: -8% of the attention's time)
static inline __attribute__((always_inline, target(AVX512 ",avx512bf16"))) float exponentiate_bf16(
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
static inline __attribute__((always_inline, target(AVX512 ",avx512bf16"))) float exponentiate_two_bf16(
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
__attribute__((target(AVX512))) static void stage_pairs(const uint16_t *rows, int64_t T, int64_t C, int64_t padded,
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

// one head of one block; qkv, out at the head's first column, row0 the block's first row
__attribute__((target(AVX512 ",avx512bf16"))) static void attend_head_bf16(
    const uint16_t *qkv, uint16_t *out, const float *bias, int64_t bias_step, float scale, int64_t row0, int64_t T,
    int64_t C, float *work) {
    const int64_t padded = (T + 15) / 16 * 16, D = ATTENTION_D, P = D / 2;
    uint32_t *keys = (uint32_t *)work;                              // (P, padded) pairs
    uint16_t *values = (uint16_t *)(keys + P * padded);             // (padded / 2, D, 2)
    float *scores = (float *)(values + padded * D);                 // (ATTENTION_ROWS, padded)
    uint16_t *weights = (uint16_t *)(scores + ATTENTION_ROWS * padded);  // (ATTENTION_ROWS, padded) bf16
    // blocks under 64 tokens (side-by-side sentences) weight the values by ~16-bit probabilities, in two bf16
    // parts: bf16 ones alone cost their worst sentence (of 2,758 STSBenchmark ones, under auto) 0.99637 -> 0.99562
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
        SCORE_ROWS(score_tile_bf16, q);
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

// the same in fp32 FMAs, from fp32 or bf16 q|k|v (widened as staged) into out of the same dtype
__attribute__((target(AVX512))) static void attend_head_fp32(const void *qkv, int bf16, void *out,
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
        SCORE_ROWS(score_tile_fp32, queries);
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

// The same as attend_head_bf16 on the AMX-bf16 tiles (Sapphire Rapids on), where its pair dot products cost as
// much as fp32 FMAs: 16 query rows at a time, their scores as 16 x 16 tiles (q rows x key pairs), the softmax of
// the rows in AVX-512 (exponentiate_two_bf16), then the weights x values as 4 tiles of 16 outputs per part.
// Keys and values are staged as the pair products read them (stage_pairs: both already B tiles), queries copied
// into rows padded with zeros; keys are padded to 32 (one A tile row of weights), the padding weighted 0 with zero
// values. Tiles (configure_tiles(16, 16)): 0, 1 = A, 2, 3 = B, 4-7 = sums (scores in 4 and 5).
__attribute__((target(AVX512 ",avx512bf16,amx-tile,amx-bf16"))) static void attend_head_amx(
    const uint16_t *qkv, uint16_t *out, const float *bias, int64_t bias_step, float scale, int64_t row0, int64_t T,
    int64_t C, float *work) {
    const int64_t padded = (T + 31) / 32 * 32, D = ATTENTION_D, P = D / 2;
    uint32_t *keys = (uint32_t *)work;                       // (P, padded) pairs
    uint16_t *values = (uint16_t *)(keys + P * padded);      // (padded / 2, D, 2)
    uint16_t *queries = values + padded * D;                 // (padded, D)
    float *scores = (float *)(queries + padded * D);         // (TILE_ROWS, padded)
    uint16_t *weights = (uint16_t *)(scores + TILE_ROWS * padded);  // (TILE_ROWS, padded) bf16, twice
    float *sums = (float *)(weights + 2 * TILE_ROWS * padded);      // (TILE_ROWS, D)
    // two bf16 parts at every length (~16 bits): on the tiles the second product is cheap, and one part cost
    // SciFact's nDCG@10 under auto 65.45 -> 65.19 (the card: 65.57)
    uint16_t *rest = weights + TILE_ROWS * padded;
    const uint16_t *rows = qkv + row0 * 3 * C;
    stage_pairs(rows, T, C, padded, keys, values);
    const int64_t query_rows = (T + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS;
    for (int64_t i = 0; i < query_rows; i++)
        for (int half = 0; half < 2; half++)
            _mm512_store_si512(queries + i * D + 32 * half,
                               i < T ? _mm512_loadu_si512(rows + i * 3 * C + 32 * half) : _mm512_setzero_si512());
    const __m512 by = _mm512_set1_ps(scale);
    for (int64_t i0 = 0; i0 < T; i0 += TILE_ROWS) {
        const int rows_here = T - i0 < TILE_ROWS ? (int)(T - i0) : TILE_ROWS;
        _tile_loadd(0, queries + i0 * D, D * 2);       // inputs 0-31 of the 16 queries
        _tile_loadd(1, queries + i0 * D + P, D * 2);   // inputs 32-63
        for (int64_t j0 = 0; j0 < padded; j0 += 32) {  // 32 keys: two tiles of scores
            _tile_zero(4);
            _tile_zero(5);
            _tile_loadd(2, keys + j0, padded * 4);
            _tile_loadd(3, keys + j0 + 16, padded * 4);
            _tile_dpbf16ps(4, 0, 2);
            _tile_dpbf16ps(5, 0, 3);
            _tile_loadd(2, keys + 16 * padded + j0, padded * 4);
            _tile_loadd(3, keys + 16 * padded + j0 + 16, padded * 4);
            _tile_dpbf16ps(4, 1, 2);
            _tile_dpbf16ps(5, 1, 3);
            _tile_stored(4, scores + j0, padded * 4);
            _tile_stored(5, scores + j0 + 16, padded * 4);
        }
        float inverse[TILE_ROWS];
        for (int r = 0; r < TILE_ROWS; r++) {  // rows past T: weights of their own, never stored
            const int64_t i = i0 + (r < rows_here ? r : 0);
            float *row = scores + r * padded;
            __m512 top = _mm512_set1_ps(-__builtin_inff());
            for (int64_t j = 0; j < padded; j += 16) {
                const __mmask16 real = keys_before(T, j);
                const __m512 b = _mm512_maskz_loadu_ps(real, bias + i * bias_step + j);
                __m512 x = _mm512_fmadd_ps(_mm512_load_ps(row + j), by, b);
                x = _mm512_mask_blend_ps(real, _mm512_set1_ps(-__builtin_inff()), x);
                _mm512_store_ps(row + j, x);
                top = _mm512_max_ps(top, x);
            }
            inverse[r] = exponentiate_two_bf16(row, weights + r * padded, rest + r * padded, T, padded, top);
        }
        _tile_zero(4);
        _tile_zero(5);
        _tile_zero(6);
        _tile_zero(7);
        for (const uint16_t *part = weights; part; part = part == weights ? rest : NULL)
            for (int64_t j0 = 0; j0 < padded; j0 += 32) {
                const uint16_t *v = values + j0 * D;  // key pairs j0/2.. : rows of D outputs x 2 keys
                _tile_loadd(0, part + j0, padded * 2);
                _tile_loadd(2, v, D * 4);
                _tile_loadd(3, v + 32, D * 4);
                _tile_dpbf16ps(4, 0, 2);
                _tile_dpbf16ps(5, 0, 3);
                _tile_loadd(2, v + 64, D * 4);
                _tile_loadd(3, v + 96, D * 4);
                _tile_dpbf16ps(6, 0, 2);
                _tile_dpbf16ps(7, 0, 3);
            }
        _tile_stored(4, sums, D * 4);
        _tile_stored(5, sums + 16, D * 4);
        _tile_stored(6, sums + 32, D * 4);
        _tile_stored(7, sums + 48, D * 4);
        for (int r = 0; r < rows_here; r++) {
            uint16_t *at = out + (row0 + i0 + r) * C;
            const __m512 w = _mm512_set1_ps(inverse[r]);
            for (int v = 0; v < 4; v++) {
                const __m512 o = _mm512_mul_ps(_mm512_load_ps(sums + r * D + 16 * v), w);
                _mm256_storeu_si256((__m256i *)(at + 16 * v), (__m256i)_mm512_cvtneps_pbh(o));
            }
        }
    }
}

// Each head reads its own 128 or 256 bytes of q, k and v from every row of the block: other cache lines than the
// previous head's, a strided pattern the hardware prefetchers miss. The next task's are requested into L2 first.
static void prefetch_head(const char *qkv, int64_t size, int64_t row0, int64_t T, int64_t C, int64_t h) {
    for (int64_t j = 0; j < T; j++)
        for (int part = 0; part < 3; part++) {
            const char *p = qkv + ((row0 + j) * 3 * C + part * C + h * ATTENTION_D) * size;
            for (int64_t line = 0; line < ATTENTION_D * size; line += 64) _mm_prefetch(p + line, _MM_HINT_T1);
        }
}

// The products a block of T tokens runs on: the caller's choice (below), as far as the CPU and T go.
static int products_for(int bf16, int products, int64_t T) {
    if (!bf16 || products < 0) products = 0;
    if (products >= 2 && !(allmpnet_x86_kernel_supported(KERNEL_AVX512_BF16) && amx_ready(AMX_BF16_BIT)))
        products = 1;
    // below a tile of keys the tiles idle; on these CPUs the pair products run no faster than fp32 FMAs
    else if (products >= 2 && T < AMX_MIN_TOKENS) products = 0;
    if (products >= 1 && !allmpnet_x86_kernel_supported(KERNEL_AVX512_BF16)) products = 0;
    return products;
}

// products: 0 fp32 FMAs, 1 AVX512-BF16 pair dot products, 2 AMX-bf16 tiles: the caller's choice for bf16 q|k|v,
// taken as far as the CPU goes (fp32 q|k|v: always 0). Returns the products used (0-2); -1 for a bad shape
// (nothing computed); -2 without AVX512.
int64_t allmpnet_x86_attention(const void *qkv, int bf16, void *out, const float *bias, float scale, int64_t start,
                               int64_t blocks, int64_t T, int64_t H, int products, void *scratch, int threads) {
    if (!allmpnet_x86_kernel_supported(KERNEL_AVX512_F32)) return -2;
    if (T < 1 || H < 1 || blocks < 0 || start < 0) return -1;
    const int64_t C = H * ATTENTION_D, per_thread = allmpnet_x86_attention_scratch_bytes(T, 1) / 4;
    products = products_for(bf16, products, T);
    if (threads < 1) threads = 1;
    _Pragma("omp parallel num_threads(threads)")
    {
        // texts side by side in a block weight each other's keys exp(-87) (~1e-38): products of that underflow to
        // denormals, which Intel cores compute in microcode assists (a block of 3 sentences took 15x as long).
        // Flushed to zero instead (FTZ, DAZ), this thread's setting restored after.
        const unsigned int control = _mm_getcsr();
        _mm_setcsr(control | 0x8040);
        if (products == 2) configure_tiles(16, 16);
        // dynamic, as amx-a8's output blocks: threads may run at different rates (an SMT sibling's share of the core)
        _Pragma("omp for schedule(dynamic)")
        for (int64_t task = 0; task < blocks * H; task++) {
            const int64_t b = task / H, h = task % H;
            float *work = (float *)scratch + (int64_t)omp_get_thread_num() * per_thread;
            if (task + 1 < blocks * H)
                prefetch_head((const char *)qkv, bf16 ? 2 : 4, start + (task + 1) / H * T, T, C, (task + 1) % H);
            // the head's columns: q at h*D, k at C + h*D, v at 2C + h*D of each row; out at h*D
            if (products == 2)
                attend_head_amx((const uint16_t *)qkv + h * ATTENTION_D, (uint16_t *)out + h * ATTENTION_D,
                                bias + h * T * T, T, scale, start + b * T, T, C, work);
            else if (products == 1)
                attend_head_bf16((const uint16_t *)qkv + h * ATTENTION_D, (uint16_t *)out + h * ATTENTION_D,
                                 bias + h * T * T, T, scale, start + b * T, T, C, work);
            else
                attend_head_fp32((const char *)qkv + h * ATTENTION_D * (bf16 ? 2 : 4), bf16,
                                 (char *)out + h * ATTENTION_D * (bf16 ? 2 : 4), bias + h * T * T, T, scale,
                                 start + b * T, T, C, work);
        }
        if (products == 2) release_tiles();
        _mm_setcsr(control);
    }
    return products;
}

// ---------------------------------------------------------------- LayerNorm of bf16 rows
// y = (x - mean) / sqrt(variance + eps) x weight + bias over each row of C (a multiple of 16) of x, M rows; x and y
// bf16 (y may be x), mean and variance in fp32 from two passes over the row (then in L1). Why: torch's bf16
// LayerNorm took 1.2-2 ms for 3,825 x 768 on 2 AMX Xeon cores, 5% of a passage's time under auto (24 a batch).
__attribute__((target(AVX512 ",avx512bf16"))) static void layer_norm_row_bf16(const uint16_t *x, uint16_t *y,
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

// Returns 0; -1 for C not a multiple of 16; -2 without AVX512-BF16.
int64_t allmpnet_x86_layer_norm(const uint16_t *x, uint16_t *y, const float *weight, const float *bias, float eps,
                                int64_t M, int64_t C, int threads) {
    if (!allmpnet_x86_kernel_supported(KERNEL_AVX512_BF16)) return -2;
    if (C < 16 || C % 16 || M < 0) return -1;
    _Pragma("omp parallel for schedule(static) num_threads(threads < 1 ? 1 : threads)")
    for (int64_t m = 0; m < M; m++) layer_norm_row_bf16(x + m * C, y + m * C, weight, bias, eps, C);
    return 0;
}

// ---------------------------------------------------------------- the whole forward pass in one call
// One team of threads runs every layer's seven steps, with a barrier between steps, from the token ids to the
// pooled vectors. A query's steps are microseconds of work each: run one by one from Python they cost more in
// calls than in arithmetic (48 projections, 24 LayerNorms, 12 attentions). A large batch gains the same way, and
// one code path serves every batch: each step is computed per row (projections, LayerNorms) or per text
// (embeddings, attention, pooling), the same whatever else the batch holds, and a projection's small- and
// large-batch kernels give the same bits, so a text's vector does not depend on its batch. The layer is the
// model's (model/mpnet.py):
//   a = LN1(x + o(attention(qkv(x)))),  x' = LN2(a + down(GELU(up(a)))).
// The residual stream (x, a) stays fp32. With `bf16` the wide outputs that feed one step each (q|k|v, the
// attention's output, the FFN's hidden layer) are stored in bf16: half their traffic, and the attention's bf16
// products read them as they are.

typedef struct {  // one linear layer: the arrays of allmpnet_x86_linear; batches of more than small_rows rows run
                  // large_kernel (vnni-a8's rows on the AMX tiles: the same sums, the same bits)
    int32_t kernel, gelu, large_kernel, small_rows;
    const int8_t *packed;
    const float *scales;
    const float *compensation;
    const float *bias, *smooth;
    int64_t group, N, K;
    float route;
} x86_linear_spec;

typedef struct {
    x86_linear_spec qkv, o, up, down;
    const float *norm1_weight, *norm1_bias, *norm2_weight, *norm2_bias;
} x86_layer_spec;

static int spec_kernel(const x86_linear_spec *s, int64_t M) { return M > s->small_rows ? s->large_kernel : s->kernel; }

// y = act(x W^T + b) [+ residual] for the M rows, by the team (no barrier at the end); residual has y's dtype.
// Returns the rows routed to int16.
static int64_t linear_rows(const x86_linear_spec *s, const void *x, int x_bf16, const void *residual, void *y,
                           int y_bf16, int64_t M, char *scratch, float *buffer) {
    const int kernel = spec_kernel(s, M);
    linear_args a = {x, x_bf16, s->smooth, s->packed, s->scales, s->compensation, s->group, s->bias, residual,
                     y, y_bf16, M, s->N, s->K, s->gelu, int8_activations(kernel) ? s->route : 0.0f};
    place_scratch(&a, kernel, scratch);
    return linear_by_team(kernel, &a, buffer);
}

// request_share for the layer's weights (int8 packed, or the fp32 ones of the F32W kernels), by the team,
// REQUEST_AHEAD bytes: as the thread's part of the previous step ends, so they arrive over the barrier, the
// attention or LayerNorm between, when the memory is otherwise idle. Measured on a query (2 Zen 4 cores, 4 KB
// pages): 48 KB 7% faster than 16, and more better still up to a thread's whole share; on 2 MB pages
// (encode/pages.py) 48 KB and the whole share alike. 128 KB: well inside any L2 (512 KB on Zen 2/3).
#define REQUEST_AHEAD (8 * PREFETCH)
static void request_linear(const x86_linear_spec *s) {
    const int64_t size = s->kernel == KERNEL_AVX512_F32W || s->kernel == KERNEL_AVX2_F32W ? 4 : 1;
    request_share(s->packed, s->K * NB * size, (s->N + NB - 1) / NB, REQUEST_AHEAD);
}

// Rows [0, M) of x: LayerNorm over C in place, by the team.
__attribute__((target(AVX2))) static void layer_norm_by_team(float *x, int64_t M, int64_t C, const float *weight,
                                                             const float *bias, float eps) {
    _Pragma("omp for schedule(static)") for (int64_t m = 0; m < M; m++) {
        float *row = x + m * C, sum = 0.0f, squares = 0.0f;
        _Pragma("omp simd reduction(+:sum)") for (int64_t c = 0; c < C; c++) sum += row[c];
        const float mean = sum / (float)C;
        _Pragma("omp simd reduction(+:squares)") for (int64_t c = 0; c < C; c++)
            squares += (row[c] - mean) * (row[c] - mean);
        const float inverse = 1.0f / __builtin_sqrtf(squares / (float)C + eps);
        _Pragma("omp simd") for (int64_t c = 0; c < C; c++) row[c] = (row[c] - mean) * inverse * weight[c] + bias[c];
    }
}

// The relative position bias of head h for query row 0 of a text: row i's starts `i` entries before it (stride
// -1), as the bias depends on j - i alone; bias_table (H, 2 span - 1), entry span - 1 + j - i.
static inline const float *bias_rows(const float *bias_table, int64_t span, int64_t h) {
    return bias_table + h * (2 * span - 1) + span - 1;
}

static inline __attribute__((always_inline)) float element(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_load((const uint16_t *)p + i) : ((const float *)p)[i];
}

// softmax(q k^T / sqrt(D) + bias) v per text and head, from qkv (M, 3C) into out (M, C), both fp32 or both bf16
// (`bf16`), heads of any size (D <= K), by the team (tasks to whichever thread is free: texts of different
// lengths differ in cost; each is computed whole by one thread); sums: this thread's row of K floats.
__attribute__((target(AVX2))) static void attention_by_team(const void *qkv, void *out, int bf16, int64_t C,
                                                            int64_t H, int64_t texts, const int32_t *start,
                                                            const int32_t *length, const float *bias_table,
                                                            int64_t span, float *sums) {
    const int64_t D = C / H;
    const float scale = 1.0f / __builtin_sqrtf((float)D);
    _Pragma("omp for schedule(dynamic)") for (int64_t th = 0; th < texts * H; th++) {
        const int64_t t = th / H, h = th % H, L = length[t], first = (int64_t)start[t] * 3 * C;
        float weights[MAX_TEXT] __attribute__((aligned(64)));
        for (int64_t i = 0; i < L; i++) {
            const int64_t q = first + i * 3 * C + h * D;
            const float *b = bias_rows(bias_table, span, h) - i;
            float top = -3.0e38f, total = 0.0f;
            for (int64_t j = 0; j < L; j++) {
                const int64_t k = first + j * 3 * C + C + h * D;
                float dot = 0.0f;
                _Pragma("omp simd reduction(+:dot)") for (int64_t d = 0; d < D; d++)
                    dot += element(qkv, q + d, bf16) * element(qkv, k + d, bf16);
                weights[j] = dot * scale + b[j];
                top = weights[j] > top ? weights[j] : top;
            }
            for (int64_t j = 0; j < L; j++) {
                weights[j] = exp_nonpositive(weights[j] - top);
                total += weights[j];
            }
            _Pragma("omp simd") for (int64_t d = 0; d < D; d++) sums[d] = 0.0f;
            for (int64_t j = 0; j < L; j++) {
                const int64_t v = first + j * 3 * C + 2 * C + h * D;
                const float p = weights[j] / total;
                _Pragma("omp simd") for (int64_t d = 0; d < D; d++) sums[d] += p * element(qkv, v + d, bf16);
            }
            const int64_t o = (start[t] + i) * C + h * D;
            if (bf16)
                for (int64_t d = 0; d < D; d++) ((uint16_t *)out)[o + d] = bf16_round(sums[d]);
            else
                for (int64_t d = 0; d < D; d++) ((float *)out)[o + d] = sums[d];
        }
    }
}

// The same for heads of ATTENTION_D with AVX512 (attend_head_*, half the time of the above on an 11-token query),
// q|k|v and out fp32 or bf16; a bf16 text of T tokens on products_for(1, products, T), taken here as `shorter`
// below AMX_MIN_TOKENS and `longer` from there (products_for asks the CPU, which a VM may trap). work: this
// thread's allmpnet_x86_attention_scratch_bytes(longest text, 1).
static void heads_by_team(const void *qkv, void *out, int bf16, int shorter, int longer, int64_t C, int64_t H,
                          int64_t texts, const int32_t *start, const int32_t *length, const float *bias_table,
                          int64_t span, float *work) {
    const float scale = 1.0f / __builtin_sqrtf((float)ATTENTION_D);
    const int64_t size = bf16 ? 2 : 4;
    int tiles = 0;
    _Pragma("omp for schedule(dynamic) nowait") for (int64_t th = 0; th < texts * H; th++) {
        const int64_t t = th / H, h = th % H, L = length[t];
        const float *bias = bias_rows(bias_table, span, h);
        const char *in = (const char *)qkv + h * ATTENTION_D * size;
        char *to = (char *)out + h * ATTENTION_D * size;
        const int products = L < AMX_MIN_TOKENS ? shorter : longer;
        if (products == 2) {
            if (!tiles) configure_tiles(16, 16);
            tiles = 1;
            attend_head_amx((const uint16_t *)in, (uint16_t *)to, bias, -1, scale, start[t], L, C, work);
        } else if (products == 1) {
            attend_head_bf16((const uint16_t *)in, (uint16_t *)to, bias, -1, scale, start[t], L, C, work);
        } else {
            attend_head_fp32(in, bf16, to, bias, -1, scale, start[t], L, C, work);
        }
    }
    if (tiles) release_tiles();
    _Pragma("omp barrier")
}

// The embeddings (model/mpnet.py Embeddings): x = LN(word[id] + position[offset + p]) for a text's p-th token not
// counting the tokens whose id is pad_id, which take position[offset - 1] (MPNet's absolute positions skip the pad
// id even where the text itself holds it); tables (rows x C) bf16 or fp32.
typedef struct {
    const void *word, *position;
    int64_t bf16, vocab, positions, offset, pad_id;
    const float *norm_weight, *norm_bias;
} x86_embedding_spec;

// Rows of the texts from their token ids: the embeddings, by the team (then LayerNorm).
__attribute__((target(AVX2))) static void embed_by_team(const x86_embedding_spec *e, const int32_t *ids, float *x,
                                                        int64_t C, int64_t texts, const int32_t *start,
                                                        const int32_t *length) {
    _Pragma("omp for schedule(static)") for (int64_t t = 0; t < texts; t++) {
        int64_t counted = 0;  // the text's tokens so far that are not pad_id
        for (int64_t p = 0; p < length[t]; p++) {
            const int64_t m = start[t] + p, w = (int64_t)ids[m] * C;
            const int64_t q = (ids[m] == e->pad_id ? e->offset - 1 : e->offset + counted++) * C;
            float *row = x + m * C;
            if (e->bf16) {
                const uint16_t *word = (const uint16_t *)e->word + w, *position = (const uint16_t *)e->position + q;
                for (int64_t c = 0; c < C; c++) row[c] = bf16_load(word + c) + bf16_load(position + c);
            } else {
                const float *word = (const float *)e->word + w, *position = (const float *)e->position + q;
                for (int64_t c = 0; c < C; c++) row[c] = word[c] + position[c];
            }
        }
    }
}

// Each text's mean row, unit length when `normalize` (F.normalize's 1e-12 floor), into out (texts, C), by the team;
// texts whose mean holds NaN or inf are counted into *bad (the caller's check, done here while the row is in L1: a
// torch op on the result after the layers' sweep of the caches costs ~0.1 ms).
__attribute__((target(AVX2))) static void pool_by_team(const float *x, int64_t C, int64_t texts,
                                                       const int32_t *start, const int32_t *length, int normalize,
                                                       float *out, int64_t *bad) {
    _Pragma("omp for schedule(static)") for (int64_t t = 0; t < texts; t++) {
        float *row = out + t * C, squares = 0.0f, poison = 0.0f;  // poison: 0 x each value, NaN unless all finite
        for (int64_t c = 0; c < C; c++) row[c] = 0.0f;
        for (int64_t m = start[t]; m < start[t] + length[t]; m++)
            for (int64_t c = 0; c < C; c++) row[c] += x[m * C + c];
        const float inverse = 1.0f / (float)length[t];
        _Pragma("omp simd reduction(+:squares, poison)") for (int64_t c = 0; c < C; c++) {
            row[c] *= inverse;
            squares += row[c] * row[c];
            poison += row[c] * 0.0f;
        }
        if (poison != 0.0f || poison != poison) {
            _Pragma("omp atomic") (*bad)++;
        }
        if (normalize) {
            const float norm = __builtin_sqrtf(squares), scale = 1.0f / (norm > 1e-12f ? norm : 1e-12f);
            for (int64_t c = 0; c < C; c++) row[c] *= scale;
        }
    }
}

// Bytes of scratch allmpnet_x86_encoder needs for M rows, hidden size C, intermediate size I, texts of at most
// `longest` tokens.
int64_t allmpnet_x86_encoder_scratch_bytes(int64_t M, int64_t C, int64_t I, int64_t longest, int threads) {
    const int64_t widest = I > 3 * C ? I : 3 * C, K = I > C ? I : C;
    return aligned(M * widest * 4) + 2 * aligned(M * C * 4) + widest_linear_scratch_bytes(M, K)
           + (int64_t)(threads < 1 ? 1 : threads) * (K * 4 + allmpnet_x86_attention_scratch_bytes(longest, 1));
}

// x (M, C) fp32, in place: through `count` layers. The texts lie at rows start[t] .. start[t] + length[t], each of
// at most `span` <= MAX_TEXT tokens; bias_table (H, 2 span - 1) fp32 the relative position bias by distance
// (bias_rows); eps the LayerNorms'. bf16: the wide intermediates in bf16, the attention of heads of ATTENTION_D
// on `products` (0-2, as allmpnet_x86_attention's). With `embedding`, x is first filled from the
// rows' token ids (ids, M) through the embeddings; with `pooled` (texts, C), each text's mean row (unit length
// when `normalize`) is written there: a batch's whole forward pass in one call. routed (count x 4) or NULL: each
// projection's rows routed to int16 (int8 kernel). Returns 0, or with `pooled` the number of texts whose mean
// holds NaN or inf; -1 or -2 as allmpnet_x86_linear for a layer it refuses (nothing computed); -3 for texts out of
// range, -4 for token ids or positions outside the embedding tables.
int64_t allmpnet_x86_encoder(const x86_layer_spec *layers, int64_t count, const x86_embedding_spec *embedding,
                             const int32_t *ids, float *x, int64_t M, int64_t C, int64_t H, int64_t texts,
                             const int32_t *start, const int32_t *length, const float *bias_table, int64_t span,
                             float eps, int bf16, int products, float *pooled, int normalize, int64_t *routed,
                             void *scratch, int threads) {
    if (M <= 0 || C <= 0 || H <= 0 || C % H || count < 0) return -1;
    int64_t I = 0;
    for (int64_t l = 0; l < count; l++) {
        const x86_linear_spec *specs[4] = {&layers[l].qkv, &layers[l].o, &layers[l].up, &layers[l].down};
        I = layers[l].up.N;
        const int64_t shapes[4][2] = {{3 * C, C}, {C, C}, {I, C}, {C, I}};  // N, K
        for (int p = 0; p < 4; p++) {
            const x86_linear_spec *s = specs[p];
            if (s->N != shapes[p][0] || s->K != shapes[p][1] || (l && I != layers[0].up.N)) return -1;
            const int64_t kernel = spec_kernel(s, M);
            const int64_t refused = check_linear(kernel, s->compensation, s->group, M, s->N, s->K, s->route);
            if (refused) return refused;
        }
    }
    if (span < 1 || span > MAX_TEXT) return -3;
    int64_t longest = 0;
    for (int64_t t = 0; t < texts; t++) {
        if (start[t] < 0 || length[t] < 1 || length[t] > span || start[t] + length[t] > M) return -3;
        longest = length[t] > longest ? length[t] : longest;
    }
    if (embedding) {
        for (int64_t t = 0; t < texts; t++) {
            if (embedding->offset < 1 || embedding->offset + length[t] > embedding->positions) return -4;
            for (int64_t m = start[t]; m < start[t] + length[t]; m++)
                if (ids[m] < 0 || ids[m] >= embedding->vocab) return -4;
        }
    }
    // the AVX512 attention where the caller's layer kernels are AVX512 ones (so it takes AVX512, and the CPU has it)
    const int32_t first = count ? layers[0].qkv.kernel : 0;
    const int heads_kernel = C / H == ATTENTION_D && !avx2_kernel(first)
                             && allmpnet_x86_kernel_supported(KERNEL_AVX512_F32);
    const int shorter = products_for(bf16, products, 1), longer = products_for(bf16, products, MAX_TEXT);
    if (threads < 1) threads = 1;
    char *at = (char *)scratch;
    void *wide = at;  // q|k|v, then the FFN's hidden layer (M, I): never alive at once
    at += aligned(M * (I > 3 * C ? I : 3 * C) * 4);
    float *mixed = (float *)at;
    void *attended = at + aligned(M * C * 4);
    at += 2 * aligned(M * C * 4);
    const int64_t K = I > C ? I : C;
    // per thread: its attention's work (64-byte aligned: a multiple of 64 bytes each), then a row of K floats
    const int64_t work_floats = allmpnet_x86_attention_scratch_bytes(longest, 1) / 4;
    float *works = (float *)(at + widest_linear_scratch_bytes(M, K)), *buffers = works + threads * work_floats;
    int64_t bad = 0;
    _Pragma("omp parallel num_threads(threads)") {
        // texts whose keys score far apart give weights that underflow to denormals, which Intel cores compute in
        // microcode assists: flushed to zero instead (FTZ, DAZ), as in allmpnet_x86_attention; restored after
        const unsigned int control = _mm_getcsr();
        _mm_setcsr(control | 0x8040);
        float *buffer = buffers + (int64_t)omp_get_thread_num() * K;
        float *work = works + (int64_t)omp_get_thread_num() * work_floats;
        const int lead = omp_get_thread_num() == 0;
        if (embedding) {
            embed_by_team(embedding, ids, x, C, texts, start, length);
            layer_norm_by_team(x, M, C, embedding->norm_weight, embedding->norm_bias, eps);
        }
        for (int64_t l = 0; l < count; l++) {
            const x86_layer_spec *layer = layers + l;
            int64_t n = linear_rows(&layer->qkv, x, 0, NULL, wide, bf16, M, at, buffer);
            if (lead && routed) routed[4 * l] = n;
            request_linear(&layer->o);  // each thread's share of the next projection, as its part of this one ends
            _Pragma("omp barrier")
            if (heads_kernel)
                heads_by_team(wide, attended, bf16, shorter, longer, C, H, texts, start, length, bias_table, span,
                              work);
            else
                attention_by_team(wide, attended, bf16, C, H, texts, start, length, bias_table, span, buffer);
            n = linear_rows(&layer->o, attended, bf16, x, mixed, 0, M, at, buffer);
            if (lead && routed) routed[4 * l + 1] = n;
            request_linear(&layer->up);
            _Pragma("omp barrier")
            layer_norm_by_team(mixed, M, C, layer->norm1_weight, layer->norm1_bias, eps);
            n = linear_rows(&layer->up, mixed, 0, NULL, wide, bf16, M, at, buffer);
            if (lead && routed) routed[4 * l + 2] = n;
            request_linear(&layer->down);
            _Pragma("omp barrier")
            n = linear_rows(&layer->down, wide, bf16, mixed, x, 0, M, at, buffer);
            if (lead && routed) routed[4 * l + 3] = n;
            if (l + 1 < count) request_linear(&layer[1].qkv);
            _Pragma("omp barrier")
            layer_norm_by_team(x, M, C, layer->norm2_weight, layer->norm2_bias, eps);
        }
        if (pooled) pool_by_team(x, C, texts, start, length, normalize, pooled, &bad);
        _mm_setcsr(control);
    }
    return bad;
}

#else  // ALLMPNET_MICRO_KERNELS: the part included once per row count

// A8 (VNNI): 4 vectors of 16 outputs per row, each lane one output.
#define A8_START(m) __m512i c##m##0 = zero, c##m##1 = zero, c##m##2 = zero, c##m##3 = zero;
#define A8_STEP(m)                                                            \
    {                                                                         \
        const __m512i xa = _mm512_set1_epi32(*(const int32_t *)(r##m + k)); \
        c##m##0 = _mm512_dpbusd_epi32(c##m##0, xa, w0);                       \
        c##m##1 = _mm512_dpbusd_epi32(c##m##1, xa, w1);                       \
        c##m##2 = _mm512_dpbusd_epi32(c##m##2, xa, w2);                       \
        c##m##3 = _mm512_dpbusd_epi32(c##m##3, xa, w3);                       \
    }
// a fresh tile starts at the compensation (start), which cancels the activations' +128 (see the top)
#define A8_FLUSH(m)                                                                                       \
    {                                                                                                     \
        const float *before = add ? tile[m] : start;                                                      \
        add_to(tile[m], _mm512_cvtepi32_ps(c##m##0), scale, before);                                      \
        add_to(tile[m] + 16, _mm512_cvtepi32_ps(c##m##1), scale + 16, before + 16);                       \
        add_to(tile[m] + 32, _mm512_cvtepi32_ps(c##m##2), scale + 32, before + 32);                       \
        add_to(tile[m] + 48, _mm512_cvtepi32_ps(c##m##3), scale + 48, before + 48);                       \
    }

__attribute__((target(AVX512 ",avx512vnni"), noinline)) static void
ROWS_NAME(mk_vnni_a8)(const uint8_t *const *x, int64_t K, const int8_t *panel, const float *scales,
                      const float *start, int64_t group, float tile[][NB], int accumulate) {
    ROWS(ROW_POINTER)
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t k0 = 0; k0 < K; k0 += group) {
        const int add = accumulate || k0 > 0;
        ROWS(A8_START)
        for (int64_t k = k0; k < k0 + group; k += 4) {
            const int8_t *w = panel + k * NB;
            for (int line = 0; line < 256; line += 64) _mm_prefetch((const char *)w + PREFETCH + line, PREFETCH_HINT);
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
    add_scaled(tile[m] + 32 * half, TO_F32(FOLD(c##m##0, c##m##1)), scale, add);             \
    add_scaled(tile[m] + 32 * half + 16, TO_F32(FOLD(c##m##2, c##m##3)), scale + 16, add);

#define MK_PAIRS(NAME, TARGET, ACT_T)                                                                            \
    __attribute__((target(TARGET), noinline)) static void NAME(const ACT_T *const *x, int64_t K, const int8_t *panel, \
                                                     const float *scales, int64_t group, float tile[][NB],       \
                                                     int accumulate) {                                           \
        ROWS(ROW_POINTER)                                                                                         \
        for (int half = 0; half < 2; half++) {                                                                   \
            for (int64_t k0 = 0; k0 < K; k0 += group) {                                                          \
                const int add = accumulate || k0 > 0;                                                            \
                ROWS(P_START)                                                                                     \
                for (int64_t k = k0; k < k0 + group; k += 4) {                                                   \
                    const int8_t *w = panel + k * NB + 128 * half;                                               \
                    _mm_prefetch((const char *)w + PREFETCH, PREFETCH_HINT);                                       \
                    _mm_prefetch((const char *)w + PREFETCH + 64, PREFETCH_HINT);                                  \
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
    add_scaled(tile[m] + 16 * quarter,                                                                               \
               fold_pairs_f32(fold_pairs_f32(c##m##0, c##m##1), fold_pairs_f32(c##m##2, c##m##3)), scale, add);
#define WIDEN_F32(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))

__attribute__((target(AVX512), noinline)) static void
ROWS_NAME(mk_avx512_f32)(const float *const *x, int64_t K, const int8_t *panel, const float *scales,
                        int64_t group, float tile[][NB], int accumulate) {
    ROWS(ROW_POINTER)
    for (int quarter = 0; quarter < 4; quarter++) {
        for (int64_t k0 = 0; k0 < K; k0 += group) {
            const int add = accumulate || k0 > 0;
            ROWS(F_START)
            for (int64_t k = k0; k < k0 + group; k += 4) {
                const int8_t *w = panel + k * NB + 64 * quarter;
                _mm_prefetch((const char *)w + PREFETCH, PREFETCH_HINT);
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
        const __m256 before = add ? _mm256_loadu_ps(t) : _mm256_setzero_ps();                             \
        _mm256_storeu_ps(t, _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_loadu_ps(scale), before));   \
    }

__attribute__((target(AVX2), noinline)) static void
ROWS_NAME(mk_avx2_a16)(const int16_t *const *x, int64_t K, const int8_t *panel, const float *scales,
                        int64_t group, float tile[][NB], int accumulate) {
    ROWS(ROW_POINTER)
    for (int part = 0; part < 8; part++) {
        for (int64_t k0 = 0; k0 < K; k0 += group) {
            const int add = accumulate || k0 > 0;
            ROWS(H_START)
            for (int64_t k = k0; k < k0 + group; k += 4) {
                const int8_t *w = panel + k * NB + 32 * part;
                _mm_prefetch((const char *)w + PREFETCH, PREFETCH_HINT);
                const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w));
                const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 16)));
                ROWS(H_STEP)
            }
            const float *scale = scales + k0 / group * NB + 8 * part;
            ROWS(H_FLUSH)
        }
    }
}

// A8 on 256-bit vectors: per pass 16 outputs as 2 vectors of 8 (each lane one output, as A8), so 6 rows' sums fit
// AVX2's 16 registers; the same flush as A8 (sums x scale + where they start), so the outputs are A8's to the bit.
#define Y_START(m) __m256i c##m##0 = _mm256_setzero_si256(), c##m##1 = c##m##0;
#define Y_STEP(m)                                                               \
    {                                                                           \
        const __m256i xa = _mm256_set1_epi32(*(const int32_t *)(r##m + k));    \
        c##m##0 = DPBUSD256(c##m##0, xa, w0);                                   \
        c##m##1 = DPBUSD256(c##m##1, xa, w1);                                   \
    }
#define Y_FLUSH(m)                                                                                             \
    {                                                                                                          \
        float *t = tile[m] + 16 * part;                                                                        \
        const float *before = add ? t : start + 16 * part;                                                     \
        _mm256_storeu_ps(t, _mm256_fmadd_ps(_mm256_cvtepi32_ps(c##m##0), _mm256_loadu_ps(scale),             \
                                            _mm256_loadu_ps(before)));                                         \
        _mm256_storeu_ps(t + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(c##m##1), _mm256_loadu_ps(scale + 8),      \
                                                _mm256_loadu_ps(before + 8)));                                 \
    }
#define MK_A8_256(NAME, TARGET)                                                                                   \
    __attribute__((target(TARGET), noinline)) static void NAME(const uint8_t *const *x, int64_t K,             \
                                                               const int8_t *panel, const float *scales,          \
                                                               const float *start, int64_t group,                 \
                                                               float tile[][NB], int accumulate) {                \
        ROWS(ROW_POINTER)                                                                                         \
        for (int part = 0; part < 4; part++) {                                                                    \
            for (int64_t k0 = 0; k0 < K; k0 += group) {                                                           \
                const int add = accumulate || k0 > 0;                                                             \
                ROWS(Y_START)                                                                                     \
                for (int64_t k = k0; k < k0 + group; k += 4) {                                                    \
                    const int8_t *w = panel + k * NB + 64 * part;                                                 \
                    _mm_prefetch((const char *)w + PREFETCH, PREFETCH_HINT);                                      \
                    const __m256i w0 = _mm256_loadu_si256((const __m256i *)w);                                    \
                    const __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + 32));                             \
                    ROWS(Y_STEP)                                                                                  \
                }                                                                                                 \
                const float *scale = scales + k0 / group * NB + 16 * part;                                        \
                ROWS(Y_FLUSH)                                                                                     \
            }                                                                                                     \
        }                                                                                                         \
    }
#define DPBUSD256 _mm256_dpbusd_epi32
MK_A8_256(ROWS_NAME(mk_vnni256_a8), AVX512 ",avx512vnni")
#undef DPBUSD256
#if HAVE_AVXVNNI
#define DPBUSD256 _mm256_dpbusd_avx_epi32
MK_A8_256(ROWS_NAME(mk_avxvnni_a8), AVX2 ",avxvnni")
#undef DPBUSD256
#endif

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
        _mm_storeu_ps(t, _mm_fmadd_ps(sums, _mm_loadu_ps(scale), add ? _mm_loadu_ps(t) : _mm_setzero_ps())); \
    }
#define WIDEN_F32X8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))

__attribute__((target(AVX2), noinline)) static void
ROWS_NAME(mk_avx2_f32)(const float *const *x, int64_t K, const int8_t *panel, const float *scales,
                        int64_t group, float tile[][NB], int accumulate) {
    ROWS(ROW_POINTER)
    for (int part = 0; part < 16; part++) {
        for (int64_t k0 = 0; k0 < K; k0 += group) {
            const int add = accumulate || k0 > 0;
            ROWS(G_START)
            for (int64_t k = k0; k < k0 + group; k += 4) {
                const int8_t *w = panel + k * NB + 16 * part;
                _mm_prefetch((const char *)w + PREFETCH, PREFETCH_HINT);
                const __m256 w0 = WIDEN_F32X8(w), w1 = WIDEN_F32X8(w + 8);
                ROWS(G_STEP)
            }
            const float *scale = scales + k0 / group * NB + 4 * part;
            ROWS(G_FLUSH)
        }
    }
}

// F32W (AVX512): 4 outputs (weight rows w, w + K, ...) x R rows, 16 inputs per step, a vector of partial sums per
// output and row; the next 4 weight rows (contiguous after these) are prefetched at the same pace.
#define V_START(m) __m512 c##m##0 = _mm512_setzero_ps(), c##m##1 = c##m##0, c##m##2 = c##m##0, c##m##3 = c##m##0;
#define V_STEP(m)                                              \
    {                                                          \
        const __m512 xv = _mm512_loadu_ps(r##m + k);           \
        c##m##0 = _mm512_fmadd_ps(xv, w0, c##m##0);            \
        c##m##1 = _mm512_fmadd_ps(xv, w1, c##m##1);            \
        c##m##2 = _mm512_fmadd_ps(xv, w2, c##m##2);            \
        c##m##3 = _mm512_fmadd_ps(xv, w3, c##m##3);            \
    }
#define V_FLUSH(m) _mm_storeu_ps(tile[m] + j, sum4_f32(c##m##0, c##m##1, c##m##2, c##m##3));

__attribute__((target(AVX512), noinline)) static void
ROWS_NAME(mk_avx512_f32w)(const float *const *x, int64_t K, const float *w, float tile[][NB], int j) {
    ROWS(ROW_POINTER)
    const char *next = (const char *)(w + 4 * K);  // 16 K bytes, 256 per step of 16 inputs
    ROWS(V_START)
    for (int64_t k = 0; k < K; k += 16) {
        for (int line = 0; line < 256; line += 64) _mm_prefetch(next + 16 * k + line, PREFETCH_HINT);
        const __m512 w0 = _mm512_loadu_ps(w + k), w1 = _mm512_loadu_ps(w + K + k);
        const __m512 w2 = _mm512_loadu_ps(w + 2 * K + k), w3 = _mm512_loadu_ps(w + 3 * K + k);
        ROWS(V_STEP)
    }
    ROWS(V_FLUSH)
}

// F32W (AVX2): 2 outputs x R rows, 8 inputs per step (16 registers: 12 sums, 2 weights, the row's inputs).
#define U_START(m) __m256 c##m##0 = _mm256_setzero_ps(), c##m##1 = c##m##0;
#define U_STEP(m)                                              \
    {                                                          \
        const __m256 xv = _mm256_loadu_ps(r##m + k);           \
        c##m##0 = _mm256_fmadd_ps(xv, w0, c##m##0);            \
        c##m##1 = _mm256_fmadd_ps(xv, w1, c##m##1);            \
    }
// hadd: [c0 c0 c1 c1 | c0 c0 c1 c1] partial sums; halves added, then pairs: [sum c0, sum c1]
#define U_FLUSH(m)                                                                                            \
    {                                                                                                         \
        const __m256 h = _mm256_hadd_ps(c##m##0, c##m##1);                                                    \
        const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));                  \
        _mm_storel_pi((__m64 *)(tile[m] + j), _mm_hadd_ps(q, q));                                             \
    }

__attribute__((target(AVX2), noinline)) static void
ROWS_NAME(mk_avx2_f32w)(const float *const *x, int64_t K, const float *w, float tile[][NB], int j) {
    ROWS(ROW_POINTER)
    const char *next = (const char *)(w + 2 * K);  // 8 K bytes, 64 per step of 8 inputs
    ROWS(U_START)
    for (int64_t k = 0; k < K; k += 8) {
        _mm_prefetch(next + 8 * k, PREFETCH_HINT);
        const __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + K + k);
        ROWS(U_STEP)
    }
    ROWS(U_FLUSH)
}

#endif

// A linear layer's rows on their way in and out of the micro-kernels: the activations prepared in the kernel's form
// (prepare_row), and the sums finished into y (finish_rows). Plain loops, included by each instruction set's file,
// which vectorises them for its own vectors.
#ifndef ALLMPNET_LINEAR_ROWS_H
#define ALLMPNET_LINEAR_ROWS_H
#include <immintrin.h>

#include "internal.h"

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
static inline __attribute__((always_inline)) void finish_row(float *ALLMPNET_RESTRICT v, int width, float s,
                                                            const float *ALLMPNET_RESTRICT bias, int gelu_on,
                                                            const void *ALLMPNET_RESTRICT residual,
                                                            void *ALLMPNET_RESTRICT y,
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
                                                           float *ALLMPNET_RESTRICT v, float s) {
    const int64_t K = a->K;
    for (int j = 0; j < a->split_count[row]; j++) {
        const int64_t k = a->split_index[row * MAX_SPLIT + j];
        const float c = a->split_value[row * MAX_SPLIT + j] / s;
        const int8_t *ALLMPNET_RESTRICT w = a->packed + (nb * K + (k & ~3)) * NB + (k & 3);
        const float *ALLMPNET_RESTRICT scale = a->scales + (nb * (K / a->group) + k / a->group) * NB;
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
#endif

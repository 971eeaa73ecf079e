// allmpnet's CPU backend: the one definition of the library's interface (what Python calls through ctypes).
//
// Python (allmpnet/backends/cpu/library.py) never trusts a copy of this file: it reads allmpnet_cpu_layout(),
// which states the interface version, the kernel ids and the size and offset of every struct field it fills, and
// refuses a library whose layout differs from its ctypes mirrors.
//
// int8 linear layers keep one packed int8 copy of W whatever the batch size:
//   packed       [N/64][K/4][64][4] int8 (N padded to a multiple of 64): per block of 64 outputs and step of 4
//                inputs, 64 outputs x 4 inputs (the order AVX512-VNNI's vpdpbusd reads: 16 outputs x 4 inputs per
//                vector; AMX-int8's B tiles read the same bytes);
//   scales       [N/64][K/group][64] fp32: one scale per output channel and group of inputs;
//   compensation [N/64 x 64] fp32: -128 x sum over groups of (scale x the group's sum of int8 weights), for the
//                kernels with int8 activations only (stored as q + 128, since vpdpbusd multiplies unsigned by signed
//                bytes: a row's scaled group sums started there add up to those of q w).
#ifndef ALLMPNET_CPU_H
#define ALLMPNET_CPU_H
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ALLMPNET_CPU_INTERFACE_VERSION 1

#if defined(__GNUC__)
#define ALLMPNET_API __attribute__((visibility("default")))
#else
#define ALLMPNET_API
#endif

// Linear kernels, by how the activations are multiplied (the `kernel` argument; a call refuses, rather than
// crashes, where the CPU lacks the kernel's instructions):
//   A8   int8 activations, a scale per row, vpdpbusd (W8A8); AMX_A8: the same rows and sums on AMX-int8 tiles
//   A16  int16 activations, a scale per row: vpdpwssd (VNNI), vpmaddwd (AVX512BW, AVX2)
//   BF16 bf16 activations, vdpbf16ps;  F32 fp32 activations, FMA;  F32W fp32 activations and the model's own
//   fp32 (N, K) weights (no packing)
enum {
    KERNEL_AVX2_F32 = 1,
    KERNEL_AVX2_A16 = 2,
    KERNEL_AVX512_F32 = 3,
    KERNEL_AVX512_A16 = 4,
    KERNEL_AVX512_BF16 = 5,
    KERNEL_VNNI_A16 = 6,
    KERNEL_VNNI_A8 = 7,
    KERNEL_AVX512_F32W = 8,
    KERNEL_AVX2_F32W = 9,
    KERNEL_AVXVNNI_A8 = 10,  // A8 on 256-bit vectors: AVX-VNNI's VEX vpdpbusd (AVX2 CPUs: Alder Lake, Sierra Forest)
    KERNEL_VNNI256_A8 = 11,  // the same code with AVX512-VNNI's EVEX form on 256 bits: outputs equal to the bit
    KERNEL_AMX_A8 = 12,      // A8 on AMX-int8 tiles (Sapphire Rapids on): the same sums as VNNI_A8
    KERNEL_LAST = KERNEL_AMX_A8,
};

// A spiky row (int8 kernels, route > 0: its largest |x| above route x its RMS) keeps its entries above
// SPLIT_SHARE x route x RMS aside, exact, when there are at most MAX_SPLIT of them; more, and the row runs with
// int16 activations.
#define ALLMPNET_SPLIT_SHARE 0.6f
#define ALLMPNET_MAX_SPLIT 8
#define ALLMPNET_MAX_TEXT 512  // tokens of one text in allmpnet_x86_encoder (MPNet's 514 positions less two)
#define ALLMPNET_HEAD_DIM 64   // head size the x86 attention kernels are written for
#define ALLMPNET_AMX_MAX_BLOCK_TOKENS 32  // longest block allmpnet_short_attention takes
#define ALLMPNET_AMX_MAX_HEAD_DIM 128

typedef struct {  // one linear layer of the fused encoder: batches of more than small_rows rows run large_kernel
    int32_t kernel, gelu, large_kernel, small_rows;
    const int8_t *packed;  // or, for the F32W kernels, the (N, K) fp32 weights
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

typedef struct {  // the embeddings: LN(word[id] + position[offset + p]), p counting the text's tokens but pad_id's
    const void *word, *position;
    int64_t bf16, vocab, positions, offset, pad_id;
    const float *norm_weight, *norm_bias;
} x86_embedding_spec;

// "version=1;kernel.vnni-a8=7;...;x86_linear_spec.size=88;x86_linear_spec.kernel=0;...": what this build is
ALLMPNET_API const char *allmpnet_cpu_layout(void);
// 1 where this CPU (and this build) runs `kernel`, else 0
ALLMPNET_API int allmpnet_x86_kernel_supported(int kernel);

// y = act(x W^T + b) [+ residual]: x, residual and y fp32 or bf16; smooth (K,) or NULL multiplies x first;
// scratch: allmpnet_x86_scratch_bytes, 64-byte aligned. Returns the rows routed to int16 (>= 0); -1 for shapes
// the kernels do not take; -2 where this CPU lacks the kernel.
ALLMPNET_API int64_t allmpnet_x86_scratch_bytes(int kernel, int64_t M, int64_t K, int threads);
ALLMPNET_API int64_t allmpnet_x86_linear(int kernel, const void *x, int x_bf16, const float *smooth,
                                         const int8_t *packed, const float *scales, const float *compensation,
                                         int64_t group, const float *bias, const void *residual, void *y, int y_bf16,
                                         int64_t M, int64_t N, int64_t K, int gelu, float route, void *scratch,
                                         int threads);

// softmax(q k^T * scale + bias) v for `blocks` blocks of T tokens from row `start` of packed q|k|v (N, 3C), heads
// of ALLMPNET_HEAD_DIM, into out (N, C); qkv and out bf16 or fp32; bias (H, T, T) fp32; products for bf16 blocks:
// 0 fp32 FMAs, 1 AVX512-BF16 pairs, 2 AMX-bf16 tiles, as far as the CPU goes. Returns the products used; -1 for a
// bad shape; -2 without AVX512.
ALLMPNET_API int64_t allmpnet_x86_attention_scratch_bytes(int64_t T, int threads);
ALLMPNET_API int64_t allmpnet_x86_attention(const void *qkv, int bf16, void *out, const float *bias, float scale,
                                            int64_t start, int64_t blocks, int64_t T, int64_t H, int products,
                                            void *scratch, int threads);

// LayerNorm over each bf16 row of C (a multiple of 16); y may be x. Returns 0; -1 for a bad C; -2 without
// AVX512-BF16.
ALLMPNET_API int64_t allmpnet_x86_layer_norm(const uint16_t *x, uint16_t *y, const float *weight, const float *bias,
                                             float eps, int64_t M, int64_t C, int threads);

// The whole forward pass of a batch (encoder.c): from token ids (with `embedding`) or rows of x (M, C) fp32,
// through `count` layers, to each text's mean row (with `pooled`). See encoder.c for the arguments.
ALLMPNET_API int64_t allmpnet_x86_encoder_scratch_bytes(int64_t M, int64_t C, int64_t I, int64_t longest,
                                                        int threads);
ALLMPNET_API int64_t allmpnet_x86_encoder(const x86_layer_spec *layers, int64_t count,
                                          const x86_embedding_spec *embedding, const int32_t *ids, float *x,
                                          int64_t M, int64_t C, int64_t H, int64_t texts, const int32_t *start,
                                          const int32_t *length, const float *bias_table, int64_t span, float eps,
                                          int bf16, int products, float *pooled, int normalize, int64_t *routed,
                                          void *scratch, int threads);

// AMX-bf16 (amx_bf16.c): weight-only int8 linear layers widened to bf16 on the tiles, and attention over blocks
// of at most 32 tokens. Both return -2 where this CPU lacks AMX-bf16 or refused the tile state.
ALLMPNET_API int allmpnet_amx_bf16_linear(const uint16_t *x, const int8_t *packed, const float *scales,
                                          int64_t group, const float *bias, const uint16_t *residual, uint16_t *y,
                                          int64_t M, int64_t N, int64_t K, int gelu, int threads);
ALLMPNET_API int allmpnet_amx_short_attention(const uint16_t *qkv, uint16_t *out, const float *bias, float scale,
                                              int64_t start, int64_t blocks, int64_t T, int64_t H, int64_t D,
                                              int threads);

#ifdef __cplusplus
}
#endif
#endif

// What the backend's source files share and Python never sees: the blocking constants, a linear call's
// arguments, scalar helpers (each file vectorises them for its own instruction set) and the functions one file
// calls in another. Every function here is called only where the CPU runs the instructions of the file that
// defines it: linear.c, attention.c and encoder.c, built for any x86-64, decide that before calling.
#ifndef ALLMPNET_INTERNAL_H
#define ALLMPNET_INTERNAL_H
#include <stdint.h>
#include <string.h>

#include "allmpnet_cpu.h"

// set by the build (build.py): whether the compiler knew AMX and AVX-VNNI, and so built their files
#ifndef ALLMPNET_HAVE_AMX
#define ALLMPNET_HAVE_AMX 0
#endif
#ifndef ALLMPNET_HAVE_AVXVNNI
#define ALLMPNET_HAVE_AVXVNNI 0
#endif

#ifdef __cplusplus
#define ALLMPNET_RESTRICT __restrict
extern "C" {
#else
#define ALLMPNET_RESTRICT restrict
#endif

#define NB 64           // outputs per packed block
#define MR 6            // rows per micro-kernel call
#define MB 192          // rows per block whose prepared activations are reused by every output block
#define SMALL_CHUNKS 4  // batches of at most this many chunks of MR rows go through each output block group by group
// Packed weights are requested this many bytes ahead of the step being multiplied, into L2: ahead into L1 a few
// rows stream their weights well below the memory's rate
#define PREFETCH 16384
#define PREFETCH_HINT _MM_HINT_T1
#define SPLIT_SHARE ALLMPNET_SPLIT_SHARE
#define MAX_SPLIT ALLMPNET_MAX_SPLIT
#define MAX_TEXT ALLMPNET_MAX_TEXT
#define W_CHUNKS 11     // F32W: chunks of MR rows per pass over the weights (66 rows: a query's batch in one pass)
#define AMX_ROWS 32     // AMX_A8: rows per chunk, two A tiles of 16
#define AMX_STEP 64     // AMX_A8: inputs per A tile row

#define ATTENTION_D ALLMPNET_HEAD_DIM
#define ATTENTION_ROWS 4   // query rows per register block
#define TILE_ROWS 16       // query rows per pass of the AMX attention
#define AMX_MIN_TOKENS 32  // shorter blocks take fp32 FMAs on AMX CPUs (the tiles idle below a tile of keys)

enum { ACT_F32, ACT_BF16, ACT_I16, ACT_U8 };

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
    float route;          // > 0: rows with max |v| > route x rms(v) are spiky (kernels with int8 activations only)
    void *act;            // prepared activations in the kernel's form, (M, K)
    int16_t *act16;       // (M, K) int16 activations of the rows routed to int16
    float *row_scale;     // (M,)
    int32_t *order;       // (M,): the rows of the kernel's form, then the routed ones
    int32_t *routed;      // (M,): 1 where the row was routed to int16
    int32_t *split_count; // (M,): entries of the row kept aside, their inputs and values:
    int32_t *split_index; // (M, MAX_SPLIT)
    float *split_value;   // (M, MAX_SPLIT)
} linear_args;

// ---------------------------------------------------------------- kernels' properties (linear.c)
int int8_activations(int kernel);  // vpdpbusd kernels: rows may be spiky, sums start at the compensation
int avx2_kernel(int kernel);       // written for AVX2 CPUs (no AVX-512 instruction)
int activation_kind(int kernel);   // ACT_*
int amx_ready(int bit);            // the tiles and products of `bit` (AMX_INT8_BIT, AMX_BF16_BIT), and the state
#define AMX_INT8_BIT 25
#define AMX_BF16_BIT 22

// ---------------------------------------------------------------- one linear layer by the calling team
// Every thread of an OpenMP team calls it (the layer's own team, or the fused encoder's); buffer: K floats of
// this thread's own. Returns the rows routed to int16; no barrier at the end (the caller waits before reading y).
int64_t linear_by_team(int kernel, const linear_args *a, float *buffer);
int64_t widest_linear_scratch_bytes(int64_t M, int64_t K);
int64_t check_linear(int kernel, const float *compensation, int64_t group, int64_t M, int64_t N, int64_t K,
                     float route);
void place_scratch(linear_args *a, int kernel, char *at);
void request_share(const void *weights, int64_t block_bytes, int64_t blocks, int64_t bytes);
static inline int64_t aligned(int64_t bytes) { return (bytes + 63) / 64 * 64; }

// the drivers, one per kernel (linear_<isa>.cpp)
int64_t run_avx2_f32(const linear_args *a, float *buffer);
int64_t run_avx2_a16(const linear_args *a, float *buffer);
int64_t run_avx2_f32w(const linear_args *a, float *buffer);
int64_t run_avx512_f32(const linear_args *a, float *buffer);
int64_t run_avx512_a16(const linear_args *a, float *buffer);
int64_t run_avx512_f32w(const linear_args *a, float *buffer);
int64_t run_avx512_bf16(const linear_args *a, float *buffer);
int64_t run_vnni_a8(const linear_args *a, float *buffer);
int64_t run_vnni_a16(const linear_args *a, float *buffer);
int64_t run_vnni256_a8(const linear_args *a, float *buffer);
int64_t run_avxvnni_a8(const linear_args *a, float *buffer);
int64_t run_amx_a8(const linear_args *a, float *buffer);
int prepare_row_a8(const linear_args *a, int kind, int64_t m, float *ALLMPNET_RESTRICT buffer);  // linear_vnni.cpp

// ---------------------------------------------------------------- attention heads (attention_*.c)
// One head of one block of T tokens: qkv, out at the head's first column, row0 the block's first row; query row
// i's bias at bias + i x bias_step (bias_step T for an (H, T, T) bias, -1 for a table by distance).
void attend_head_fp32(const void *qkv, int bf16, void *out, const float *bias, int64_t bias_step, float scale,
                      int64_t row0, int64_t T, int64_t C, float *work);
void attend_head_bf16(const uint16_t *qkv, uint16_t *out, const float *bias, int64_t bias_step, float scale,
                      int64_t row0, int64_t T, int64_t C, float *work);
void attend_head_amx(const uint16_t *qkv, uint16_t *out, const float *bias, int64_t bias_step, float scale,
                     int64_t row0, int64_t T, int64_t C, float *work);
void amx_attention_tiles(int on);  // configure the tiles for attend_head_amx (1) or release them (0)
int products_for(int bf16, int products, int64_t T);
// The fused encoder's attention: every (text, head) of the batch by the team, tasks to whichever thread is free
void heads_by_team(const void *qkv, void *out, int bf16, int shorter, int longer, int64_t C, int64_t H,
                   int64_t texts, const int32_t *start, const int32_t *length, const float *bias_table, int64_t span,
                   float *work);
void attention_by_team(const void *qkv, void *out, int bf16, int64_t C, int64_t H, int64_t texts,
                       const int32_t *start, const int32_t *length, const float *bias_table, int64_t span,
                       float *sums);
// The relative position bias of head h for query row 0 of a text: row i's starts i entries before it (step -1),
// the bias depending on j - i alone; bias_table (H, 2 span - 1), entry span - 1 + j - i.
static inline const float *bias_rows(const float *bias_table, int64_t span, int64_t h) {
    return bias_table + h * (2 * span - 1) + span - 1;
}

// ---------------------------------------------------------------- the rest of the fused encoder (encoder_avx2.c)
void layer_norm_by_team(float *x, int64_t M, int64_t C, const float *weight, const float *bias, float eps);
void embed_by_team(const x86_embedding_spec *e, const int32_t *ids, float *x, int64_t C, int64_t texts,
                   const int32_t *start, const int32_t *length);
void pool_by_team(const float *x, int64_t C, int64_t texts, const int32_t *start, const int32_t *length,
                  int normalize, float *out, int64_t *bad);
void layer_norm_rows_bf16(const uint16_t *x, uint16_t *y, const float *weight, const float *bias, float eps,
                          int64_t M, int64_t C, int threads);  // layer_norm_avx512_bf16.c

// ---------------------------------------------------------------- AMX-bf16 (amx_bf16.c)
int amx_bf16_linear(const uint16_t *x, const int8_t *packed, const float *scales, int64_t group, const float *bias,
                    const uint16_t *residual, uint16_t *y, int64_t M, int64_t N, int64_t K, int gelu, int threads);
void amx_short_attention(const uint16_t *qkv, uint16_t *out, const float *bias, float scale, int64_t start,
                         int64_t blocks, int64_t T, int64_t H, int64_t D, int threads);

#ifdef __cplusplus
}
#endif

// ---------------------------------------------------------------- scalar helpers, vectorised by each file's ISA

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
// (absolute error < 3e-7): fewer cycles in an epilogue than 7.1.26, whose exponential needs another polynomial
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
#endif

// Attention's dispatch (built for any x86-64): softmax(q k^T * scale + bias) v per block (or text) and head of
// ATTENTION_D, each head computed whole by one thread, on the products the caller asks for as far as the CPU and
// the block's length go: fp32 FMAs (attention_avx512.c), AVX512-BF16 pair dot products (attention_bf16.c, twice the
// FMA rate) or the AMX-bf16 tiles (attention_amx.c, blocks of AMX_MIN_TOKENS and more). Why ours: torch's SDPA ran
// this model's bf16 attention at ~70-90 GFLOP/s on 2 Zen 4 cores, a quarter of a 256-token passage's time.
#include <immintrin.h>
#include <omp.h>

#include "internal.h"

#if !ALLMPNET_HAVE_AMX  // a build without the tiles: products_for never gives 2, so these are never called
void attend_head_amx(const uint16_t *qkv, uint16_t *out, const float *bias, int64_t bias_step, float scale,
                     int64_t row0, int64_t T, int64_t C, float *work) {}
void amx_attention_tiles(int on) {}
#endif

// Bytes of scratch allmpnet_x86_attention needs for blocks of T tokens: the larger of the register path's (keys
// D x padded, values padded x D, scores, queries, fp32) and the AMX path's (attend_head_amx; keys padded to 32).
ALLMPNET_API int64_t allmpnet_x86_attention_scratch_bytes(int64_t T, int threads) {
    const int64_t padded = (T + 15) / 16 * 16, padded32 = (T + 31) / 32 * 32;
    const int64_t registers = (2 * ATTENTION_D * padded + ATTENTION_ROWS * padded + ATTENTION_ROWS * ATTENTION_D) * 4;
    // keys, values and queries in bf16; scores fp32 and two bf16 parts of the weights per tile of rows; its sums
    const int64_t tiles = 3 * padded32 * ATTENTION_D * 2 + TILE_ROWS * padded32 * (4 + 2 + 2)
                          + TILE_ROWS * ATTENTION_D * 4;
    return (int64_t)(threads < 1 ? 1 : threads) * (registers > tiles ? registers : tiles);
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
int products_for(int bf16, int products, int64_t T) {
    if (!bf16 || products < 0) products = 0;
    if (products >= 2 && !(ALLMPNET_HAVE_AMX && allmpnet_x86_kernel_supported(KERNEL_AVX512_BF16)
                           && amx_ready(AMX_BF16_BIT)))
        products = 1;
    // below a tile of keys the tiles idle; on these CPUs the pair products run no faster than fp32 FMAs
    else if (products >= 2 && T < AMX_MIN_TOKENS) products = 0;
    if (products >= 1 && !allmpnet_x86_kernel_supported(KERNEL_AVX512_BF16)) products = 0;
    return products;
}

// products: 0 fp32 FMAs, 1 AVX512-BF16 pair dot products, 2 AMX-bf16 tiles: the caller's choice for bf16 q|k|v,
// taken as far as the CPU goes (fp32 q|k|v: always 0). Returns the products used (0-2); -1 for a bad shape
// (nothing computed); -2 without AVX512.
ALLMPNET_API int64_t allmpnet_x86_attention(const void *qkv, int bf16, void *out, const float *bias, float scale, int64_t start,
                               int64_t blocks, int64_t T, int64_t H, int products, void *scratch, int threads) {
    if (!allmpnet_x86_kernel_supported(KERNEL_AVX512_F32)) return -2;
    if (T < 1 || H < 1 || blocks < 0 || start < 0) return -1;
    const int64_t C = H * ATTENTION_D, per_thread = allmpnet_x86_attention_scratch_bytes(T, 1) / 4;
    products = products_for(bf16, products, T);
    if (threads < 1) threads = 1;
    _Pragma("omp parallel num_threads(threads)")
    {
        // keys that score far below a row's best weigh exp(-87) (~1e-38): products of that underflow to denormals,
        // which Intel cores compute in microcode assists (a block of 3 side-by-side sentences took 15x as long).
        // Flushed to zero instead (FTZ, DAZ), this thread's setting restored after.
        const unsigned int control = _mm_getcsr();
        _mm_setcsr(control | 0x8040);
        if (products == 2) amx_attention_tiles(1);
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
        if (products == 2) amx_attention_tiles(0);
        _mm_setcsr(control);
    }
    return products;
}

// AMX-bf16 attention over blocks of at most 32 tokens (amx_bf16.c): -2 where this CPU lacks AMX-bf16 or refused the
// tile state
ALLMPNET_API int allmpnet_amx_short_attention(const uint16_t *qkv, uint16_t *out, const float *bias, float scale,
                                              int64_t start, int64_t blocks, int64_t T, int64_t H, int64_t D,
                                              int threads) {
#if ALLMPNET_HAVE_AMX
    if (!allmpnet_x86_kernel_supported(KERNEL_AVX512_BF16) || !amx_ready(AMX_BF16_BIT)) return -2;
    amx_short_attention(qkv, out, bias, scale, start, blocks, T, H, D, threads);
    return 0;
#else
    return -2;
#endif
}

// The same for heads of ATTENTION_D with AVX512 (attend_head_*, half the time of the above on an 11-token query),
// q|k|v and out fp32 or bf16; a bf16 text of T tokens on products_for(1, products, T), taken here as `shorter`
// below AMX_MIN_TOKENS and `longer` from there (products_for asks the CPU, which a VM may trap). work: this
// thread's allmpnet_x86_attention_scratch_bytes(longest text, 1).
void heads_by_team(const void *qkv, void *out, int bf16, int shorter, int longer, int64_t C, int64_t H,
                   int64_t texts, const int32_t *start, const int32_t *length, const float *bias_table, int64_t span,
                   float *work) {
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
            if (!tiles) amx_attention_tiles(1);
            tiles = 1;
            attend_head_amx((const uint16_t *)in, (uint16_t *)to, bias, -1, scale, start[t], L, C, work);
        } else if (products == 1) {
            attend_head_bf16((const uint16_t *)in, (uint16_t *)to, bias, -1, scale, start[t], L, C, work);
        } else {
            attend_head_fp32(in, bf16, to, bias, -1, scale, start[t], L, C, work);
        }
    }
    if (tiles) amx_attention_tiles(0);
    _Pragma("omp barrier")
}


// The whole forward pass of a batch in one call (built for any x86-64; its steps run in the files built for their
// instruction sets).
#include <immintrin.h>
#include <omp.h>

#include "internal.h"

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

static int spec_kernel(const x86_linear_spec *s, int64_t M) { return M > s->small_rows ? s->large_kernel : s->kernel; }

// y = act(x W^T + b) [+ residual] for the M rows, by the team (no barrier at the end); residual has y's dtype.
// Returns the rows routed to int16.
static int64_t run_spec(const x86_linear_spec *s, const void *x, int x_bf16, const void *residual, void *y,
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
// (backends/cpu/pages.py) 48 KB and the whole share alike. 128 KB: well inside any L2 (512 KB on Zen 2/3).
#define REQUEST_AHEAD (8 * PREFETCH)
static void request_linear(const x86_linear_spec *s) {
    const int64_t size = s->kernel == KERNEL_AVX512_F32W || s->kernel == KERNEL_AVX2_F32W ? 4 : 1;
    request_share(s->packed, s->K * NB * size, (s->N + NB - 1) / NB, REQUEST_AHEAD);
}

// Bytes of scratch allmpnet_x86_encoder needs for M rows, hidden size C, intermediate size I, texts of at most
// `longest` tokens.
ALLMPNET_API int64_t allmpnet_x86_encoder_scratch_bytes(int64_t M, int64_t C, int64_t I, int64_t longest, int threads) {
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
// holds NaN or inf; -1 or -2 as allmpnet_x86_linear for a layer it refuses (nothing computed), -2 also without
// AVX2; -3 for texts out of range, -4 for token ids or positions outside the embedding tables.
ALLMPNET_API int64_t allmpnet_x86_encoder(const x86_layer_spec *layers, int64_t count, const x86_embedding_spec *embedding,
                             const int32_t *ids, float *x, int64_t M, int64_t C, int64_t H, int64_t texts,
                             const int32_t *start, const int32_t *length, const float *bias_table, int64_t span,
                             float eps, int bf16, int products, float *pooled, int normalize, int64_t *routed,
                             void *scratch, int threads) {
    if (!allmpnet_x86_kernel_supported(KERNEL_AVX2_F32)) return -2;  // its own steps are AVX2 code
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
            int64_t n = run_spec(&layer->qkv, x, 0, NULL, wide, bf16, M, at, buffer);
            if (lead && routed) routed[4 * l] = n;
            request_linear(&layer->o);  // each thread's share of the next projection, as its part of this one ends
            _Pragma("omp barrier")
            if (heads_kernel)
                heads_by_team(wide, attended, bf16, shorter, longer, C, H, texts, start, length, bias_table, span,
                              work);
            else
                attention_by_team(wide, attended, bf16, C, H, texts, start, length, bias_table, span, buffer);
            n = run_spec(&layer->o, attended, bf16, x, mixed, 0, M, at, buffer);
            if (lead && routed) routed[4 * l + 1] = n;
            request_linear(&layer->up);
            _Pragma("omp barrier")
            layer_norm_by_team(mixed, M, C, layer->norm1_weight, layer->norm1_bias, eps);
            n = run_spec(&layer->up, mixed, 0, NULL, wide, bf16, M, at, buffer);
            if (lead && routed) routed[4 * l + 2] = n;
            request_linear(&layer->down);
            _Pragma("omp barrier")
            n = run_spec(&layer->down, wide, bf16, mixed, x, 0, M, at, buffer);
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


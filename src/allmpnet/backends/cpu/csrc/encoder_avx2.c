// The fused encoder's portable steps (built with -mavx2 -mfma; called only where the CPU has both): the
// embeddings, LayerNorms and pooling of the residual stream, and the attention of heads of any size.
#include <omp.h>

#include "internal.h"

// Rows [0, M) of x: LayerNorm over C in place, by the team.
void layer_norm_by_team(float *x, int64_t M, int64_t C, const float *weight,
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

static inline __attribute__((always_inline)) float element(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_load((const uint16_t *)p + i) : ((const float *)p)[i];
}

// softmax(q k^T / sqrt(D) + bias) v per text and head, from qkv (M, 3C) into out (M, C), both fp32 or both bf16
// (`bf16`), heads of any size (D <= K), by the team (tasks to whichever thread is free: texts of different
// lengths differ in cost; each is computed whole by one thread); sums: this thread's row of K floats.
void attention_by_team(const void *qkv, void *out, int bf16, int64_t C, int64_t H, int64_t texts, const int32_t *start,
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

// Rows of the texts from their token ids: the embeddings, by the team (then LayerNorm).
void embed_by_team(const x86_embedding_spec *e, const int32_t *ids, float *x,
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
void pool_by_team(const float *x, int64_t C, int64_t texts,
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


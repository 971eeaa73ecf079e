// Attention heads on the AMX-bf16 tiles (built with AVX-512, -mavx512bf16, -mamx-tile, -mamx-bf16).
#include "amx_tiles.h"
#include "attention_bf16.h"

// The same as attend_head_bf16 on the AMX-bf16 tiles (Sapphire Rapids on), where its pair dot products cost as
// much as fp32 FMAs: 16 query rows at a time, their scores as 16 x 16 tiles (q rows x key pairs), the softmax of
// the rows in AVX-512 (exponentiate_two_bf16), then the weights x values as 4 tiles of 16 outputs per part.
// Keys and values are staged as the pair products read them (stage_pairs: both already B tiles), queries copied
// into rows padded with zeros; keys are padded to 32 (one A tile row of weights), the padding weighted 0 with zero
// values. Tiles (configure_tiles(16, 16)): 0, 1 = A, 2, 3 = B, 4-7 = sums (scores in 4 and 5).
void attend_head_amx(
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

// The tiles as attend_head_amx uses them (configure_tiles(16, 16)), or released
void amx_attention_tiles(int on) {
    if (on)
        configure_tiles(16, 16);
    else
        release_tiles();
}

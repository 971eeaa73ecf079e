// A8 on AMX-int8 tiles (Sapphire Rapids on; built with AVX-512, -mavx512vnni, -mamx-tile, -mamx-int8): vnni-a8's
// rows (the same prepared activations, scales, compensation and kept-aside entries) for large batches, one
// tdpbusd multiplying 16 rows x 64 inputs by 64 inputs x 16 outputs. The packed weights are already in the B
// tiles' layout: the 16 outputs of a tile are 64 bytes of a step's 256, one step (4 inputs) per tile row. Per chunk
// of 32 rows and output block, each group's int32 sums go through the tiles' memory into the fp32 sums at the
// group's end (as the VNNI kernel's registers do): outputs equal to vnni-a8's. Rows routed to int16 are computed on
// the tiles too (their bytes are stale), dropped, and run by the VNNI int16 micro-kernel.
#include "amx_tiles.h"
#include "linear_kernels.hpp"

namespace {

// Rows [m0, m0 + rows) of the prepared activations x output block nb -> tile (rows x 64 fp32 sums, from the
// compensation on). The tiles are configured for `rows` (configure_tiles).
void amx_a8_chunk(const linear_args *a, int64_t nb, int64_t m0, int rows, float tile[][NB]) {
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

}  // namespace

int64_t run_amx_a8(const linear_args *a, float *buffer) {
    const int64_t M = a->M, blocks = (a->N + NB - 1) / NB;
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
    float tiles[1][MR][NB] __attribute__((aligned(64)));  // the routed rows' (chunk_by_chunk)
    int32_t out[AMX_ROWS];
    int configured = -1;
    for (int64_t mb = 0; mb < M; mb += MB) {
        const int64_t mb_end = mb + MB < M ? mb + MB : M;
        // dynamic: threads may run the tiles at different rates (an SMT sibling sharing the core's AMX unit
        // halves a vCPU's), and a static split of the output blocks left the faster one waiting
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
            if (mb == 0) chunk_by_chunk<VnniA16>(a, a->act16, a->order, primary, M, nb, tiles);
        }
    }
    if (configured >= 0) _tile_release();
    return routed;
}

// How a linear layer's rows go through a kernel's micro-kernels, the same for every instruction set: a template
// each linear_<isa>.cpp instantiates with its own kernels (internal linkage: every file keeps its own copy, built
// for its own instructions).
//
// A kernel is a struct with
//   T                       its activations' element type;  kind: their ACT_* form
//   from_compensation       whether its sums start at the compensation (int8 activations) or at zero
//   multiply<R>(x, span, panel, scales, start, group, tile, accumulate)
//                           R rows x 64 outputs over `span` inputs, into fp32 sums tile[R][64] (added to when
//                           `accumulate`, else written by the first group); x: the chunk's rows (a chunk of fewer
//                           than R repeats its first row: computed, never stored)
//   prepare(a, kind, m, buffer)   row m of x into the activation form (1: the row was routed to int16)
// and `Routed` (the int16 kernel that takes an int8 kernel's routed rows; for the other kernels itself).
#ifndef ALLMPNET_LINEAR_DRIVER_HPP
#define ALLMPNET_LINEAR_DRIVER_HPP
#include <immintrin.h>
#include <omp.h>

#include "linear_rows.h"

namespace {

// Chunks of MR rows of list[from, to) through kernel K (activations `act`), over inputs [k0, k0 + span) of output
// block nb; chunk c's sums go to tiles[c].
template <class K>
inline void multiply_chunks(const linear_args *a, const void *act, const int32_t *list, int64_t from, int64_t to,
                            int64_t nb, int64_t k0, int64_t span, float (*tiles)[MR][NB], int accumulate) {
    const int64_t Kd = a->K;
    for (int64_t c0 = from; c0 < to; c0 += MR) {
        const int rows = (int)(to - c0 < MR ? to - c0 : MR);
        const typename K::T *x[MR];
        for (int m = 0; m < MR; m++) x[m] = (const typename K::T *)act + (int64_t)list[c0 + (m < rows ? m : 0)] * Kd + k0;
        const int8_t *panel = a->packed + (nb * Kd + k0) * NB;
        const float *scales = a->scales + (nb * (Kd / a->group) + k0 / a->group) * NB;
        const float *start = K::from_compensation ? a->compensation + nb * NB : nullptr;
        float(*tile)[NB] = tiles[(c0 - from) / MR];
        if (rows > 4)
            K::template multiply<6>(x, span, panel, scales, start, a->group, tile, accumulate);
        else if (rows > 2)
            K::template multiply<4>(x, span, panel, scales, start, a->group, tile, accumulate);
        else
            K::template multiply<2>(x, span, panel, scales, start, a->group, tile, accumulate);
    }
}

inline void finish_chunks(const linear_args *a, const int32_t *list, int64_t from, int64_t to, int64_t nb,
                          float (*tiles)[MR][NB]) {
    for (int64_t c0 = from; c0 < to; c0 += MR)
        finish_rows(a, list + c0, (int)(to - c0 < MR ? to - c0 : MR), nb, tiles[(c0 - from) / MR]);
}

// Rows list[from, to) against output block nb one chunk at a time, each over all of K.
template <class K>
inline void chunk_by_chunk(const linear_args *a, const void *act, const int32_t *list, int64_t from, int64_t to,
                           int64_t nb, float (*tiles)[MR][NB]) {
    for (int64_t c1 = from; c1 < to; c1 += MR) {
        const int64_t c2 = c1 + MR < to ? c1 + MR : to;
        claim_rows(a, list + c1, (int)(c2 - c1), nb);
        multiply_chunks<K>(a, act, list, c1, c2, nb, 0, a->K, tiles, 0);
        finish_chunks(a, list, c1, c2, nb, tiles);
    }
}

// The rows' activations in the int16 form (act16) for an int8 kernel's routed rows, else the kernel's own
template <class K>
inline const void *routed_activations(const linear_args *a) {
    return K::kind == ACT_U8 ? (const void *)a->act16 : a->act;
}

// One layer by the calling team: prepare the rows, list them (the kernel's rows first, then any routed to int16),
// multiply. Output blocks are shared between the threads. A batch of at most SMALL_CHUNKS chunks (a query) goes
// through each block one group of inputs at a time, every chunk's sums in turn, so the block's weights are read
// from memory once, at the pace of all the rows' arithmetic; its blocks are split statically (the split
// request_share prefetches). Larger batches take blocks of MB rows, whose prepared activations stay in L2, and
// within them chunk after chunk; their blocks go to whichever thread is free (a vCPU slowed by a busy SMT
// sibling otherwise holds the other up at the layer's end). The routed rows run right after the first block's,
// while the weights are still in cache.
template <class K>
inline int64_t drive(const linear_args *a, float *buffer) {
    using R = typename K::Routed;
    const int64_t M = a->M, Kd = a->K, blocks = (a->N + NB - 1) / NB;
    if (M <= SMALL_CHUNKS * MR) request_share(a->packed, Kd * NB, blocks, PREFETCH);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) a->routed[m] = K::prepare(a, K::kind, m, buffer);
    int64_t routed = 0;
    for (int64_t m = 0; m < M; m++) routed += a->routed[m];
    const int64_t primary = M - routed;
#pragma omp single
    {
        int64_t first = 0, second = primary;  // the kernel's rows keep their order, then the routed ones
        for (int64_t m = 0; m < M; m++) a->order[a->routed[m] ? second++ : first++] = (int32_t)m;
    }
    const void *act = a->act, *routed_act = routed_activations<K>(a);
    float tiles[SMALL_CHUNKS][MR][NB] __attribute__((aligned(64)));
    const int64_t chunks = (primary + MR - 1) / MR;
    if (chunks + (routed + MR - 1) / MR <= SMALL_CHUNKS) {
#pragma omp for schedule(static) nowait
        for (int64_t nb = 0; nb < blocks; nb++) {
            for (int64_t k0 = 0; k0 < Kd; k0 += a->group) {
                multiply_chunks<K>(a, act, a->order, 0, primary, nb, k0, a->group, tiles, k0 > 0);
                multiply_chunks<R>(a, routed_act, a->order, primary, M, nb, k0, a->group, tiles + chunks, k0 > 0);
            }
            finish_chunks(a, a->order, 0, primary, nb, tiles);
            finish_chunks(a, a->order, primary, M, nb, tiles + chunks);
        }
        return routed;
    }
    for (int64_t mb = 0; mb < primary; mb += MB) {
        const int64_t mb_end = mb + MB < primary ? mb + MB : primary;
#pragma omp for schedule(dynamic) nowait
        for (int64_t nb = 0; nb < blocks; nb++) {
            chunk_by_chunk<K>(a, act, a->order, mb, mb_end, nb, tiles);
            if (mb == 0) chunk_by_chunk<R>(a, routed_act, a->order, primary, M, nb, tiles);
        }
    }
    if (primary == 0) {
#pragma omp for schedule(static) nowait
        for (int64_t nb = 0; nb < blocks; nb++) chunk_by_chunk<R>(a, routed_act, a->order, primary, M, nb, tiles);
    }
    return routed;
}

// F32W: the model's own fp32 weights, (N, K) row-major (`packed` points at them; scales and groups unused): no
// copy, exact fp32 up to the order of the sums; the fused encoder's fp32 path, for a few rows, where a query is
// the weights' 340 MB streamed once. Per output block of 64, micro-kernels of a chunk's rows x OUT outputs over
// all of K (W::multiply<R>(x, K, w, tile, j): outputs j..j+OUT of the block), every chunk in turn before the
// next outputs, whose weight rows stay in L1/L2 meanwhile.
template <class W>
inline int64_t drive_f32w(const linear_args *a, float *buffer) {
    const int64_t M = a->M, Kd = a->K, blocks = (a->N + NB - 1) / NB;
    const float *weight = (const float *)a->packed;
    request_share(weight, Kd * NB * 4, blocks, PREFETCH);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        prepare_row(a, ACT_F32, m, buffer);
        a->order[m] = (int32_t)m;
    }
    float tiles[W_CHUNKS][MR][NB] __attribute__((aligned(64)));
#pragma omp for schedule(static) nowait
    for (int64_t nb = 0; nb < blocks; nb++) {
        const int width = a->N - nb * NB < NB ? (int)(a->N - nb * NB) : NB;
        for (int64_t g0 = 0; g0 < M; g0 += W_CHUNKS * MR) {
            const int64_t g1 = g0 + W_CHUNKS * MR < M ? g0 + W_CHUNKS * MR : M;
            for (int j = 0; j < width; j += W::out) {
                const float *w = weight + (nb * NB + j) * Kd;
                for (int64_t c0 = g0; c0 < g1; c0 += MR) {
                    const int rows = (int)(g1 - c0 < MR ? g1 - c0 : MR);
                    const float *x[MR];
                    for (int m = 0; m < MR; m++) x[m] = (const float *)a->act + (c0 + (m < rows ? m : 0)) * Kd;
                    float(*tile)[NB] = tiles[(c0 - g0) / MR];
                    if (rows > 4)
                        W::template multiply<6>(x, Kd, w, tile, j);
                    else if (rows > 2)
                        W::template multiply<4>(x, Kd, w, tile, j);
                    else
                        W::template multiply<2>(x, Kd, w, tile, j);
                }
            }
            finish_chunks(a, a->order, g0, g1, nb, tiles);
        }
    }
    return 0;
}

}  // namespace
#endif

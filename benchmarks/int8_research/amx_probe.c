// What the AMX-int8 unit does on this machine, apart from any kernel: TSC cycles per tdpbusd (16 rows x 16 outputs
// x 64 inputs) with the tiles already loaded, with one accumulator or four, and with the sums stored every two
// tdpbusd (a group of 128 inputs, as amx-a8 flushes them) as one set of 4 or as two sets taking turns. Run it with
// one thread, then with two (each measurement starts on both at once): a thread at half its lone rate shares its
// core's unit with an SMT sibling (on a VM: the other vCPU, or another guest's, from minute to minute):
//
//     gcc -O2 -march=native -fopenmp -I src/allmpnet/encode -o /tmp/amx_probe benchmarks/int8_research/amx_probe.c
//     OMP_PROC_BIND=true /tmp/amx_probe 1 && OMP_PROC_BIND=true /tmp/amx_probe 2
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "amx_tiles.h"


static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

// tdpbusd of A tiles 0, 1 and B tiles 2, 3 into sums tiles c00 (A0 B2), c01 (A0 B3), c10 (A1 B2), c11 (A1 B3)
#define PRODUCTS(c00, c01, c10, c11) \
    _tile_dpbusd(c00, 0, 2);         \
    _tile_dpbusd(c01, 0, 3);         \
    _tile_dpbusd(c10, 1, 2);         \
    _tile_dpbusd(c11, 1, 3);
// sums tiles a, b stored (to slots a - 4, b - 4) and zeroed, as a group's end does
#define FLUSH(a, b)                     \
    _tile_stored(a, sums[(a) - 4], 64); \
    _tile_stored(b, sums[(b) - 4], 64); \
    _tile_zero(a);                      \
    _tile_zero(b);

// TSC cycles per tdpbusd of `loop` run `n` times with `per_pass` tdpbusd each, started on every thread at once
#define TIMED(per_pass, loop)                                     \
    ({                                                            \
        _Pragma("omp barrier") const uint64_t tsc = __rdtsc();    \
        for (long i = 0; i < n; i++) { loop }                     \
        (double)(__rdtsc() - tsc) / ((double)(per_pass) * n);     \
    })

__attribute__((target("amx-tile,amx-int8"))) static void probe(int thread) {
    int32_t sums[4][256] __attribute__((aligned(64)));
    configure_tiles(16, 16);
    _tile_zero(0);  // the A and B tiles: any bytes do
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    const long n = 1000000;
    for (int round = 0; round < 4; round++) {
        const double start = seconds();
        const double four = TIMED(4, PRODUCTS(4, 5, 6, 7)), elapsed = seconds() - start;
        const double one = TIMED(4, PRODUCTS(4, 4, 4, 4));
        const double stored = TIMED(8, PRODUCTS(4, 5, 6, 7) PRODUCTS(4, 5, 6, 7) FLUSH(4, 5) FLUSH(6, 7));
        const double turns = TIMED(8, PRODUCTS(4, 5, 4, 5) FLUSH(6, 7) PRODUCTS(6, 7, 6, 7) FLUSH(4, 5));
        printf("thread %d: TSC cycles per tdpbusd: 4 accumulators %.1f (%.0f GOP/s), 1 accumulator %.1f, stored every "
               "2: %.1f, two sets taking turns %.1f\n",
               thread, four, 4.0 * n * 16 * 16 * 64 * 2 / elapsed / 1e9, one, stored, turns);
    }
    _tile_release();
}

int main(int argc, char **argv) {
    const int threads = argc > 1 ? atoi(argv[1]) : 1;
    if (request_amx_state() != 0) {  // for the whole process
        puts("no AMX tile state granted (no AMX, or an old kernel)");
        return 1;
    }
    _Pragma("omp parallel num_threads(threads)") probe(omp_get_thread_num());
    return 0;
}

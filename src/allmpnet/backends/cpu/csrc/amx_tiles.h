// AMX set-up shared by the files that use the tiles (linear_amx.cpp: int8; attention_amx.c, amx_bf16.c: bf16).
#ifndef ALLMPNET_AMX_TILES_H
#define ALLMPNET_AMX_TILES_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

// Linux hands out the AMX register state only on request (once per process; asking again is harmless). 0: granted.
static inline int request_amx_state(void) {
    return (int)syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */);
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_tile_config;

// The layout all three use, 2 x 2 tiles: 0, 1 = A rows 0-15 and 16-31 (rows0, rows1 of them: a chunk's last rows);
// 2, 3 = B, 16 outputs each; 4, 5 = sums of A0 B2, A0 B3; 6, 7 = sums of A1 B2, A1 B3. Rows of 64 bytes.
static inline __attribute__((target("amx-tile"))) void configure_tiles(int rows0, int rows1) {
    amx_tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    const int rows[8] = {rows0, rows1, 16, 16, rows0, rows0, rows1, rows1};
    for (int t = 0; t < 8; t++) {
        config.rows[t] = (uint8_t)rows[t];
        config.colsb[t] = rows[t] ? 64 : 0;
    }
    // GCC does not count ldtilecfg's read of `config` (its stores were dropped as dead where this function was not
    // inlined, and the instruction faulted on garbage): an empty asm that reads it keeps them
    __asm__ __volatile__("" : : "m"(config));
    _tile_loadconfig(&config);
}

static inline __attribute__((target("amx-tile"))) void release_tiles(void) { _tile_release(); }
#endif

// LayerNorm's dispatch (built for any x86-64).
#include "internal.h"

// Returns 0; -1 for C not a multiple of 16; -2 without AVX512-BF16.
ALLMPNET_API int64_t allmpnet_x86_layer_norm(const uint16_t *x, uint16_t *y, const float *weight, const float *bias,
                                             float eps, int64_t M, int64_t C, int threads) {
    if (!allmpnet_x86_kernel_supported(KERNEL_AVX512_BF16)) return -2;
    if (C < 16 || C % 16 || M < 0) return -1;
    layer_norm_rows_bf16(x, y, weight, bias, eps, M, C, threads);
    return 0;
}

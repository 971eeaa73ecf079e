// Linear layers' dispatch (built for any x86-64: it decides what runs): which kernels this CPU runs, each call's
// scratch, and the call into the instruction set's driver (linear_<isa>.cpp), made only where the CPU has it.
#include <cpuid.h>
#include <omp.h>
#include <stdio.h>

#include "amx_tiles.h"
#include "internal.h"

int int8_activations(int kernel) {
    return kernel == KERNEL_VNNI_A8 || kernel == KERNEL_AVXVNNI_A8 || kernel == KERNEL_VNNI256_A8
           || kernel == KERNEL_AMX_A8;
}

int avx2_kernel(int kernel) {
    return kernel == KERNEL_AVX2_F32 || kernel == KERNEL_AVX2_A16 || kernel == KERNEL_AVX2_F32W
           || kernel == KERNEL_AVXVNNI_A8;
}

int activation_kind(int kernel) {
    switch (kernel) {
        case KERNEL_AVX2_F32: case KERNEL_AVX512_F32: case KERNEL_AVX512_F32W: case KERNEL_AVX2_F32W: return ACT_F32;
        case KERNEL_AVX512_BF16: return ACT_BF16;
        case KERNEL_AVX2_A16: case KERNEL_AVX512_A16: case KERNEL_VNNI_A16: return ACT_I16;
        default: return ACT_U8;
    }
}

#define AMX_TILE_BIT 24  // CPUID leaf 7, EDX: the tiles themselves (AMX_INT8_BIT, AMX_BF16_BIT: their products)

// AMX-TILE and the products of `bit`, and the tile state granted to this process (Linux hands it out on request
// only; asking again is harmless)
int amx_ready(int bit) {
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << AMX_TILE_BIT)) || !(edx & (1u << bit)))
        return 0;
    return request_amx_state() == 0;
}

// The caller passes what it read from the CPU's flags; this second check keeps a wrong caller from crashing the
// process with an illegal instruction.
ALLMPNET_API int allmpnet_x86_kernel_supported(int kernel) {
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
                       && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    switch (kernel) {
        case KERNEL_AVX2_F32: case KERNEL_AVX2_A16: case KERNEL_AVX2_F32W: return avx2;
        case KERNEL_AVX512_F32: case KERNEL_AVX512_A16: case KERNEL_AVX512_F32W: return avx512;
        case KERNEL_AVX512_BF16: return avx512 && __builtin_cpu_supports("avx512bf16");
        case KERNEL_VNNI_A16: case KERNEL_VNNI_A8: case KERNEL_VNNI256_A8:
            return avx512 && __builtin_cpu_supports("avx512vnni");
#if ALLMPNET_HAVE_AMX  // built where the compiler knows AMX (GCC 11+, clang 12+)
        case KERNEL_AMX_A8: return avx512 && __builtin_cpu_supports("avx512vnni") && amx_ready(AMX_INT8_BIT);
#endif
#if ALLMPNET_HAVE_AVXVNNI  // built where the compiler knows AVX-VNNI (GCC 11+, clang 12+)
        case KERNEL_AVXVNNI_A8: return avx2 && __builtin_cpu_supports("avxvnni");
#endif
        default: return 0;
    }
}

int64_t linear_by_team(int kernel, const linear_args *a, float *buffer) {
    switch (kernel) {
        case KERNEL_AVX512_F32W: return run_avx512_f32w(a, buffer);
        case KERNEL_AVX2_F32W: return run_avx2_f32w(a, buffer);
        case KERNEL_VNNI_A8: return run_vnni_a8(a, buffer);
        case KERNEL_VNNI256_A8: return run_vnni256_a8(a, buffer);
#if ALLMPNET_HAVE_AMX
        case KERNEL_AMX_A8: return run_amx_a8(a, buffer);
#endif
#if ALLMPNET_HAVE_AVXVNNI
        case KERNEL_AVXVNNI_A8: return run_avxvnni_a8(a, buffer);
#endif
        case KERNEL_VNNI_A16: return run_vnni_a16(a, buffer);
        case KERNEL_AVX512_A16: return run_avx512_a16(a, buffer);
        case KERNEL_AVX512_BF16: return run_avx512_bf16(a, buffer);
        case KERNEL_AVX512_F32: return run_avx512_f32(a, buffer);
        case KERNEL_AVX2_A16: return run_avx2_a16(a, buffer);
        default: return run_avx2_f32(a, buffer);
    }
}

// A few rows stream the weights from memory, each thread its share of the output blocks (the static schedule of
// the drivers' small batches): the first `bytes` of its share (blocks of block_bytes) requested into L2 ahead of
// the rows' preparation (or earlier: the fused encoder's request_linear), rather than when the micro-kernel's own
// requests start. By the calling team.
void request_share(const void *weights, int64_t block_bytes, int64_t blocks, int64_t bytes) {
    int64_t first = -1, mine = 0;
    _Pragma("omp for schedule(static) nowait") for (int64_t nb = 0; nb < blocks; nb++) {
        first = first < 0 ? nb : first;
        mine++;
    }
    if (bytes > mine * block_bytes) bytes = mine * block_bytes;  // this thread's blocks only
    for (int64_t line = 0; line < bytes; line += 64)
        _mm_prefetch((const char *)weights + first * block_bytes + line, PREFETCH_HINT);
}

static const int act_size[] = {[ACT_F32] = 4, [ACT_BF16] = 2, [ACT_I16] = 2, [ACT_U8] = 1};


// Scratch of one linear layer but the threads' rows: the prepared activations (and, for the int8 kernel, int16
// ones for routed rows and the entries split rows keep aside), row scales, row order and routing flags.
static int64_t linear_scratch_bytes(int kernel, int64_t M, int64_t K) {
    const int64_t spiky =
        int8_activations(kernel) ? aligned(M * K * 2) + aligned(M * 4) + 2 * aligned(M * MAX_SPLIT * 4) : 0;
    return aligned(M * K * act_size[activation_kind(kernel)]) + spiky + 3 * aligned(M * 4);
}

// The most linear_scratch_bytes any kernel takes.
int64_t widest_linear_scratch_bytes(int64_t M, int64_t K) {
    int64_t most = 0;
    for (int kernel = KERNEL_AVX2_F32; kernel <= KERNEL_LAST; kernel++) {
        const int64_t bytes = linear_scratch_bytes(kernel, M, K);
        most = bytes > most ? bytes : most;
    }
    return most;
}

// Bytes of scratch allmpnet_x86_linear needs: the layer's, and a row of fp32 per thread.
ALLMPNET_API int64_t allmpnet_x86_scratch_bytes(int kernel, int64_t M, int64_t K, int threads) {
    return linear_scratch_bytes(kernel, M, K) + (int64_t)(threads < 1 ? 1 : threads) * K * 4;
}

// 0 when the kernel takes this layer (see allmpnet_x86_linear's return values), else -1 or -2.
int64_t check_linear(int kernel, const float *compensation, int64_t group, int64_t M, int64_t N,
                            int64_t K, float route) {
    if (!allmpnet_x86_kernel_supported(kernel)) return -2;
    const int a8 = int8_activations(kernel);
    if (N <= 0 || K <= 0 || group <= 0 || group % 4 || K % group || M < 0
        || ((activation_kind(kernel) == ACT_I16 || (a8 && route > 0.0f)) && group > 512) || (a8 && !compensation))
        return -1;
    if (kernel == KERNEL_AMX_A8 && group % AMX_STEP) return -1;  // a tile row is 64 inputs of one group
    if ((kernel == KERNEL_AVX512_F32W && (K % 16 || N % 4)) || (kernel == KERNEL_AVX2_F32W && (K % 8 || N % 4)))
        return -1;
    return 0;
}

// The layer's per-call arrays laid out in scratch (linear_scratch_bytes of it).
void place_scratch(linear_args *a, int kernel, char *at) {
    const int kind = activation_kind(kernel);
    a->act = at;
    at += aligned(a->M * a->K * act_size[kind]);
    a->act16 = NULL;
    a->split_count = a->split_index = NULL;
    a->split_value = NULL;
    if (int8_activations(kernel)) {
        a->act16 = (int16_t *)at;
        at += aligned(a->M * a->K * 2);
        a->split_count = (int32_t *)at;
        at += aligned(a->M * 4);
        a->split_index = (int32_t *)at;
        at += aligned(a->M * MAX_SPLIT * 4);
        a->split_value = (float *)at;
        at += aligned(a->M * MAX_SPLIT * 4);
    }
    a->row_scale = (float *)at;
    at += aligned(a->M * 4);
    a->order = (int32_t *)at;
    at += aligned(a->M * 4);
    a->routed = (int32_t *)at;
    if (kind == ACT_F32 || kind == ACT_BF16) a->row_scale = NULL;  // finish_rows: no per-row scale
}

// Arrays as described at the top, N padded to whole blocks of 64 in packed, scales and compensation (zeros);
// x (M, K), residual and y (M, N); bias (N,) or NULL; smooth (K,) or NULL: x is multiplied by it first;
// route (int8 kernel; 0: off): rows whose largest |x| exceeds route x their root mean square (a per-token scale
// set by one huge value leaves the row's other values a few levels) keep their few largest entries aside, exact,
// or, with more than MAX_SPLIT of them, run with int16 activations instead (see SPLIT_SHARE);
// scratch: allmpnet_x86_scratch_bytes, 64-byte aligned.
// Returns the number of rows routed to int16 (>= 0); -1 for shapes the kernels do not handle (K % group,
// group % 4, or group > 512 for int16 activations: a group's int32 sums must stay below 2^31; the int8 kernel's
// stay below 2^31 for K < 16k); -2 when this CPU lacks the kernel's instructions.
ALLMPNET_API int64_t allmpnet_x86_linear(int kernel, const void *x, int x_bf16, const float *smooth, const int8_t *packed,
                            const float *scales, const float *compensation, int64_t group, const float *bias,
                            const void *residual, void *y, int y_bf16, int64_t M, int64_t N, int64_t K, int gelu,
                            float route, void *scratch, int threads) {
    const int64_t refused = check_linear(kernel, compensation, group, M, N, K, route);
    if (refused) return refused;
    if (M == 0) return 0;
    if (threads < 1) threads = 1;
    linear_args a = {x, x_bf16, smooth, packed, scales, compensation, group, bias, residual, y, y_bf16, M, N, K,
                     gelu, int8_activations(kernel) ? route : 0.0f};
    place_scratch(&a, kernel, (char *)scratch);
    float *buffers = (float *)((char *)scratch + linear_scratch_bytes(kernel, M, K));
    int64_t routed = 0;
    _Pragma("omp parallel num_threads(threads)") {
        const int64_t count = linear_by_team(kernel, &a, buffers + (int64_t)omp_get_thread_num() * K);
        if (omp_get_thread_num() == 0) routed = count;
    }
    return routed;
}

// AMX-bf16 weight-only linear layers (amx_bf16.c): -2 where this CPU lacks AMX-bf16 or refused the tile state
ALLMPNET_API int allmpnet_amx_bf16_linear(const uint16_t *x, const int8_t *packed, const float *scales, int64_t group,
                                          const float *bias, const uint16_t *residual, uint16_t *y, int64_t M,
                                          int64_t N, int64_t K, int gelu, int threads) {
#if ALLMPNET_HAVE_AMX
    if (!allmpnet_x86_kernel_supported(KERNEL_AVX512_BF16) || !amx_ready(AMX_BF16_BIT)) return -2;
    return amx_bf16_linear(x, packed, scales, group, bias, residual, y, M, N, K, gelu, threads);
#else
    return -2;
#endif
}

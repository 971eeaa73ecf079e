// Linear kernels for AVX2 CPUs (built with -mavx2 -mfma): int16 activations (vpmaddwd, twice the fp32 FMA rate),
// fp32 activations, and the fused encoder's fp32 weights.
#include "linear_kernels.hpp"

int64_t run_avx2_a16(const linear_args *a, float *buffer) { return drive<Avx2A16>(a, buffer); }
int64_t run_avx2_f32(const linear_args *a, float *buffer) { return drive<Avx2F32>(a, buffer); }
int64_t run_avx2_f32w(const linear_args *a, float *buffer) { return drive_f32w<Avx2F32W>(a, buffer); }

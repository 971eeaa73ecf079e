// Linear kernels for AVX-512 CPUs (built with -mavx512f/bw/vl/dq): int16 activations (vpmaddwd), fp32
// activations, and the fused encoder's fp32 weights.
#include "linear_kernels.hpp"

int64_t run_avx512_a16(const linear_args *a, float *buffer) { return drive<Avx512A16>(a, buffer); }
int64_t run_avx512_f32(const linear_args *a, float *buffer) { return drive<Avx512F32>(a, buffer); }
int64_t run_avx512_f32w(const linear_args *a, float *buffer) { return drive_f32w<Avx512F32W>(a, buffer); }

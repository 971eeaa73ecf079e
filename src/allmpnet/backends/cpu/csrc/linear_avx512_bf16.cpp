// Linear kernel with bf16 activations (AVX-512 and -mavx512bf16): vdpbf16ps on int8 weights widened to bf16
// (exact: |w| <= 127).
#include "linear_kernels.hpp"

int64_t run_avx512_bf16(const linear_args *a, float *buffer) { return drive<Avx512Bf16>(a, buffer); }

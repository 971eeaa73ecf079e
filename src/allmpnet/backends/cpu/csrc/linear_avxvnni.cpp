// A8 on AVX-VNNI (built with -mavx2 -mfma -mavxvnni): vpdpbusd's VEX form on 256-bit vectors, for AVX2 CPUs from
// Alder Lake and Sierra Forest on; outputs equal to vnni-a8's to the bit.
#include "linear_kernels.hpp"

int64_t run_avxvnni_a8(const linear_args *a, float *buffer) { return drive<A8x256<DPBUSD_VEX>>(a, buffer); }

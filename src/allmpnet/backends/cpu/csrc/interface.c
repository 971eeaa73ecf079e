// What this build of the library is, for the loader to check against its ctypes mirrors (library.py).
#include <stddef.h>
#include <stdio.h>

#include "allmpnet_cpu.h"

#ifndef ALLMPNET_SOURCE_DIGEST
#define ALLMPNET_SOURCE_DIGEST "unknown"  // build.py sets it: the sources this library was built from
#endif

#define FIELD(type, name) #type "." #name "=%zu;"
#define OFFSET(type, name) offsetof(type, name)

ALLMPNET_API const char *allmpnet_cpu_layout(void) {
    static char text[2048];
    if (!text[0]) {
        snprintf(text, sizeof text,
                 "version=%d;sources=%s;max_split=%d;split_share=%g;max_text=%d;head_dim=%d;"
                 "kernel.avx2-f32=%d;kernel.avx2-a16=%d;kernel.avx512-f32=%d;kernel.avx512-a16=%d;"
                 "kernel.avx512-bf16=%d;kernel.vnni-a16=%d;kernel.vnni-a8=%d;kernel.avx512-f32w=%d;"
                 "kernel.avx2-f32w=%d;kernel.avxvnni-a8=%d;kernel.vnni256-a8=%d;kernel.amx-a8=%d;"
                 "x86_linear_spec.size=%zu;" FIELD(x86_linear_spec, kernel) FIELD(x86_linear_spec, gelu)
                 FIELD(x86_linear_spec, large_kernel) FIELD(x86_linear_spec, small_rows)
                 FIELD(x86_linear_spec, packed) FIELD(x86_linear_spec, scales) FIELD(x86_linear_spec, compensation)
                 FIELD(x86_linear_spec, bias) FIELD(x86_linear_spec, smooth) FIELD(x86_linear_spec, group)
                 FIELD(x86_linear_spec, N) FIELD(x86_linear_spec, K) FIELD(x86_linear_spec, route)
                 "x86_layer_spec.size=%zu;" FIELD(x86_layer_spec, qkv) FIELD(x86_layer_spec, o)
                 FIELD(x86_layer_spec, up) FIELD(x86_layer_spec, down) FIELD(x86_layer_spec, norm1_weight)
                 FIELD(x86_layer_spec, norm1_bias) FIELD(x86_layer_spec, norm2_weight)
                 FIELD(x86_layer_spec, norm2_bias)
                 "x86_embedding_spec.size=%zu;" FIELD(x86_embedding_spec, word) FIELD(x86_embedding_spec, position)
                 FIELD(x86_embedding_spec, bf16) FIELD(x86_embedding_spec, vocab)
                 FIELD(x86_embedding_spec, positions) FIELD(x86_embedding_spec, offset)
                 FIELD(x86_embedding_spec, pad_id) FIELD(x86_embedding_spec, norm_weight)
                 FIELD(x86_embedding_spec, norm_bias),
                 ALLMPNET_CPU_INTERFACE_VERSION, ALLMPNET_SOURCE_DIGEST, ALLMPNET_MAX_SPLIT, (double)ALLMPNET_SPLIT_SHARE, ALLMPNET_MAX_TEXT,
                 ALLMPNET_HEAD_DIM, KERNEL_AVX2_F32, KERNEL_AVX2_A16, KERNEL_AVX512_F32, KERNEL_AVX512_A16,
                 KERNEL_AVX512_BF16, KERNEL_VNNI_A16, KERNEL_VNNI_A8, KERNEL_AVX512_F32W, KERNEL_AVX2_F32W,
                 KERNEL_AVXVNNI_A8, KERNEL_VNNI256_A8, KERNEL_AMX_A8, sizeof(x86_linear_spec), OFFSET(x86_linear_spec, kernel),
                 OFFSET(x86_linear_spec, gelu), OFFSET(x86_linear_spec, large_kernel),
                 OFFSET(x86_linear_spec, small_rows), OFFSET(x86_linear_spec, packed), OFFSET(x86_linear_spec, scales),
                 OFFSET(x86_linear_spec, compensation), OFFSET(x86_linear_spec, bias), OFFSET(x86_linear_spec, smooth),
                 OFFSET(x86_linear_spec, group), OFFSET(x86_linear_spec, N), OFFSET(x86_linear_spec, K),
                 OFFSET(x86_linear_spec, route), sizeof(x86_layer_spec), OFFSET(x86_layer_spec, qkv),
                 OFFSET(x86_layer_spec, o), OFFSET(x86_layer_spec, up), OFFSET(x86_layer_spec, down),
                 OFFSET(x86_layer_spec, norm1_weight), OFFSET(x86_layer_spec, norm1_bias),
                 OFFSET(x86_layer_spec, norm2_weight), OFFSET(x86_layer_spec, norm2_bias),
                 sizeof(x86_embedding_spec), OFFSET(x86_embedding_spec, word), OFFSET(x86_embedding_spec, position),
                 OFFSET(x86_embedding_spec, bf16), OFFSET(x86_embedding_spec, vocab),
                 OFFSET(x86_embedding_spec, positions), OFFSET(x86_embedding_spec, offset),
                 OFFSET(x86_embedding_spec, pad_id), OFFSET(x86_embedding_spec, norm_weight),
                 OFFSET(x86_embedding_spec, norm_bias));
    }
    return text;
}

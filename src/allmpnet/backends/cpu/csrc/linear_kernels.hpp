// The linear kernels as the driver takes them (linear_driver.hpp): each a struct naming its micro-kernel, its
// activations and how its rows are prepared. Each linear_<isa>.cpp includes this file with its own instruction set
// and instantiates the kernels that set allows.
#ifndef ALLMPNET_LINEAR_KERNELS_HPP
#define ALLMPNET_LINEAR_KERNELS_HPP
#include "linear_driver.hpp"
#include "micro_avx2.hpp"
#if defined(__AVX512F__)
#include "micro_avx512.hpp"
#endif

namespace {

template <class Self, class T_, int Kind, bool FromCompensation>
struct Kernel {  // what every kernel shares: the generic row preparation, and the int16 kernel is its own routed one
    using T = T_;
    using Routed = Self;
    static constexpr int kind = Kind;
    static constexpr bool from_compensation = FromCompensation;
    static int prepare(const linear_args *a, int kind, int64_t m, float *buffer) {
        return prepare_row(a, kind, m, buffer);
    }
};

struct Avx2A16 : Kernel<Avx2A16, int16_t, ACT_I16, false> {
    template <int R>
    static void multiply(const T *const *x, int64_t span, const int8_t *panel, const float *scales, const float *,
                         int64_t group, float tile[][NB], int accumulate) {
        mk_avx2_a16<R>(x, span, panel, scales, group, tile, accumulate);
    }
};

struct Avx2F32 : Kernel<Avx2F32, float, ACT_F32, false> {
    template <int R>
    static void multiply(const T *const *x, int64_t span, const int8_t *panel, const float *scales, const float *,
                         int64_t group, float tile[][NB], int accumulate) {
        mk_avx2_f32<R>(x, span, panel, scales, group, tile, accumulate);
    }
};

struct Avx2F32W {
    static constexpr int out = 2;
    template <int R>
    static void multiply(const float *const *x, int64_t K, const float *w, float tile[][NB], int j) {
        mk_avx2_f32w<R>(x, K, w, tile, j);
    }
};

// A8 on 256 bits (vnni256-a8, avxvnni-a8): spiky rows routed to int16 take AVX2's int16 kernel (the CPUs with
// AVX-VNNI alone have no other)
template <Dpbusd256 D>
struct A8x256 : Kernel<A8x256<D>, uint8_t, ACT_U8, true> {
    using Routed = Avx2A16;
    template <int R>
    static void multiply(const uint8_t *const *x, int64_t span, const int8_t *panel, const float *scales,
                         const float *start, int64_t group, float tile[][NB], int accumulate) {
        mk_a8_256<D, R>(x, span, panel, scales, start, group, tile, accumulate);
    }
};

#if defined(__AVX512F__)
template <PairProduct P, class T_, int Kind>
struct Pairs : Kernel<Pairs<P, T_, Kind>, T_, Kind, false> {
    template <int R>
    static void multiply(const T_ *const *x, int64_t span, const int8_t *panel, const float *scales, const float *,
                         int64_t group, float tile[][NB], int accumulate) {
        mk_pairs<P, T_, R>(x, span, panel, scales, group, tile, accumulate);
    }
};
using Avx512A16 = Pairs<PAIRS_MADD16, int16_t, ACT_I16>;
using VnniA16 = Pairs<PAIRS_VNNI16, int16_t, ACT_I16>;
using Avx512Bf16 = Pairs<PAIRS_BF16, uint16_t, ACT_BF16>;

struct Avx512F32 : Kernel<Avx512F32, float, ACT_F32, false> {
    template <int R>
    static void multiply(const T *const *x, int64_t span, const int8_t *panel, const float *scales, const float *,
                         int64_t group, float tile[][NB], int accumulate) {
        mk_avx512_f32<R>(x, span, panel, scales, group, tile, accumulate);
    }
};

struct Avx512F32W {
    static constexpr int out = 4;
    template <int R>
    static void multiply(const float *const *x, int64_t K, const float *w, float tile[][NB], int j) {
        mk_avx512_f32w<R>(x, K, w, tile, j);
    }
};

#if defined(__AVX512VNNI__)
// A8: its rows prepared by prepare_row_a8 (the same bytes as prepare_row's, written out in AVX-512), spiky rows
// routed to VNNI's int16 kernel
struct VnniA8 : Kernel<VnniA8, uint8_t, ACT_U8, true> {
    using Routed = VnniA16;
    template <int R>
    static void multiply(const uint8_t *const *x, int64_t span, const int8_t *panel, const float *scales,
                         const float *start, int64_t group, float tile[][NB], int accumulate) {
        mk_vnni_a8<R>(x, span, panel, scales, start, group, tile, accumulate);
    }
    static int prepare(const linear_args *a, int kind, int64_t m, float *buffer) {
        return prepare_row_a8(a, kind, m, buffer);
    }
};
#endif
#endif

}  // namespace
#endif

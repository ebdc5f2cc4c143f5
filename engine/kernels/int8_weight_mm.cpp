// W8A16 product for a few rows: y (M, N) = x (M, K) @ q (N, K)^T * scale (N), int8 weights,
// bf16 or fp32 activations, fp32 accumulation. Built on first use by engine/native.py for an
// AVX2 + FMA baseline; the AVX-512 kernels carry their own target attributes and are chosen at
// run time where the CPU has them (HYBRID_LLM_NATIVE_ISA=avx2 forces the AVX2 kernel). Without
// AVX-512 this kernel serves up to 8 rows (decode) and ATen's the rest (prefill), so there a
// row's bits are the same in any batch of up to 8 rows, not beyond.
//
// Why: `torch._weight_int8pack_mm` converts the int8 weights again for every small block of
// rows, so its time grows with the batch although the weights are read from memory once. Here
// each weight vector is converted once (to bf16, exactly) and applied to up to 8 rows held in
// registers with VDPBF16PS. SmolLM2-135M's 120 layer products (q/k/v and gate/up fused), 2
// cores (AVX-512 + BF16), median of 7: 1 / 4 / 8 / 16 / 128 rows 7.9 / 11.0 / 20.8 / 33.2 /
// 202 ms with the ATen kernel, 7.8 / 9.5 / 12.8 / 19.4 / 99.6 ms here. Every output element is
// summed in the same order whatever M is, so a row's result does not depend on the rows
// batched with it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;  // fp32 lanes of a zmm register; K must be a multiple
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// MT rows of x times NB weight rows: MT * NB accumulators, each weight vector converted once.
template <int MT, int NB, typename S, typename O>
AVX512 inline void micro(const float* x, int64_t K, const int8_t* w, const S* s, O* y, int64_t ldy) {
  __m512 acc[MT][NB];
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += kLanes) {
    __m512 wv[NB];
    for (int j = 0; j < NB; ++j)
      wv[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + j * K + k))));
    for (int m = 0; m < MT; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_fmadd_ps(xv, wv[j], acc[m][j]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NB; ++j) y[m * ldy + j] = O(_mm512_reduce_add_ps(acc[m][j]) * float(s[j]));
}

// The fp32 kernel for AVX2 + FMA: 8 lanes and 16 registers, so at most 8 accumulators.
template <int MT, int NB, typename S, typename O>
__attribute__((target("avx2,fma"))) inline void micro_avx2(const float* x, int64_t K, const int8_t* w, const S* s,
                                                         O* y, int64_t ldy) {
  __m256 acc[MT][NB];
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 wv[NB];
    for (int j = 0; j < NB; ++j)
      wv[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + j * K + k))));
    for (int m = 0; m < MT; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_fmadd_ps(xv, wv[j], acc[m][j]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NB; ++j) {
      const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[m][j]), _mm256_extractf128_ps(acc[m][j], 1));
      const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
      y[m * ldy + j] = O(_mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q))) * float(s[j]));
    }
}

// 32 int8 -> 32 bf16 in order (exact: at most 7 significant bits).
AVX512 inline __m512bh bf16x32(const int8_t* p) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + kLanes))));
  return _mm512_cvtne2ps_pbh(hi, lo);  // the second argument fills the low half
}

// The same with bf16 activations, two k at a time (VDPBF16PS: 32 products per instruction, half
// the FMAs): each int8 weight converts exactly to bf16 (7 significant bits), products of two
// bf16 are exact in fp32, sums are fp32 as above. K must be a multiple of 32. The weights are
// int8 (converted here) or, for prefill (M > 8), bf16 already converted by `to_bf16` once per
// tile and read back for every 8 rows of x; either way the same sums in the same order.
template <int MT, int NB, typename W, typename S, typename O>
AVX512 inline void micro_bf16(const uint16_t* x, int64_t K, const W* w, const S* s, O* y, int64_t ldy) {
  __m512 acc[MT][NB];
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 2 * kLanes) {
    __m512bh wv[NB];
    for (int j = 0; j < NB; ++j) {
      const W* p = w + j * K + k;
      if constexpr (std::is_same_v<W, int8_t>) wv[j] = bf16x32(p);
      else wv[j] = (__m512bh)_mm512_loadu_si512((const void*)p);
    }
    for (int m = 0; m < MT; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512((const void*)(x + m * K + k));
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xv, wv[j]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NB; ++j) y[m * ldy + j] = O(_mm512_reduce_add_ps(acc[m][j]) * float(s[j]));
}

AVX512 inline void to_bf16(const int8_t* w, int64_t n, uint16_t* out) {
  for (int64_t k = 0; k < n; k += 2 * kLanes) _mm512_storeu_si512((void*)(out + k), (__m512i)bf16x32(w + k));
}

template <int MT, int NB> struct Fma {
  template <typename... A> static void run(A... a) { micro<MT, NB>(a...); }
};
template <int MT, int NB> struct Avx2 {
  template <typename... A> static void run(A... a) { micro_avx2<MT, NB>(a...); }
};
template <int MT, int NB> struct Bf16 {
  template <typename... A> static void run(A... a) { micro_bf16<MT, NB>(a...); }
};

// One tile: mt (1..8) rows of x, made a compile-time constant for the micro kernel F.
template <template <int, int> class F, int NB, typename... A>
inline void rows(int64_t mt, A... a) {
  switch (mt) {
    case 1: return F<1, NB>::run(a...);
    case 2: return F<2, NB>::run(a...);
    case 3: return F<3, NB>::run(a...);
    case 4: return F<4, NB>::run(a...);
    case 5: return F<5, NB>::run(a...);
    case 6: return F<6, NB>::run(a...);
    case 7: return F<7, NB>::run(a...);
    default: return F<8, NB>::run(a...);
  }
}

// The rows of x times weight rows [n, n + width) (width <= nb), 8 rows of x at a time.
template <template <int, int> class F, typename T, typename W, typename S, typename O>
inline void tile(const T* x, int64_t M, int64_t K, const W* w, const S* s, O* y, int64_t N, int64_t nb,
                 int64_t width) {
  for (int64_t m = 0; m < M; m += 8) {
    const int64_t mt = std::min<int64_t>(8, M - m);
    if (width == 4 && nb == 4) rows<F, 4>(mt, x + m * K, K, w, s, y + m * N, N);
    else if (width == 2 && nb == 2) rows<F, 2>(mt, x + m * K, K, w, s, y + m * N, N);
    else
      for (int64_t j = 0; j < width; ++j) rows<F, 1>(mt, x + m * K, K, w + j * K, s + j, y + m * N + j, N);
  }
}

// y (M, N) over tiles of nb weight rows, split between threads. Scales and outputs are read and
// written in their own dtype (float or bf16), so a call allocates nothing but y.
template <typename T, typename S, typename O>
void product(const T* xp, int64_t M, int64_t K, const int8_t* qp, const S* sp, O* yp, int64_t N, bool avx512) {
  constexpr bool bf16 = std::is_same_v<T, uint16_t>;  // only chosen with AVX-512 BF16
  // AVX-512: 4 weight rows a tile up to 4 rows of x (16 accumulators), 2 above (16 of 8 x 2);
  // AVX2: at most 8 accumulators (4 x 2, 2 x 4, 8 x 1)
  const int64_t nb = avx512 ? (M <= 4 ? 4 : 2) : (M <= 2 ? 4 : M <= 4 ? 2 : 1);
  const int64_t tiles = (N + nb - 1) / nb;
  at::parallel_for(0, tiles, 16, [&](int64_t t0, int64_t t1) {
    std::vector<uint16_t> wb(bf16 && M > 8 ? nb * K : 0);  // this thread's converted tile
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t * nb, width = std::min(nb, N - n);
      if constexpr (bf16) {
        if (M > 8) {
          to_bf16(qp + n * K, width * K, wb.data());
          tile<Bf16>(xp, M, K, wb.data(), sp + n, yp + n, N, nb, width);
        } else {
          tile<Bf16>(xp, M, K, qp + n * K, sp + n, yp + n, N, nb, width);
        }
      } else if (avx512) {
        tile<Fma>(xp, M, K, qp + n * K, sp + n, yp + n, N, nb, width);
      } else {
        tile<Avx2>(xp, M, K, qp + n * K, sp + n, yp + n, N, nb, width);
      }
    }
  });
}

// AVX-512 where the CPU has it (BF16 too for the bf16 kernel), unless HYBRID_LLM_NATIVE_ISA=avx2
bool use_avx512() {
  const char* isa = std::getenv("HYBRID_LLM_NATIVE_ISA");
  if (isa != nullptr && std::string(isa) == "avx2") return false;
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

at::Tensor int8_weight_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && scale.dim() == 1, "int8_weight_mm: x (M, K), q (N, K), scale (N,)");
  TORCH_CHECK(q.scalar_type() == at::kChar, "int8_weight_mm: q must be int8");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.size(1) == K && scale.size(0) == N, "int8_weight_mm: shapes do not match");
  TORCH_CHECK(K % kLanes == 0, "int8_weight_mm: K must be a multiple of 16");
  const bool avx512 = use_avx512();
  if (!avx512 && M > 8)  // AVX2 prefill: ATen's kernel (128 rows, AVX2 kernel forced here: 295 vs 210 ms)
    return at::_weight_int8pack_mm(x, q, scale.to(x.scalar_type()));
  const at::Tensor qc = q.contiguous();
  const bool bf16_in = avx512 && x.scalar_type() == at::kBFloat16 && K % (2 * kLanes) == 0 &&
                       __builtin_cpu_supports("avx512bf16");
  const at::Tensor xc = bf16_in ? x.contiguous() : x.to(at::kFloat).contiguous();
  const at::Tensor sc = scale.scalar_type() == at::kBFloat16 ? scale.contiguous() : scale.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, x.options().dtype(x.scalar_type() == at::kBFloat16 ? at::kBFloat16 : at::kFloat));
  const int8_t* qp = qc.data_ptr<int8_t>();
  // every combination of activation (bf16 pairs or fp32), scale and output dtype
  auto with_out = [&](auto* xp, auto* sp) {
    if (y.scalar_type() == at::kBFloat16) product(xp, M, K, qp, sp, y.data_ptr<at::BFloat16>(), N, avx512);
    else product(xp, M, K, qp, sp, y.data_ptr<float>(), N, avx512);
  };
  auto with_scale = [&](auto* xp) {
    if (sc.scalar_type() == at::kBFloat16) with_out(xp, sc.data_ptr<at::BFloat16>());
    else with_out(xp, sc.data_ptr<float>());
  };
  if (bf16_in) with_scale(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()));
  else with_scale(xc.data_ptr<float>());
  return x.scalar_type() == y.scalar_type() ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(hybrid_llm, m) {
  m.def("int8_weight_mm(Tensor x, Tensor q, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(hybrid_llm, CPU, m) {
  m.impl("int8_weight_mm", &int8_weight_mm);
}

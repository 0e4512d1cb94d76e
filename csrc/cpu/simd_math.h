// Element-wise math written so that the compiler vectorizes it inside `omp simd` loops.
//
// Included by the per-ISA kernel files after their target pragma: everything here is inline and
// is compiled once per SIMD flavour. No headers are included here on purpose (the including file
// includes them before switching the target).
#pragma once

namespace scope_kernels {
namespace SCOPE_CPU_NS {

// exp(x) for float in about 1 ulp (Cephes' expf polynomial with a Cody-Waite range reduction):
// pure arithmetic and bit operations, so `omp simd` loops using it vectorize. Inputs below
// -87.33 return 0; our callers only pass x - max(x) <= ~0. NaN inputs give garbage: the kernels
// detect non-finite logits before they get here and report them.
SCOPE_INLINE float vexp(float x) {
  constexpr float kLo = -87.3365448f;
  constexpr float kHi = 88.3762626f;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float xc = x < kLo ? kLo : x;
  xc = xc > kHi ? kHi : xc;
  const float n = (xc * kLog2e + kRound) - kRound;
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < kLo ? 0.0f : y * scale;
}

// double inputs exist for gradcheck and references: exactness over speed.
SCOPE_INLINE double vexp(double x) { return std::exp(x); }

template <typename Acc>
SCOPE_INLINE Acc vmax(Acc a, Acc b) {
  return a > b ? a : b;
}

}  // namespace SCOPE_CPU_NS
}  // namespace scope_kernels

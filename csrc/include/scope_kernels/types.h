// Element types, accumulation types and conversions shared by the CPU and CUDA kernels.
//
// This header knows nothing of torch or Python. The 16-bit types are plain bit containers
// with the same layout as c10::BFloat16 / c10::Half and CUDA's __nv_bfloat16 / __half, so the
// bindings pass tensor data pointers through a reinterpret_cast.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SCOPE_HOST_DEVICE __host__ __device__
#define SCOPE_INLINE __host__ __device__ __forceinline__
#else
#define SCOPE_HOST_DEVICE
#define SCOPE_INLINE inline __attribute__((always_inline))
#endif

namespace scope_kernels {

// bfloat16 storage: the upper 16 bits of an IEEE float32.
struct BFloat16 {
  uint16_t bits;
};

// IEEE float16 storage.
struct Half {
  uint16_t bits;
};

static_assert(sizeof(BFloat16) == 2 && sizeof(Half) == 2, "16-bit storage types must be 2 bytes");

// Accumulation type: float64 inputs accumulate in float64 (used by gradcheck), everything else
// in float32.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// Bits of the per-row error flags that the partial kernels report (stored in the stats as a
// small integer value; the combine step ORs them across shards).
enum ErrorFlag : int32_t {
  kFlagNonFiniteFirst = 1,   // NaN or +-Inf in the first input (logits / student logits)
  kFlagNonFiniteSecond = 2,  // NaN or +-Inf in the second input (teacher logits)
  kFlagTargetOutOfRange = 4, // target id outside [0, vocab_size)
  kFlagShardLayout = 8,      // an in-range target owned by no shard or by several: the shards
                             // are not an equal partition of the vocabulary
};

// Number of leading columns of a shard that belong to the true vocabulary: columns with a
// global id >= vocab_size (Megatron's padding) take part in no softmax.
SCOPE_INLINE int64_t valid_columns(int64_t vocab_start, int64_t vocab_size, int64_t cols) {
  const int64_t v = vocab_size - vocab_start;
  return v < 0 ? 0 : (v > cols ? cols : v);
}

#if !defined(__CUDACC__)
// Host conversions. CUDA code uses the cuda_fp16 / cuda_bf16 intrinsics instead.
SCOPE_INLINE uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

SCOPE_INLINE float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

SCOPE_INLINE float to_float(BFloat16 x) { return bits_float(static_cast<uint32_t>(x.bits) << 16); }

// Round to nearest even, NaN stays NaN (same rounding as c10::BFloat16).
SCOPE_INLINE BFloat16 to_bfloat16(float f) {
  const uint32_t u = float_bits(f);
  const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return BFloat16{static_cast<uint16_t>(is_nan ? 0x7fc0u : rounded)};
}

// IEEE half <-> float with integer operations and selects only (no branches, no F16C), so that
// loops converting halves vectorize on every ISA. Exact, round to nearest even (F. Giesen's
// method); checked against _Float16 on all 65536 halves by the C++ tests.
SCOPE_INLINE float to_float(Half x) {
  const uint32_t h = x.bits;
  const uint32_t shifted_exp = 0x7c00u << 13;
  const uint32_t magnitude = (h & 0x7fffu) << 13;
  const uint32_t exp = magnitude & shifted_exp;
  const uint32_t normal = magnitude + ((127u - 15u) << 23);
  const uint32_t inf_nan = normal + ((128u - 16u) << 23);
  // zero / subnormal: renormalize through a float subtraction
  const uint32_t subnormal = float_bits(bits_float(normal + (1u << 23)) - bits_float(113u << 23));
  const uint32_t o = exp == shifted_exp ? inf_nan : (exp == 0 ? subnormal : normal);
  return bits_float(o | ((h & 0x8000u) << 16));
}

SCOPE_INLINE Half to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = u & 0x80000000u;
  const uint32_t a = u ^ sign;
  const uint32_t f32_inf = 255u << 23;
  const uint32_t f16_max = (127u + 16u) << 23;
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  const uint32_t overflow = a > f32_inf ? 0x7e00u : 0x7c00u;  // NaN stays NaN, else Inf
  const uint32_t subnormal = float_bits(bits_float(a) + bits_float(denorm_magic)) - denorm_magic;
  const uint32_t mant_odd = (a >> 13) & 1u;
  const uint32_t normal = (a + (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + mant_odd) >> 13;
  const uint32_t o = a >= f16_max ? overflow : (a < (113u << 23) ? subnormal : normal);
  return Half{static_cast<uint16_t>(o | (sign >> 16))};
}

SCOPE_INLINE float to_float(float x) { return x; }
SCOPE_INLINE double to_float(double x) { return x; }

// Load an element as its accumulation type, and store an accumulated value as an element.
template <typename T>
SCOPE_INLINE acc_t<T> load_acc(const T& x) {
  return static_cast<acc_t<T>>(to_float(x));
}

template <typename T>
SCOPE_INLINE T store_as(acc_t<T> v);
template <>
SCOPE_INLINE float store_as<float>(float v) {
  return v;
}
template <>
SCOPE_INLINE double store_as<double>(double v) {
  return v;
}
template <>
SCOPE_INLINE BFloat16 store_as<BFloat16>(float v) {
  return to_bfloat16(v);
}
template <>
SCOPE_INLINE Half store_as<Half>(float v) {
  return to_half(v);
}
#endif  // !__CUDACC__

}  // namespace scope_kernels

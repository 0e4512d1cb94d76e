// bfloat16 / float16 conversions of types.h: all 65536 halves against the compiler's _Float16,
// float -> half and float -> bfloat16 rounding (nearest even) on random and edge values.
#include <cmath>
#include <cstring>

#include "harness.h"
#include "scope_kernels/types.h"

using namespace scope_kernels;

namespace {

uint16_t half_bits(_Float16 h) {
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}

// Reference float -> bfloat16, round to nearest even, by comparing the distances to the two
// neighbours in double (no bit tricks). Above the largest bfloat16 the upper neighbour is 2^128,
// which rounds to infinity (IEEE overflow).
uint16_t bf16_reference(float f) {
  if (std::isnan(f)) return 0x7fc0;
  const uint32_t u = float_bits(f);
  const uint32_t lo = u & 0xffff0000u, hi = lo + 0x10000u;
  const double dlo = bits_float(lo);
  const double dhi = (hi & 0x7fffffffu) == 0x7f800000u ? std::copysign(std::ldexp(1.0, 128), f)
                                                       : static_cast<double>(bits_float(hi));
  const double elo = std::fabs(static_cast<double>(f) - dlo), ehi = std::fabs(static_cast<double>(f) - dhi);
  if (elo < ehi) return static_cast<uint16_t>(lo >> 16);
  if (ehi < elo) return static_cast<uint16_t>(hi >> 16);
  return static_cast<uint16_t>((((lo >> 16) & 1u) == 0 ? lo : hi) >> 16);
}

TEST(half_to_float_all_values) {
  for (uint32_t h = 0; h < 65536; ++h) {
    _Float16 ref;
    const uint16_t b = static_cast<uint16_t>(h);
    std::memcpy(&ref, &b, 2);
    const float a = to_float(Half{b}), e = static_cast<float>(ref);
    CHECK((std::isnan(a) && std::isnan(e)) || float_bits(a) == float_bits(e), "half 0x" << std::hex << h);
  }
}

TEST(float_to_half_rounding) {
  std::mt19937_64 g(scope_test::seed());
  const float edges[] = {0.0f, -0.0f, 65504.0f, 65519.99f, 65520.0f, 1e-8f, 5.96e-8f, 2.98e-8f, 2.99e-8f,
                         6.1035e-5f, 6.1e-5f, INFINITY, -INFINITY, 1e30f, -1e-30f};
  for (float f : edges) CHECK(to_half(f).bits == half_bits(static_cast<_Float16>(f)), "edge " << f);
  for (int i = 0; i < 5000000; ++i) {
    float f = bits_float(static_cast<uint32_t>(g()));
    if (i % 2) f = std::ldexp(static_cast<float>(g() % 2000001) / 1e6f - 1.0f, static_cast<int>(g() % 48) - 30);
    const uint16_t got = to_half(f).bits, want = half_bits(static_cast<_Float16>(f));
    if (std::isnan(f)) {
      CHECK((got & 0x7c00u) == 0x7c00u && (got & 0x3ffu) != 0, "NaN must stay NaN: " << got);
    } else {
      CHECK(got == want, "float " << f << " -> 0x" << std::hex << got << " want 0x" << want);
    }
  }
}

TEST(float_to_bfloat16_rounding) {
  std::mt19937_64 g(scope_test::seed() + 1);
  for (int i = 0; i < 5000000; ++i) {
    const float f = bits_float(static_cast<uint32_t>(g()));
    const uint16_t got = to_bfloat16(f).bits, want = bf16_reference(f);
    if (std::isnan(f)) {
      CHECK((got & 0x7f80u) == 0x7f80u && (got & 0x7fu) != 0, "NaN must stay NaN");
    } else {
      CHECK(got == want, "float bits 0x" << std::hex << float_bits(f) << " -> 0x" << got << " want 0x" << want);
    }
  }
  for (uint32_t b = 0; b < 65536; ++b) {  // bf16 -> float -> bf16 is the identity (NaN aside)
    const float f = to_float(BFloat16{static_cast<uint16_t>(b)});
    if (!std::isnan(f)) CHECK(to_bfloat16(f).bits == b, "round trip 0x" << std::hex << b);
  }
}

}  // namespace

SCOPE_TEST_MAIN()

// The CPU kernel's half and bfloat16 conversions (bit arithmetic, so that they vectorize) against
// c10::Half and c10::BFloat16: every 16-bit pattern loaded, and a sweep of float bit patterns
// stored and rounded. The kernel header is compiled here once more, in a namespace of its own.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../../csrc/cpu/kernel.h"
#define KERNEL_NAMESPACE conversions_under_test
#define KERNEL_HAS_FMA 0
#define KERNEL_F16_LANES 0
#include "../../csrc/cpu/kernel_impl.h"

namespace fused_adagrad::cpu::conversions_under_test {
namespace {

uint32_t bits_of(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

template <typename Kernel, typename C10>
void expect_loads_match(const char* name) {
  for (uint32_t h = 0; h <= 0xffffu; ++h) {
    const float want = static_cast<float>(C10(static_cast<uint16_t>(h), C10::from_bits()));
    const float got = Kernel::load(static_cast<uint16_t>(h));
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(got)) << name << " bits " << std::hex << h;
    } else {
      ASSERT_EQ(bits_of(got), bits_of(want)) << name << " bits " << std::hex << h;
    }
  }
}

// Float patterns: a stride through all 2^32 (coprime with 2^32, so every exponent and many
// mantissas) plus the neighbourhood of each half/bfloat16 rounding boundary class.
template <typename Kernel, typename C10>
void expect_stores_match(const char* name) {
  auto check = [&](uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    const uint16_t got = Kernel::store(f);
    if (std::isnan(f)) {
      const float back = Kernel::load(got);
      ASSERT_TRUE(std::isnan(back)) << name << " float bits " << std::hex << bits;
      // The sign of a NaN as c10 keeps it (Half does; BFloat16 makes every NaN 0x7fc0).
      ASSERT_EQ(std::signbit(back), std::signbit(static_cast<float>(C10(f))))
          << name << " float bits " << std::hex << bits;
      // round() keeps a NaN a NaN for the NaNs the kernel can meet: all of them (bfloat16's
      // round() relies on it) have low 16 bits 0, being loaded halves/bfloat16s, results of
      // operations on those, or the default NaN.
      if ((bits & 0xffffu) == 0) {
        ASSERT_TRUE(std::isnan(Kernel::round(f))) << name << " float bits " << std::hex << bits;
      }
      return;
    }
    const uint16_t want = C10(f).x;
    ASSERT_EQ(got, want) << name << " float bits " << std::hex << bits;
    // round() is the float-only shortcut for load(store(f)).
    ASSERT_EQ(bits_of(Kernel::round(f)), bits_of(Kernel::load(want)))
        << name << " float bits " << std::hex << bits;
  };
  for (uint64_t b = 0; b < (uint64_t{1} << 32); b += 257) check(static_cast<uint32_t>(b));
  for (uint32_t exponent = 0; exponent < 256; ++exponent) {
    for (uint32_t sign : {0u, 0x80000000u}) {
      // Mantissas at and around halfway points of both formats (13 and 16 dropped bits).
      for (uint32_t mantissa : {0x0u, 0x1u, 0xfffu, 0x1000u, 0x1001u, 0x2000u, 0x3000u, 0x7fffu,
                                0x8000u, 0x8001u, 0x18000u, 0x7fe000u, 0x7fefffu, 0x7ff000u,
                                0x7ff001u, 0x7fffffu, 0x10000u, 0x400000u}) {
        check(sign | (exponent << 23) | mantissa);
      }
    }
  }
}

TEST(KernelConversions, HalfLoadsEveryPatternLikeC10Half) {
  expect_loads_match<F16, c10::Half>("half");
}

TEST(KernelConversions, HalfStoresAndRoundsLikeC10Half) {
  expect_stores_match<F16, c10::Half>("half");
}

TEST(KernelConversions, BFloat16LoadsEveryPatternLikeC10BFloat16) {
  expect_loads_match<BF16, c10::BFloat16>("bfloat16");
}

TEST(KernelConversions, BFloat16StoresAndRoundsLikeC10BFloat16) {
  expect_stores_match<BF16, c10::BFloat16>("bfloat16");
}

}  // namespace
}  // namespace fused_adagrad::cpu::conversions_under_test

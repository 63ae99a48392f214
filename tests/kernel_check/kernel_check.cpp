// Standalone check of the CPU kernels (csrc/cpu), with no torch and no test framework, so that it
// builds for any architecture and runs under an emulator (.ci/aarch64.sh runs it natively and as
// an aarch64 binary under qemu). Every expected value comes from a reference written plainly
// here, not from the kernel's own helpers:
//   (a) half and bfloat16 loads of all 65 536 bit patterns, against a decode in double, and
//       bfloat16's store_rounded() of them (the bits back);
//   (b) half and bfloat16 stores and round() of a strided sweep through the 2^32 float bit
//       patterns plus edge cases (subnormals, every halfway point and its float neighbours,
//       overflow, every float with 16 low zero bits, NaNs), against round-to-nearest-even onto
//       the format's grid computed in double; a NaN stores as a NaN (half: of the same sign;
//       bfloat16: 0x7fc0) and rounds to a NaN; hyper() of doubles rounds through float;
//       rounded_sqrt() of all 65 536 bit patterns is round() of the float square root;
//       (a) and (b) for half once more through F16Quad, the portable x86-64 build's vectors;
//   (c) update_range (dense element-wise Adagrad) for float32, float64, float16 and bfloat16,
//       every option combination, slices of odd sizes and ranges that split them, three steps,
//       against a scalar reference of the arithmetic documented above update_element in
//       kernel_impl.h, bitwise;
//   (d) sparse_update_range (COO value rows, and embedding-bag entries: scaled rows read through
//       value_row) and rowwise_update_range on small cases against plain scalar loops;
//   (e) unscale (GradScaler's grad / scale) for every dtype, power-of-two scales and others,
//       against the division rounded to the dtype, bitwise.
// (c) to (e) run on every kernel this binary has and this CPU runs: base (kernel_base.cpp, as
// built), avx2 and avx512 on x86-64, and the copy of kernel_impl.h compiled into this file.
//
// Build (see .ci/aarch64.sh):
//   g++ -std=c++17 -O3 -ffp-contract=off -fno-math-errno tests/kernel_check/kernel_check.cpp
//       csrc/cpu/kernel_base.cpp csrc/cpu/kernel_avx2.cpp csrc/cpu/kernel_avx512.cpp
// Usage: kernel_check [STRIDE]   STRIDE: odd step of the float sweep (b), default 257.
// Exit status: 0 when every check passed, 1 otherwise (each failure is printed, up to a limit).
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "../../csrc/cpu/kernel.h"

// The kernel header once more, in a namespace of its own, for its F16 and BF16 conversions and
// as one more kernel: with the FMA choice kernel_base.cpp makes for this architecture.
#define KERNEL_NAMESPACE check
#if defined(__aarch64__)
#define KERNEL_HAS_FMA 1
#else
#define KERNEL_HAS_FMA 0
#endif
#define KERNEL_F16_LANES 0
#include "../../csrc/cpu/kernel_impl.h"

namespace {

using namespace fused_adagrad::cpu;

// ---- failures -------------------------------------------------------------------------------
int64_t g_failures = 0;
constexpr int64_t kMaxPrinted = 40;

void fail(int line, const char* cond, const char* fmt, ...) {
  if (++g_failures > kMaxPrinted) return;
  std::fprintf(stderr, "FAIL (kernel_check.cpp:%d, %s): ", line, cond);
  va_list args;
  va_start(args, fmt);
  std::vfprintf(stderr, fmt, args);
  va_end(args);
  std::fputc('\n', stderr);
}

// CHECK(condition, printf-style message): counts and prints a failure, and goes on.
#define CHECK(cond, ...)                          \
  do {                                            \
    if (!(cond)) fail(__LINE__, #cond, __VA_ARGS__); \
  } while (0)

// Runs one section and prints its result.
template <typename Fn>
void section(const char* name, Fn fn) {
  const int64_t before = g_failures;
  fn();
  const int64_t failed = g_failures - before;
  if (failed == 0) {
    std::printf("ok    %s\n", name);
  } else {
    std::printf("FAIL  %s: %lld failed checks\n", name, static_cast<long long>(failed));
  }
  std::fflush(stdout);
}

uint32_t bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}
uint64_t bits(double d) {
  uint64_t b;
  std::memcpy(&b, &d, sizeof b);
  return b;
}
uint16_t bits(uint16_t h) { return h; }
float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

// ---- reference half / bfloat16, in double ---------------------------------------------------
// A binary format with `mant_bits` stored mantissa bits, exponent bias `bias` and an exponent
// field of `exp_bits` bits (all ones: inf and NaN).
struct Format {
  const char* name;
  int mant_bits, exp_bits, bias;
  int emin() const { return 1 - bias; }
  int emax() const { return bias; }
  double max_finite() const {
    return std::ldexp(std::ldexp(1.0, mant_bits + 1) - 1, emax() - mant_bits);
  }
  uint16_t inf_bits() const { return static_cast<uint16_t>(((1u << exp_bits) - 1) << mant_bits); }
};
constexpr Format kHalf{"half", 10, 5, 15};
constexpr Format kBFloat16{"bfloat16", 7, 8, 127};

double decode(const Format& f, uint16_t h) {
  const bool negative = (h >> 15) & 1;
  const int e = (h >> f.mant_bits) & ((1 << f.exp_bits) - 1);
  const int m = h & ((1 << f.mant_bits) - 1);
  double v;
  if (e == 0) {
    v = std::ldexp(m, f.emin() - f.mant_bits);
  } else if (e == (1 << f.exp_bits) - 1) {
    v = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  } else {
    v = std::ldexp((1 << f.mant_bits) + m, e - f.bias - f.mant_bits);
  }
  return negative ? -v : v;
}

// x rounded to nearest, ties to even, onto the format's grid (unbounded exponent above, then
// overflow to inf past the largest finite value); NaN, inf and zeros unchanged.
double round_to(const Format& f, double x) {
  if (std::isnan(x) || std::isinf(x) || x == 0) return x;
  int e;
  std::frexp(x, &e);  // |x| in [2^(e-1), 2^e)
  const int lead = e - 1 < f.emin() ? f.emin() : e - 1;
  const double quantum = std::ldexp(1.0, lead - f.mant_bits);
  const double r = std::nearbyint(x / quantum) * quantum;  // the default mode: to nearest even
  return std::fabs(r) > f.max_finite() ? std::copysign(std::numeric_limits<double>::infinity(), x)
                                       : r;
}

// The bits of v, a value of the format's grid or +-inf (not NaN).
uint16_t encode(const Format& f, double v) {
  const uint16_t sign = std::signbit(v) ? 0x8000 : 0;
  const double a = std::fabs(v);
  if (std::isinf(a)) return sign | f.inf_bits();
  if (a == 0) return sign;
  int e;
  std::frexp(a, &e);
  const int lead = e - 1;
  if (lead < f.emin()) {
    return sign | static_cast<uint16_t>(a / std::ldexp(1.0, f.emin() - f.mant_bits));
  }
  const uint32_t m = static_cast<uint32_t>(a / std::ldexp(1.0, lead - f.mant_bits)) - (1u << f.mant_bits);
  return static_cast<uint16_t>(sign | ((lead + f.bias) << f.mant_bits) | m);
}

// ---- (a) loads ------------------------------------------------------------------------------
template <typename T>
void check_loads(const Format& f) {
  for (uint32_t h = 0; h <= 0xffffu; ++h) {
    const float got = T::load(static_cast<uint16_t>(h));
    const double want = decode(f, static_cast<uint16_t>(h));
    if (std::isnan(want)) {
      CHECK(std::isnan(got), "%s load of 0x%04x: %a, want a NaN", f.name, h, got);
    } else {
      CHECK(bits(got) == bits(static_cast<float>(want)), "%s load of 0x%04x: %a, want %a", f.name,
            h, got, want);
    }
  }
}

// store_rounded() (the store of the sums, already rounded) of every value on the grid, as load()
// gives them: the same bits back; a NaN as store() makes it (half: a NaN of the same sign;
// bfloat16: 0x7fc0).
template <typename T>
void check_rounded_stores(const Format& f) {
  for (uint32_t h = 0; h <= 0xffffu; ++h) {
    const uint16_t got = T::store_rounded(T::load(static_cast<uint16_t>(h)));
    if (std::isnan(decode(f, static_cast<uint16_t>(h)))) {
      const bool ok = f.exp_bits == 5 ? std::isnan(decode(f, got)) && (got >> 15) == (h >> 15)
                                      : got == 0x7fc0;
      CHECK(ok, "%s store_rounded of NaN 0x%04x: 0x%04x", f.name, h, got);
    } else {
      CHECK(got == h, "%s store_rounded of 0x%04x: 0x%04x", f.name, h, got);
    }
  }
}

// ---- (b) stores and round() -----------------------------------------------------------------
// `nan_bits`: what a NaN stores as, beyond being a NaN: the same sign (half), or exactly 0x7fc0
// (bfloat16, as c10::BFloat16).
template <typename T>
void check_store(const Format& f, uint32_t float_bits) {
  const float x = from_bits(float_bits);
  const uint16_t got = T::store(x);
  const float rounded = T::round(x);
  if (std::isnan(x)) {
    CHECK(std::isnan(decode(f, got)), "%s store of NaN 0x%08x: 0x%04x, not a NaN", f.name,
          float_bits, got);
    // BF16::round() promises NaN only for the NaNs the kernel can meet: those whose low 16 bits
    // are 0 (a bfloat16 operand's, or the default NaN); F16::round() for every NaN.
    if (f.exp_bits == 5 || (float_bits & 0xffffu) == 0) {
      CHECK(std::isnan(rounded), "%s round of NaN 0x%08x: %a, not a NaN", f.name, float_bits,
            rounded);
    }
    if (f.exp_bits == 5) {
      CHECK((got >> 15) == (float_bits >> 31), "%s store of NaN 0x%08x: 0x%04x, sign lost",
            f.name, float_bits, got);
    } else {
      CHECK(got == 0x7fc0, "%s store of NaN 0x%08x: 0x%04x, want 0x7fc0", f.name, float_bits, got);
    }
    return;
  }
  const double want = round_to(f, x);
  const uint16_t want_bits = encode(f, want);
  CHECK(got == want_bits, "%s store of %a (0x%08x): 0x%04x, want 0x%04x (%a)", f.name, x,
        float_bits, got, want_bits, want);
  CHECK(bits(rounded) == bits(static_cast<float>(want)),
        "%s round of %a (0x%08x): %a, want %a", f.name, x, float_bits, rounded, want);
}

template <typename T>
void check_stores(const Format& f, uint32_t stride, uint64_t* count) {
  uint64_t n = 0;
  auto one = [&](uint32_t b) {
    check_store<T>(f, b);
    ++n;
  };
  // A stride through all 2^32 patterns: odd, so coprime with 2^32.
  for (uint64_t b = 0; b < (uint64_t{1} << 32); b += stride) one(static_cast<uint32_t>(b));
  // Every finite value's rounding boundary: the float halfway between it and the next value up,
  // and the floats just below and above, with both signs. Covers every tie (to even, subnormal
  // ties, the tie between the largest finite value and 2^(emax+1) that overflows to inf).
  for (uint32_t h = 0; h < f.inf_bits(); ++h) {
    const double lo = decode(f, static_cast<uint16_t>(h));
    const double hi = h + 1 == f.inf_bits() ? std::ldexp(1.0, f.emax() + 1)
                                            : decode(f, static_cast<uint16_t>(h + 1));
    const float mid = static_cast<float>((lo + hi) / 2);  // exact: one bit more than the format
    for (float sign : {1.0f, -1.0f}) {
      const float m = sign * mid;
      one(bits(m));
      one(bits(std::nextafter(m, 0.0f)));
      one(bits(std::nextafter(m, sign * std::numeric_limits<float>::infinity())));
    }
  }
  // Every float whose low 16 bits are 0 (every bfloat16 value, all of its NaNs among them).
  for (uint32_t h = 0; h <= 0xffffu; ++h) one(h << 16);
  // Float-specific edges: zeros, subnormals, the largest finite, infinities, NaN payloads.
  for (uint32_t b : {0x00000000u, 0x00000001u, 0x00000002u, 0x00400000u, 0x007fffffu,
                     0x00800000u, 0x00800001u, 0x33000000u, 0x33000001u, 0x337fffffu,
                     0x33800000u, 0x33c00000u, 0x477fe000u, 0x477fefffu, 0x477ff000u,
                     0x477fffffu, 0x47800000u, 0x7f7fffffu, 0x7f7f7fffu, 0x7f7f8000u,
                     0x7f800000u, 0x7f800001u, 0x7fa00000u, 0x7fbfffffu, 0x7fc00000u,
                     0x7fc00001u, 0x7fe00000u, 0x7fffffffu}) {
    one(b);
    one(b | 0x80000000u);
  }
  *count += n;
}

// hyper(): a double hyperparameter rounded as torch makes it a c10::Half / c10::BFloat16, through
// float; the cases just past a format's halfway point, which float rounds onto it, tell that
// apart from one rounding of the double.
template <typename T>
void check_hyper(const Format& f, uint64_t* count) {
  std::vector<double> xs = {0.0, -0.0, 1e-10, 1e-8, 1e-4, 0.01, 0.05, 0.1, 1.0, -0.0173, 65504.0,
                            65519.0, 65520.0, 1e300, -1e300, 1e-300};
  for (int e = -30; e <= 20; ++e) {
    for (double sign : {1.0, -1.0}) {
      const double one = std::ldexp(sign, e);
      xs.push_back(one * (1 + std::ldexp(1.0, -f.mant_bits - 1) + 0x1p-40));  // float: a tie
      xs.push_back(one * (1 + std::ldexp(3.0, -f.mant_bits - 1) - 0x1p-40));
      xs.push_back(one * (1 + 0x1p-30));
    }
  }
  uint64_t state = 42;
  for (int i = 0; i < 4000; ++i) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    xs.push_back(std::ldexp(static_cast<double>(state >> 11) * 0x1p-53 - 0.5,
                            static_cast<int>((state >> 3) % 60) - 40));
  }
  for (double x : xs) {
    const float got = T::hyper(x);
    const float want = static_cast<float>(round_to(f, static_cast<float>(x)));
    CHECK(bits(got) == bits(want), "%s hyper(%a): %a, want %a (rounded through float)", f.name, x,
          got, want);
  }
  *count += xs.size();
}

// rounded_sqrt(x): round(sqrt(x)) for every x of the format (the kernel computes it in cheaper
// ways); a NaN stays a NaN.
template <typename T>
void check_rounded_sqrt(const Format& f) {
  for (uint32_t h = 0; h <= 0xffffu; ++h) {
    const double x = decode(f, static_cast<uint16_t>(h));
    const float got = T::rounded_sqrt(T::load(static_cast<uint16_t>(h)));
    const double want = round_to(f, std::sqrt(static_cast<float>(x)));
    if (std::isnan(want)) {
      CHECK(std::isnan(got), "%s rounded_sqrt of 0x%04x: %a, want a NaN", f.name, h, got);
    } else {
      CHECK(bits(got) == bits(static_cast<float>(want)), "%s rounded_sqrt of 0x%04x: %a, want %a",
            f.name, h, got, want);
    }
  }
}

#if KERNEL_F16_QUADS
// The portable x86-64 build's float16 vectors (F16Quad) as a scalar type, for (a) and (b): each
// value goes through lane (its bits mod 4) of a vector whose other lanes hold 1.0 (0x3c00), and
// store() also checks that store_round() stores the same bits and returns round().
struct QuadF16 {
  using Q = check::F16Quad;
  static float load(uint16_t h) {
    uint16_t x[4] = {0x3c00, 0x3c00, 0x3c00, 0x3c00};
    x[h & 3] = h;
    return Q::load(x)[h & 3];
  }
  static uint16_t store(float f) {
    const int lane = static_cast<int>(bits(f) & 3);
    uint16_t stored[4], stored_round[4];
    Q::store(stored, with(f));
    const float r = Q::store_round(stored_round, with(f))[lane];
    CHECK(stored[lane] == stored_round[lane], "F16Quad store_round of %a: 0x%04x, store 0x%04x", f,
          stored_round[lane], stored[lane]);
    CHECK(bits(r) == bits(round(f)) || (r != r && round(f) != round(f)),
          "F16Quad store_round of %a returned %a, round %a", f, r, round(f));
    return stored[lane];
  }
  static float round(float f) { return Q::round(with(f))[bits(f) & 3]; }
  static float rounded_sqrt(float x) { return Q::rounded_sqrt(with(x))[bits(x) & 3]; }

 private:
  static check::FloatLanes with(float f) {
    check::FloatLanes v = Q::broadcast(1.0f);
    v[bits(f) & 3] = f;
    return v;
  }
};
#endif

// ---- reference arithmetic for the updates ---------------------------------------------------
// Storage S and math type M of each dtype, as the kernel's contract says: half and bfloat16
// compute in float and are rounded (reference rounding above) where torch stores a tensor.
struct RefF32 {
  using S = float;
  using M = float;
  static constexpr Dtype kDtype = Dtype::Float;
  static constexpr const char* kName = "float32";
  static M load(S x) { return x; }
  static S store(M x) { return x; }
  static M round(M x) { return x; }
  static M hyper(double x) { return static_cast<M>(x); }
};
struct RefF64 {
  using S = double;
  using M = double;
  static constexpr Dtype kDtype = Dtype::Double;
  static constexpr const char* kName = "float64";
  static M load(S x) { return x; }
  static S store(M x) { return x; }
  static M round(M x) { return x; }
  static M hyper(double x) { return x; }
};
template <const Format& F, Dtype D>
struct RefHalfLike {
  using S = uint16_t;
  using M = float;
  static constexpr Dtype kDtype = D;
  static constexpr const char* kName = F.name;
  static M load(S x) { return static_cast<float>(decode(F, x)); }
  // A NaN (0 / 0 when eps is 0 in the dtype) as the kernels store one: the quiet NaN with its
  // sign for half, 0x7fc0 for bfloat16 (see check_store).
  static S store(M x) {
    if (x != x) return F.exp_bits == 5 ? (std::signbit(x) ? 0xfe00 : 0x7e00) : 0x7fc0;
    return encode(F, round_to(F, x));
  }
  static M round(M x) { return static_cast<float>(round_to(F, x)); }
  // torch turns a double hyperparameter into c10::Half / c10::BFloat16 through float.
  static M hyper(double x) { return round(static_cast<float>(x)); }
};
using RefF16 = RefHalfLike<kHalf, Dtype::Half>;
using RefBF16 = RefHalfLike<kBFloat16, Dtype::BFloat16>;

template <typename M>
M mul_add(M a, M b, M c, bool fused) {
  return fused ? std::fma(a, b, c) : a * b + c;  // built with -ffp-contract=off: two roundings
}

// Deterministic inputs: splitmix64.
struct Random {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1p-53; }  // [0, 1)
  // Magnitudes spread over 2^lo .. 2^hi, random sign unless `positive`; now and then a zero.
  double spread(int lo, int hi, bool positive = false) {
    if (next() % 64 == 0) return 0.0;
    const double m = 1 + uniform();
    const int e = lo + static_cast<int>(next() % static_cast<uint64_t>(hi - lo + 1));
    const double v = std::ldexp(m, e);
    return positive || next() % 2 ? v : -v;
  }
};

// A kernel build under test, and whether its fmadd() is fused.
struct Kernel {
  const char* name;
  UpdateRangeFn update;
  SparseRangeFn sparse;
  RowRangeFn rowwise;
  UnscaleFn unscale;
  bool fma;
};

std::vector<Kernel> kernels() {
  std::vector<Kernel> k;
#if defined(__aarch64__)
  constexpr bool kBaseFma = true;  // kernel_base.cpp fuses on aarch64, as torch's NEON fmadd
#else
  constexpr bool kBaseFma = false;
#endif
  k.push_back({"base", base::update_range, base::sparse_update_range, base::rowwise_update_range,
               base::unscale, kBaseFma});
  k.push_back({"kernel_impl.h compiled here", check::update_range, check::sparse_update_range,
               check::rowwise_update_range, check::unscale, KERNEL_HAS_FMA != 0});
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c");
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (has_avx2) {
    k.push_back({"avx2", avx2::update_range, avx2::sparse_update_range,
                 avx2::rowwise_update_range, avx2::unscale, true});
  } else {
    std::printf("skip  avx2 kernel: this CPU lacks AVX2/FMA/F16C\n");
  }
  if (has_avx512) {
    k.push_back({"avx512", avx512::update_range, avx512::sparse_update_range,
                 avx512::rowwise_update_range, avx512::unscale, true});
  } else {
    std::printf("skip  avx512 kernel: this CPU lacks AVX-512 F/BW/VL/DQ\n");
  }
#endif
  return k;
}

template <typename S>
unsigned long long show(S x) {
  return static_cast<unsigned long long>(bits(x));
}

// Compares two arrays bitwise; reports the first difference only.
template <typename S>
bool same(const char* what, const std::vector<S>& got, const std::vector<S>& want,
          const char* context) {
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(S)) != 0) {
      CHECK(false, "%s: %s[%zu] bits 0x%llx, want 0x%llx", context, what, i, show(got[i]),
            show(want[i]));
      return false;
    }
  }
  return true;
}

// ---- (c) dense element-wise update ----------------------------------------------------------
// One element, in the order documented above update_element (kernel_impl.h) and torch's
// single-tensor Adagrad: g = +-grad; g = round(fmadd(p, wd, g)); s = round(fmadd(g, g, s));
// std = round(round(sqrt(s)) + eps) or round(sqrt(round(s + eps))); p = p + (neg_clr * g) / std.
template <typename R>
void ref_update(typename R::S& p_s, typename R::S g_s, typename R::S& s_s, double neg_clr_d,
                double wd_d, double eps_d, bool maximize, bool inside, bool fma) {
  using M = typename R::M;
  M p = R::load(p_s), g = R::load(g_s), s = R::load(s_s);
  const M neg_clr = static_cast<M>(neg_clr_d), wd = R::hyper(wd_d), eps = R::hyper(eps_d);
  if (maximize) g = -g;
  if (wd_d != 0) g = R::round(mul_add(p, wd, g, fma));
  s = R::round(mul_add(g, g, s, fma));
  const M denom = inside ? R::round(std::sqrt(R::round(s + eps)))
                         : R::round(R::round(std::sqrt(s)) + eps);
  p = p + (neg_clr * g) / denom;
  p_s = R::store(p);
  s_s = R::store(s);
}

template <typename R>
void check_dense(const Kernel& kernel, int* cases) {
  using S = typename R::S;
  // Odd sizes: never a multiple of a vector width, some longer than 16 lanes, one longer than
  // two of update_run's blocks of vectors (up to 16 x 32 elements).
  const std::vector<int64_t> sizes = {1, 3, 17, 31, 7, 63, 129, 5, 1031};
  const double neg_clrs[] = {-0.01, -0.1, -0.0123456789, -1.0, -0.003, -0.5, -0.07, -0.2, -0.04};
  std::vector<int64_t> ends;
  int64_t total = 0;
  for (int64_t n : sizes) ends.push_back(total += n);
  // Thread-like partitions of [0, total): whole, and cut inside slices.
  const std::vector<std::vector<int64_t>> cuts = {{0, total}, {0, 10, 100, 101, 700, total}};
  // For half also 1e-4: 1e-10 is 0 in half, which takes update_run's zero-eps variants.
  std::vector<double> eps_values = {1e-10};
  if (R::kDtype == Dtype::Half) eps_values.push_back(1e-4);
  for (const double eps : eps_values) {
    for (int variant = 0; variant < 8; ++variant) {
      const bool maximize = variant & 4, wd_on = variant & 2, inside = variant & 1;
      const double wd = wd_on ? 0.05 : 0.0;
      for (size_t c = 0; c < cuts.size(); ++c) {
        Random rng{0x1234u + static_cast<uint64_t>(variant) * 131 + c};
        // Kernel state (k_*) and reference state (r_*), one array per slice.
        std::vector<std::vector<S>> kp, kg, ks, rp, rs;
        for (int64_t n : sizes) {
          std::vector<S> p(n), g(n), s(n);
          for (int64_t i = 0; i < n; ++i) {
            p[i] = R::store(static_cast<typename R::M>(rng.spread(-6, 1)));
            g[i] = R::store(static_cast<typename R::M>(rng.spread(-13, 2)));
            s[i] = R::store(static_cast<typename R::M>(rng.spread(-12, 1, true)));
          }
          kp.push_back(p), kg.push_back(g), ks.push_back(s), rp.push_back(p), rs.push_back(s);
        }
        std::vector<Slice> slices;
        for (size_t k = 0; k < sizes.size(); ++k) {
          slices.push_back({kp[k].data(), kg[k].data(), ks[k].data(), neg_clrs[k]});
        }
        const Update u{slices.data(), ends.data(), static_cast<int64_t>(sizes.size()), R::kDtype,
                       wd, eps, maximize, inside};
        for (int step = 1; step <= 3; ++step) {
          for (size_t j = 0; j + 1 < cuts[c].size(); ++j) kernel.update(u, cuts[c][j], cuts[c][j + 1]);
          for (size_t k = 0; k < sizes.size(); ++k) {
            for (int64_t i = 0; i < sizes[k]; ++i) {
              ref_update<R>(rp[k][i], kg[k][i], rs[k][i], neg_clrs[k], wd, eps, maximize, inside,
                            kernel.fma);
            }
          }
          char context[200];
          bool ok = true;
          for (size_t k = 0; k < sizes.size() && ok; ++k) {
            std::snprintf(context, sizeof context,
                          "%s kernel, %s, maximize=%d weight_decay=%g eps=%g eps_inside_sqrt=%d, "
                          "partition %zu, step %d, slice %zu (%lld elements)",
                          kernel.name, R::kName, maximize, wd, eps, inside, c, step, k,
                          static_cast<long long>(sizes[k]));
            ok = same("sum", ks[k], rs[k], context) && same("param", kp[k], rp[k], context);
          }
          ++*cases;
          if (!ok) break;  // later steps would only repeat the difference
        }
      }
    }
  }
}

// ---- (d) sparse element-wise update ---------------------------------------------------------
// torch's sparse path: duplicates summed in the param's dtype (coalesce), in grad order; then
// s = round(s + round(g * g)); std as dense; q = round(g / std); p = fma(neg_clr, q, p) for
// float/double (BLAS axpy), p + round(neg_clr * q) for half/bfloat16. neg_clr and eps are
// rounded to the param's dtype (they are scalars of the sparse add / the dense add).
// Twice: entries that are the grad's value rows (a COO grad), and entries that read rows of a
// wider buffer through value_row, each scaled and rounded to the dtype (an embedding bag's
// output grad times its per_sample_weight).
template <typename R>
void check_sparse(const Kernel& kernel, int* cases) {
  using S = typename R::S;
  using M = typename R::M;
  // Rows of 37 elements: a vector of each lane type (up to 32 elements) and a tail.
  constexpr int64_t n = 37, table_rows = 6;
  const std::vector<int64_t> grad_rows = {3, 1, 3, 0, 3};  // row 3 three times
  // Value rows sorted by table row, ties in grad order; distinct rows 0, 1, 3.
  const std::vector<int64_t> order = {3, 1, 0, 2, 4}, segments = {0, 1, 2, 5}, rows = {0, 1, 3};
  const std::vector<int64_t> bag_of = {2, 0, 1, 0, 2};  // the bags' entry rows, stride n + 3
  const double neg_clr_d = -0.0173, eps_d = R::kDtype == Dtype::Half ? 1e-4 : 1e-10;
  for (int variant = 0; variant < 8; ++variant) {
    const bool maximize = variant & 2, inside = variant & 1, bags = variant & 4;
    const int64_t stride = bags ? n + 3 : n;
    Random rng{0xabcdu + static_cast<uint64_t>(variant)};
    std::vector<S> p(table_rows * n), s(table_rows * n), values(grad_rows.size() * stride);
    std::vector<S> scale(grad_rows.size()), scratch(n);
    for (auto& x : p) x = R::store(static_cast<M>(rng.spread(-6, 1)));
    for (auto& x : s) x = R::store(static_cast<M>(rng.spread(-10, 1, true)));
    for (auto& x : values) x = R::store(static_cast<M>(rng.spread(-10, 1)));
    for (auto& x : scale) x = R::store(static_cast<M>(rng.spread(-2, 1)));
    std::vector<S> rp = p, rs = s;
    SparseUpdate u{p.data(), s.data(), values.data(), nullptr, n, nullptr, scratch.data(),
                   order.data(), segments.data(), rows.data(), n, R::kDtype, neg_clr_d,
                   0.0, eps_d, maximize, inside};
    if (bags) {
      u.value_row = bag_of.data();
      u.value_stride = stride;
      u.entry_scale = scale.data();
    }
    kernel.sparse(u, 0, 2);  // two "threads"
    kernel.sparse(u, 2, 3);
    const M neg_clr = R::hyper(neg_clr_d), eps = R::hyper(eps_d);
    for (int64_t row : {int64_t{0}, int64_t{1}, int64_t{3}}) {
      for (int64_t i = 0; i < n; ++i) {
        bool seen = false;
        S acc{};
        for (size_t j = 0; j < grad_rows.size(); ++j) {  // grad order
          if (grad_rows[j] != row) continue;
          const S v = bags ? R::store(R::round(R::load(values[bag_of[j] * stride + i]) * R::load(scale[j])))
                           : values[j * n + i];
          acc = seen ? R::store(R::load(acc) + R::load(v)) : v;
          seen = true;
        }
        M g = R::load(acc), pm = R::load(rp[row * n + i]), sm = R::load(rs[row * n + i]);
        if (maximize) g = -g;
        sm = R::round(sm + R::round(g * g));
        const M denom = inside ? R::round(std::sqrt(R::round(sm + eps)))
                               : R::round(R::round(std::sqrt(sm)) + eps);
        const M q = R::round(g / denom);
        pm = sizeof(S) == sizeof(M) ? std::fma(neg_clr, q, pm) : pm + R::round(neg_clr * q);
        rp[row * n + i] = R::store(pm);
        rs[row * n + i] = R::store(sm);
      }
    }
    char context[160];
    std::snprintf(context, sizeof context,
                  "%s kernel, sparse, %s, maximize=%d eps_inside_sqrt=%d bag entries=%d",
                  kernel.name, R::kName, maximize, inside, bags);
    same("sum", s, rs, context) && same("param", p, rp, context);
    ++*cases;
  }
}

// ---- (d) row-wise update (dense grads) ------------------------------------------------------
// Per row of n elements, in the math type, nothing rounded to the param's dtype before the store:
// g = +-grad + wd * p (rounded product, then add); squares summed into 8 interleaved lanes,
// then ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)); m += total / n; std = sqrt(m) + eps or
// sqrt(m + eps); p = p + (neg_clr / std) * g.
template <typename R>
void check_rowwise(const Kernel& kernel, int* cases) {
  using S = typename R::S;
  using M = typename R::M;
  // Slices: 4 rows of 11 (more than 8 lanes), 5 rows of 1 (the unit-row loop), 2 rows of 3.
  const std::vector<int64_t> row_lens = {11, 1, 3}, row_counts = {4, 5, 2};
  const double neg_clrs[] = {-0.01, -0.3, -0.0371};
  std::vector<int64_t> ends;
  int64_t total = 0;
  for (size_t k = 0; k < row_lens.size(); ++k) ends.push_back(total += row_lens[k] * row_counts[k]);
  for (int variant = 0; variant < 8; ++variant) {
    const bool maximize = variant & 4, wd_on = variant & 2, inside = variant & 1;
    const double wd = wd_on ? 0.05 : 0.0, eps_d = 1e-10;
    Random rng{0x5eedu + static_cast<uint64_t>(variant)};
    std::vector<std::vector<S>> p, g;
    std::vector<std::vector<M>> m;
    for (size_t k = 0; k < row_lens.size(); ++k) {
      std::vector<S> pk(row_lens[k] * row_counts[k]), gk(pk.size());
      std::vector<M> mk(row_counts[k]);
      for (auto& x : pk) x = R::store(static_cast<M>(rng.spread(-6, 1)));
      for (auto& x : gk) x = R::store(static_cast<M>(rng.spread(-10, 1)));
      for (auto& x : mk) x = static_cast<M>(rng.spread(-10, 1, true));
      p.push_back(pk), g.push_back(gk), m.push_back(mk);
    }
    std::vector<std::vector<S>> rp = p;
    std::vector<std::vector<M>> rm = m;
    std::vector<RowSlice> slices;
    for (size_t k = 0; k < row_lens.size(); ++k) {
      slices.push_back({p[k].data(), g[k].data(), m[k].data(), row_lens[k], neg_clrs[k]});
    }
    const RowUpdate u{slices.data(), ends.data(), static_cast<int64_t>(slices.size()), R::kDtype,
                      wd, eps_d, maximize, inside};
    // A range updates the rows whose first element lies in it: each row exactly once.
    kernel.rowwise(u, 0, 20);
    kernel.rowwise(u, 20, 47);
    kernel.rowwise(u, 47, total);
    const M wd_m = static_cast<M>(wd), eps = static_cast<M>(eps_d);
    for (size_t k = 0; k < row_lens.size(); ++k) {
      const int64_t n = row_lens[k];
      const M neg_clr = static_cast<M>(neg_clrs[k]);
      for (int64_t r = 0; r < row_counts[k]; ++r) {
        S* pr = rp[k].data() + r * n;
        const S* gr = g[k].data() + r * n;
        std::vector<M> gv(n);
        M lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t i = 0; i < n; ++i) {
          M gi = R::load(gr[i]);
          if (maximize) gi = -gi;
          if (wd_on) gi = gi + wd_m * R::load(pr[i]);
          gv[i] = gi;
          lane[i % 8] = lane[i % 8] + gi * gi;
        }
        const M sq = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
        const M acc = rm[k][r] + sq / static_cast<M>(n);
        rm[k][r] = acc;
        const M denom = inside ? std::sqrt(acc + eps) : std::sqrt(acc) + eps;
        const M scale = neg_clr / denom;
        for (int64_t i = 0; i < n; ++i) pr[i] = R::store(R::load(pr[i]) + scale * gv[i]);
      }
      char context[200];
      std::snprintf(context, sizeof context,
                    "%s kernel, row-wise, %s, maximize=%d weight_decay=%g eps_inside_sqrt=%d, "
                    "slice %zu (rows of %lld)",
                    kernel.name, R::kName, maximize, wd, inside, k, static_cast<long long>(n));
      same("sum", m[k], rm[k], context) && same("param", p[k], rp[k], context);
    }
    ++*cases;
  }
}

// ---- (e) unscaling ---------------------------------------------------------------------------
// grad = round(grad / scale) in the math type, for scales that the kernel multiplies by the
// reciprocal of (powers of two with a normal reciprocal) and those it divides by (any other,
// 2^127 and 2^-149 among them), over grads from subnormal to overflow, zeros, infs and NaNs;
// and a NaN scale with a payload bfloat16 cannot hold, which must make every grad a NaN.
template <typename R>
void check_unscale(const Kernel& kernel, int* cases) {
  using S = typename R::S;
  using M = typename R::M;
  const float scales[] = {65536.0f, 0.5f, 0x1p-126f, 0x1p126f, 3.0f, 1e-3f, 0x1p127f, 0x1p-149f,
                          -8.0f};
  for (const int64_t n : {1, 7, 17, 64, 129}) {
    for (const float scale : scales) {
      Random rng{0xa3u + static_cast<uint64_t>(n)};
      std::vector<S> g(n);
      for (int64_t i = 0; i < n; ++i) g[i] = R::store(static_cast<M>(rng.spread(-30, 30)));
      if (n > 3) {
        g[1] = R::store(std::numeric_limits<M>::infinity());
        g[2] = R::store(std::numeric_limits<M>::quiet_NaN());
      }
      std::vector<S> want(g);
      for (S& x : want) x = R::store(R::load(x) / static_cast<M>(scale));
      kernel.unscale(R::kDtype, g.data(), n, scale);
      char context[128];
      std::snprintf(context, sizeof context, "%s, %s, n=%lld, scale %a", kernel.name, R::kName,
                    static_cast<long long>(n), scale);
      same("grad", g, want, context);
      ++*cases;
    }
  }
  float nan_scale;
  const uint32_t nan_bits = 0x7fffffffu;  // rounding it to bfloat16 carries out of the NaN
  std::memcpy(&nan_scale, &nan_bits, sizeof nan_scale);
  std::vector<S> g(33, R::store(static_cast<M>(1.5)));
  kernel.unscale(R::kDtype, g.data(), static_cast<int64_t>(g.size()), nan_scale);
  for (size_t i = 0; i < g.size(); ++i) {
    const M x = R::load(g[i]);
    CHECK(x != x, "%s, %s, NaN scale: grad[%zu] bits 0x%llx, want a NaN", kernel.name, R::kName,
          i, show(g[i]));
  }
  ++*cases;
}

template <typename Fn>
void for_each_dtype(Fn fn) {
  fn(RefF32{});
  fn(RefF64{});
  fn(RefF16{});
  fn(RefBF16{});
}

}  // namespace

int main(int argc, char** argv) {
  uint32_t stride = 257;
  if (argc > 1) stride = static_cast<uint32_t>(std::strtoul(argv[1], nullptr, 0));
  if (stride % 2 == 0) {
    std::fprintf(stderr, "kernel_check: the stride must be odd (coprime with 2^32), got %u\n", stride);
    return 2;
  }
#if defined(__aarch64__)
  std::printf("kernel_check: aarch64 build (F16 through the hardware conversions, FMA in base)\n");
#elif defined(__x86_64__)
  std::printf("kernel_check: x86-64 build\n");
#else
  std::printf("kernel_check: portable build\n");
#endif
  using check::BF16;
  using check::F16;

  section("(a) half loads, all 65536 patterns", [] { check_loads<F16>(kHalf); });
  section("(a) bfloat16 loads, all 65536 patterns", [] { check_loads<BF16>(kBFloat16); });
  section("(a) bfloat16 store_rounded() of all 65536 patterns",
          [] { check_rounded_stores<BF16>(kBFloat16); });
  uint64_t half_count = 0, bf16_count = 0;
  section("(b) half stores and round()", [&] { check_stores<F16>(kHalf, stride, &half_count); });
  std::printf("      %llu float patterns (stride %u, every halfway point, edge cases)\n",
              static_cast<unsigned long long>(half_count), stride);
  section("(b) bfloat16 stores and round()",
          [&] { check_stores<BF16>(kBFloat16, stride, &bf16_count); });
  std::printf("      %llu float patterns (stride %u, every halfway point, edge cases)\n",
              static_cast<unsigned long long>(bf16_count), stride);

  uint64_t hyper_count = 0;
  section("(b) half and bfloat16 hyper() of doubles", [&] {
    check_hyper<F16>(kHalf, &hyper_count);
    check_hyper<BF16>(kBFloat16, &hyper_count);
  });
  std::printf("      %llu doubles\n", static_cast<unsigned long long>(hyper_count));
  section("(b) half and bfloat16 rounded_sqrt(), all 65536 patterns", [] {
    check_rounded_sqrt<F16>(kHalf);
    check_rounded_sqrt<BF16>(kBFloat16);
  });
#if KERNEL_F16_QUADS
  section("(a) half loads, F16Quad (portable x86-64 vectors), all 65536 patterns",
          [] { check_loads<QuadF16>(kHalf); });
  uint64_t quad_count = 0;
  section("(b) half stores, store_round() and round(), F16Quad",
          [&] { check_stores<QuadF16>(kHalf, stride, &quad_count); });
  std::printf("      %llu float patterns\n", static_cast<unsigned long long>(quad_count));
  section("(b) half rounded_sqrt(), F16Quad, all 65536 patterns",
          [] { check_rounded_sqrt<QuadF16>(kHalf); });
#endif

  for (const Kernel& kernel : kernels()) {
    char name[160];
    int cases = 0;
    std::snprintf(name, sizeof name, "(c) update_range, %s kernel (fma %s), 4 dtypes x 8 option sets",
                  kernel.name, kernel.fma ? "on" : "off");
    section(name, [&] { for_each_dtype([&](auto r) { check_dense<decltype(r)>(kernel, &cases); }); });
    std::snprintf(name, sizeof name, "(d) sparse_update_range, %s kernel, 4 dtypes x 4 option sets x 2 entry kinds",
                  kernel.name);
    section(name, [&] { for_each_dtype([&](auto r) { check_sparse<decltype(r)>(kernel, &cases); }); });
    std::snprintf(name, sizeof name, "(d) rowwise_update_range, %s kernel, 4 dtypes x 8 option sets",
                  kernel.name);
    section(name, [&] { for_each_dtype([&](auto r) { check_rowwise<decltype(r)>(kernel, &cases); }); });
    std::snprintf(name, sizeof name, "(e) unscale, %s kernel, 4 dtypes x 9 scales and a NaN", kernel.name);
    section(name, [&] { for_each_dtype([&](auto r) { check_unscale<decltype(r)>(kernel, &cases); }); });
  }

  if (g_failures > 0) {
    std::printf("kernel_check: FAILED, %lld failed checks%s\n", static_cast<long long>(g_failures),
                g_failures > kMaxPrinted ? " (the first ones printed above)" : "");
    return 1;
  }
  std::printf("kernel_check: all checks passed\n");
  return 0;
}

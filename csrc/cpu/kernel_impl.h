// The Adagrad element update, written once. Included by kernel_{base,avx2,avx512}.cpp after
// each selects its ISA with `#pragma GCC target`; the compiler vectorizes the loop for that ISA
// (float16 and bfloat16 get hand-written vectors in the x86 SIMD builds, see F16Lanes and
// BF16Lanes, and float16 in the portable x86-64 build, see F16Quad).
// Everything here has internal linkage and uses builtins and intrinsics, not std:: templates, so
// no function compiled for AVX-512 can be merged by the linker into the code path of an older CPU.
// The build passes -ffp-contract=off (no FMA unless written) and -fno-math-errno (lets sqrt
// vectorize).

// Included after `kernel.h` and <cstdint>, <cstring> (and <immintrin.h> where KERNEL_F16_LANES)
// by the including file, before its pragma.
#if !KERNEL_F16_LANES && !defined(__aarch64__) && defined(__SSE2__)
#include <emmintrin.h>  // SSE2, x86-64's baseline, for F16Quad (never under a target pragma)
#endif
namespace fused_adagrad::cpu::KERNEL_NAMESPACE {
namespace {

// ATen's Vectorized<T>::fmadd is a fused multiply-add on AVX2/AVX-512 and on aarch64 (NEON's
// vfmaq), and a*b+c (two roundings) on x86's portable build. torch's addcmul_ and add(alpha=)
// use it, so we use it at the same places and stay bitwise equal to
// torch.optim.Adagrad(foreach=False) on every kind of CPU (KERNEL_HAS_FMA, set per build).
#if KERNEL_HAS_FMA
inline float fmadd(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline double fmadd(double a, double b, double c) { return __builtin_fma(a, b, c); }
#else
inline float fmadd(float a, float b, float c) { return a * b + c; }
inline double fmadd(double a, double b, double c) { return a * b + c; }
#endif
inline float sqrt_(float x) { return __builtin_sqrtf(x); }
inline double sqrt_(double x) { return __builtin_sqrt(x); }
// Vectors of floats for the half loop (F16Lanes below), in builds with F16C and FMA: the only
// width-specific code. Halves travel as the integer vector of the same lane count.
#if KERNEL_F16_LANES == 16
using FloatLanes = __m512;
using HalfLanes = __m256i;
inline FloatLanes fmadd(FloatLanes a, FloatLanes b, FloatLanes c) { return _mm512_fmadd_ps(a, b, c); }
inline FloatLanes sqrt_(FloatLanes x) { return _mm512_sqrt_ps(x); }
inline FloatLanes splat(float x) { return _mm512_set1_ps(x); }
inline FloatLanes widen(HalfLanes h) { return _mm512_cvtph_ps(h); }
inline HalfLanes narrow(FloatLanes v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); }
inline HalfLanes load_halves(const void* x) { return _mm256_loadu_si256(static_cast<const HalfLanes*>(x)); }
inline void store_halves(void* x, HalfLanes h) { _mm256_storeu_si256(static_cast<HalfLanes*>(x), h); }
#elif KERNEL_F16_LANES == 8
using FloatLanes = __m256;
using HalfLanes = __m128i;
inline FloatLanes fmadd(FloatLanes a, FloatLanes b, FloatLanes c) { return _mm256_fmadd_ps(a, b, c); }
inline FloatLanes sqrt_(FloatLanes x) { return _mm256_sqrt_ps(x); }
inline FloatLanes splat(float x) { return _mm256_set1_ps(x); }
inline FloatLanes widen(HalfLanes h) { return _mm256_cvtph_ps(h); }
inline HalfLanes narrow(FloatLanes v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); }
inline HalfLanes load_halves(const void* x) { return _mm_loadu_si128(static_cast<const HalfLanes*>(x)); }
inline void store_halves(void* x, HalfLanes h) { _mm_storeu_si128(static_cast<HalfLanes*>(x), h); }
#elif !defined(__aarch64__) && defined(__SSE2__)
// The portable x86-64 build: SSE2's four floats, for F16Quad (its baseline converts no halves).
#define KERNEL_F16_QUADS 1
#if KERNEL_HAS_FMA
#error "x86-64's baseline has no FMA"
#endif
typedef float FloatLanes __attribute__((vector_size(16)));
inline FloatLanes fmadd(FloatLanes a, FloatLanes b, FloatLanes c) { return a * b + c; }
inline FloatLanes sqrt_(FloatLanes x) { return __builtin_ia32_sqrtps(x); }
inline FloatLanes splat(float x) { return FloatLanes{} + x; }
#endif
#if KERNEL_F16_LANES || KERNEL_F16_QUADS
#define KERNEL_HAS_LANES 1
// FloatLanes as 32-bit and as 16-bit integers, for bit arithmetic in any width (vector
// extensions: an operator acts lane by lane, a scalar operand on every lane).
typedef uint32_t BitLanes __attribute__((vector_size(sizeof(FloatLanes))));
typedef int32_t SignedLanes __attribute__((vector_size(sizeof(FloatLanes))));
typedef int16_t HalfwordLanes __attribute__((vector_size(sizeof(FloatLanes))));
#endif

// Storage type S <-> math type M. Half and bfloat16 compute in float and round only on store.
// `hyper` is how torch (for-loop and fused alike) turns a double hyperparameter into a value of
// the param's type: weight_decay and eps are rounded to half/bfloat16 first. With weight decay,
// g + wd * p often cancels, so that rounding shows in the result and we must do the same.
// `rounded_sqrt(x)` is round(sqrt(x)) for an x that round() returned (or a loaded value).
struct F32 {
  static constexpr bool kFmaWeightDecay = true;
  using S = float;
  using M = float;
  static M load(S x) { return x; }
  static S store(M x) { return x; }
  static M hyper(double x) { return static_cast<M>(x); }
  static M round(M x) { return x; }
  static M rounded_sqrt(M x) { return sqrt_(x); }
};
struct F64 {
  static constexpr bool kFmaWeightDecay = true;
  using S = double;
  using M = double;
  static M load(S x) { return x; }
  static S store(M x) { return x; }
  static M hyper(double x) { return x; }
  static M round(M x) { return x; }
  static M rounded_sqrt(M x) { return sqrt_(x); }
};
// Real views of complex64/complex128.
struct C32 : F32 {
  static constexpr bool kFmaWeightDecay = false;
};
struct C64 : F64 {
  static constexpr bool kFmaWeightDecay = false;
};
inline float float_from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline uint32_t bits_of_float(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}
#if KERNEL_HAS_LANES
inline FloatLanes float_from_bits(BitLanes bits) { return (FloatLanes)bits; }
inline BitLanes bits_of_float(FloatLanes f) { return (BitLanes)f; }
#endif
// The float (lanes) of these bits, and the other way.
template <typename Bits>
using FloatOf = decltype(float_from_bits(Bits{}));
template <typename Float>
using BitsOf = decltype(bits_of_float(Float{}));
// All ones where a > b, else 0, for a uint32_t or lane by lane. Signed: the values compared are
// below 2^31, and SSE2, the portable build's x86 target, has no unsigned 32-bit compare (it
// emulates one in several instructions).
inline uint32_t mask_greater(uint32_t a, int32_t b) {
  return 0u - static_cast<uint32_t>(static_cast<int32_t>(a) > b);
}
inline uint32_t shift_right_signed(uint32_t a, int bits) {
  return static_cast<uint32_t>(static_cast<int32_t>(a) >> bits);
}
#if KERNEL_HAS_LANES
inline BitLanes mask_greater(BitLanes a, int32_t b) { return (BitLanes)((SignedLanes)a > b); }
inline BitLanes shift_right_signed(BitLanes a, int bits) { return (BitLanes)((SignedLanes)a >> bits); }
#endif
// a where mask is all ones, b where it is 0 (a or b may be a scalar, for every lane).
template <typename Bits, typename A, typename B>
inline Bits select(Bits mask, A a, B b) {
  return (mask & a) | (~mask & b);
}
// The bits of a float (or of lanes of them) with the low kBits rounded off, to nearest even: a
// carry out of the mantissa moves to the exponent, as it should.
template <int kBits, typename Bits>
inline Bits round_low_bits(Bits bits) {
  return (bits + ((1u << (kBits - 1)) - 1u) + ((bits >> kBits) & 1u)) & ~((1u << kBits) - 1u);
}

#if defined(__aarch64__)
// IEEE binary16 (c10::Half) through Armv8's own conversions (FCVT, which the loops vectorize as
// FCVTL/FCVTN; every Armv8-A CPU has them). __fp16 is a storage-only type: its arithmetic
// promotes to float, so each cast below is exactly one conversion, rounded to nearest even
// (FPCR's default mode, which Linux leaves set: no flush to zero, IEEE rather than alternative
// half format). Every non-NaN value loads, stores and rounds exactly as with the x86 version
// below (tests/kernel_check checks all 65 536 halves and a sweep of floats). A NaN stays a NaN
// of the same sign, but the hardware keeps the top bits of its payload (quieted) where the x86
// version makes every NaN 0x7e00 with its sign.
struct F16 {
  static constexpr bool kFmaWeightDecay = true;
  using S = uint16_t;  // bit pattern of c10::Half
  using M = float;
  static M load(S h) {
    __fp16 x;
    std::memcpy(&x, &h, sizeof x);
    return static_cast<M>(x);
  }
  static S store(M f) {
    const __fp16 x = static_cast<__fp16>(f);
    S h;
    std::memcpy(&h, &x, sizeof h);
    return h;
  }
  static M round(M f) { return static_cast<M>(static_cast<__fp16>(f)); }
  static M rounded_sqrt(M x) { return round(sqrt_(x)); }
  // Through float first, as c10::Half(double) does (a direct double -> half cast rounds once).
  static M hyper(double x) { return round(static_cast<float>(x)); }
};
#else
// IEEE binary16 (c10::Half) by integer and float arithmetic only, with no branches, so the loop
// vectorizes on every build. (GCC 12 turns _Float16 conversions into libgcc calls unless the
// CPU has AVX512-FP16, and F16C intrinsics would not exist on the portable build: either way
// the step ran 10x slower than fp32.) The members take a float and its uint32_t bits, or
// FloatLanes and BitLanes: F16Quad runs this same code on vectors.
struct F16 {
  static constexpr bool kFmaWeightDecay = true;
  using S = uint16_t;  // bit pattern of c10::Half
  using M = float;
  // The value of the half in the low 16 bits of h (the high bits 0).
  template <typename Bits>
  static FloatOf<Bits> decode(Bits h) {
    const Bits sign = (h & 0x8000u) << 16;
    const Bits magnitude = h & 0x7fffu;
    // Normal, inf and NaN: exponent and mantissa move to a float's place; adding 224 to the
    // exponent field and scaling by 2^-112 rebiases it (15 -> 127) and maps 31 to 255.
    const auto normal = float_from_bits((magnitude << 13) + (224u << 23)) * 0x1p-112f;
    // Subnormal (exponent 0): m * 2^-24, got exactly as (0.5 + m * 2^-24) - 0.5.
    const auto subnormal = float_from_bits(magnitude | (126u << 23)) - 0.5f;
    // A select by mask, not `?:`: GCC would move each float operation into its branch, and
    // then not vectorize the loop (a float operation may trap, so it is not run unasked; the
    // 10x slower portable float16 step of issue 13).
    return float_from_bits(sign | select(mask_greater(magnitude, 0x03ff), bits_of_float(normal),
                                         bits_of_float(subnormal)));
  }
  // The half's bits in the low 16 bits, and copies of its sign above: round to nearest even,
  // overflow to inf, NaN to the quiet NaN 0x7e00 with its sign.
  template <typename Float>
  static BitsOf<Float> encode(Float f) {
    const auto bits = bits_of_float(f);
    const Float scaled = scaled_magnitude(bits);
    return half_bits(bits, bias(scaled) + scaled);
  }
  // load(store(x)) without leaving float, for the intermediates torch rounds to half: fewer
  // operations than a store and a load, and the step rounds up to four times per element.
  template <typename Float>
  static Float round(Float f) {
    const auto bits = bits_of_float(f);
    const Float scaled = scaled_magnitude(bits);
    const Float b = bias(scaled);
    return rounded(bits, b + scaled, b);
  }
  // round(f), with encode() of it in `half`: one rounded sum for both (the sum's store).
  template <typename Float>
  static Float round_encode(Float f, BitsOf<Float>* half) {
    const auto bits = bits_of_float(f);
    const Float scaled = scaled_magnitude(bits);
    const Float b = bias(scaled);
    *half = half_bits(bits, b + scaled);
    return rounded(bits, b + scaled, b);
  }
  // The square root of a half is +-0, inf, NaN or in [2^-12, 256], where halves are normal: its
  // rounding to half is the float's mantissa rounded to 11 bits, with no subnormal or overflow
  // case (a NaN keeps its bits: every NaN here has its low 13 bits 0, as in BF16::round).
  template <typename Float>
  static Float rounded_sqrt(Float x) {
    return float_from_bits(round_low_bits<13>(bits_of_float(sqrt_(x))));
  }
  static M load(S h) { return decode(static_cast<uint32_t>(h)); }
  static S store(M f) { return static_cast<S>(encode(f)); }
  static M hyper(double x) { return round(static_cast<float>(x)); }

 private:
  // The rounding: bias + 4|f| rounds 4|f| to a half's precision in the float's low mantissa
  // bits, with bias = 2^(e+13), e the exponent of 4|f|, at least that of 4 * 2^-14 (half's
  // smallest normal, below which a half's precision is fixed). The scaling of |f| makes it inf
  // from 2^16 up, as a half overflows; the bias of inf or NaN (exponent field 255) then wraps
  // to a tiny negative float, which leaves inf an inf, and no bias is inf (no inf - inf). The
  // clamp is a select by a "greater" mask: SSE2, the portable build's target, has no "less"
  // compare and no 32-bit max.
  template <typename Bits>
  static FloatOf<Bits> scaled_magnitude(Bits bits) {
    return (float_from_bits(bits & 0x7fffffffu) * 0x1p112f) * 0x1p-110f;
  }
  template <typename Float>
  static Float bias(Float scaled) {
    const auto exponent = bits_of_float(scaled) & 0x7f800000u;
    return float_from_bits(select(mask_greater(exponent, (115 << 23) - 1), exponent, 115u << 23) +
                           (13u << 23));
  }
  template <typename Bits>
  static Bits half_bits(Bits bits, FloatOf<Bits> sum) {
    const Bits sum_bits = bits_of_float(sum);
    // The sum's exponent field, mod 32, is the half's exponent minus one; the mantissa's
    // leading 1 (bit 10) adds that one back, and a rounding carry propagates on its own.
    const Bits half = ((sum_bits >> 13) & 0x7c00u) + (sum_bits & 0x0fffu);
    const Bits sign = shift_right_signed(bits, 16) & 0xffff8000u;  // for a signed 16-bit pack
    return sign | select(mask_greater(bits & 0x7fffffffu, 0x7f800000), 0x7e00u, half);
  }
  // Exact: the rounded 4|f| has at most 11 significant bits. Scaling it by 2^110 and then by
  // 2^-112 is the division by 4 that also makes 65536 (what 65520 <= |f| < 65536 round to)
  // inf, as a half overflows: two multiplications instead of a compare and a select.
  template <typename Bits>
  static FloatOf<Bits> rounded(Bits bits, FloatOf<Bits> sum, FloatOf<Bits> bias) {
    const auto r = ((sum - bias) * 0x1p110f) * 0x1p-112f;
    return float_from_bits(bits_of_float(r) | (bits & 0x80000000u));
  }
};
#endif  // defined(__aarch64__)
#if KERNEL_F16_LANES
// KERNEL_F16_LANES halves at a time through the CPU's own conversions (F16C / AVX-512F): F16's
// bit arithmetic vectorizes, but at four conversions per element the step was compute bound
// on 2 cores. Same rounding (to nearest even) as F16 for every number; NaN payloads may differ.
struct F16Lanes {
  static constexpr bool kFmaWeightDecay = true;
  static constexpr int kWidth = KERNEL_F16_LANES;
  using M = FloatLanes;
  static M broadcast(float x) { return splat(x); }
  static M load(const uint16_t* x) { return widen(load_halves(x)); }
  static void store(uint16_t* x, M v) { store_halves(x, narrow(v)); }
  static M round(M v) { return widen(narrow(v)); }
  // F16::rounded_sqrt in integer lanes, instead of two conversions, which bound the step.
  static M rounded_sqrt(M x) { return F16::rounded_sqrt(x); }
  // Stores round(v) and returns it: one conversion fewer than round() and store().
  static M store_round(uint16_t* x, M v) {
    const HalfLanes h = narrow(v);
    store_halves(x, h);
    return widen(h);
  }
};
#endif
#if KERNEL_F16_QUADS
// F16 four halves at a time: F16's own code on vectors, for the portable x86-64 build. (GCC
// vectorized F16's scalar loop there too, but eight elements at a time with 16-bit compares,
// widening shuffles and spills: 61 instructions per element, where this takes 37.6.)
struct F16Quad {
  static constexpr bool kFmaWeightDecay = true;
  static constexpr int kWidth = 4;
  using M = FloatLanes;
  static M broadcast(float x) { return splat(x); }
  // Widening and narrowing by hand: GCC's __builtin_convertvector made five shuffles of each.
  static M load(const uint16_t* x) {
    const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(x));
    return F16::decode((BitLanes)_mm_unpacklo_epi16(h, _mm_setzero_si128()));
  }
  static void store(uint16_t* x, M v) { store_bits(x, F16::encode(v)); }
  static M round(M v) { return F16::round(v); }
  static M rounded_sqrt(M x) { return F16::rounded_sqrt(x); }
  static M store_round(uint16_t* x, M v) {
    BitLanes half;
    const M r = F16::round_encode(v, &half);
    store_bits(x, half);
    return r;
  }

 private:
  // encode()'s lanes are sign-extended from bit 15, so a signed pack keeps their low halves.
  static void store_bits(uint16_t* x, BitLanes half) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(x), _mm_packs_epi32((__m128i)half, (__m128i)half));
  }
};
#endif
struct BF16 {
  static constexpr bool kFmaWeightDecay = true;
  using S = uint16_t;  // bit pattern of c10::BFloat16
  using M = float;
  static M load(S x) { return float_from_bits(static_cast<uint32_t>(x) << 16); }
  // Round to nearest even, NaN to the canonical quiet NaN: c10::BFloat16's rounding.
  static S store(M f) {
    const uint32_t bits = bits_of_float(f);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return f != f ? uint16_t{0x7fc0} : static_cast<uint16_t>(rounded);
  }
  // store() of a value already on the bfloat16 grid (what round() returned): its high half.
  static S store_rounded(M f) {
    return f != f ? uint16_t{0x7fc0} : static_cast<uint16_t>(bits_of_float(f) >> 16);
  }
  static M hyper(double x) { return load(store(static_cast<float>(x))); }
  // load(store(x)) for the intermediates, without store()'s NaN test: in this kernel every NaN
  // comes from a bfloat16 operand or is the default NaN, so its low 16 bits are 0 and adding at
  // most 0x8000 to them cannot carry into the exponent: a NaN stays a NaN. (The stores still
  // canonicalize NaN, as torch's do.) Two instructions fewer per rounding, three per element.
  static M round(M x) { return float_from_bits(round_low_bits<16>(bits_of_float(x))); }
  static M rounded_sqrt(M x) { return round(sqrt_(x)); }
};
#if KERNEL_F16_LANES
// Two FloatLanes: the even and the odd elements of BF16Lanes::kWidth consecutive bfloat16, with
// the float operations of the step, lane by lane.
struct EvenOdd {
  FloatLanes even, odd;
};
inline EvenOdd operator+(EvenOdd a, EvenOdd b) { return {a.even + b.even, a.odd + b.odd}; }
inline EvenOdd operator*(EvenOdd a, EvenOdd b) { return {a.even * b.even, a.odd * b.odd}; }
inline EvenOdd operator/(EvenOdd a, EvenOdd b) { return {a.even / b.even, a.odd / b.odd}; }
inline EvenOdd operator-(EvenOdd a) { return {-a.even, -a.odd}; }
inline EvenOdd fmadd(EvenOdd a, EvenOdd b, EvenOdd c) {
  return {fmadd(a.even, b.even, c.even), fmadd(a.odd, b.odd, c.odd)};
}
inline EvenOdd sqrt_(EvenOdd x) { return {sqrt_(x.even), sqrt_(x.odd)}; }

// BF16 on 2 * KERNEL_F16_LANES elements at a time. A bfloat16 is the high half of a float, so one
// load gives the even elements by a shift and the odd ones by a mask, and a store merges them
// the same way: no lane-crossing shuffle. (GCC vectorized BF16's loop with widening and
// narrowing shuffles, which with the bit arithmetic of the roundings made the AVX2 step compute
// bound.) Same bits as BF16, NaN included, for floats whose NaNs have their low 16 bits 0, as
// round() assumes (see BF16::round): store() canonicalizes NaNs after rounding.
struct BF16Lanes {
  static constexpr bool kFmaWeightDecay = true;
  static constexpr int kWidth = 2 * KERNEL_F16_LANES;
  using M = EvenOdd;
  static M broadcast(float x) { return {splat(x), splat(x)}; }
  static M load(const uint16_t* x) {
    BitLanes bits;
    std::memcpy(&bits, x, sizeof bits);
    return {float_from_bits(bits << 16), float_from_bits(bits & 0xffff0000u)};
  }
  static void store(uint16_t* x, M v) { store_rounded(x, round(v)); }
  static M round(M v) { return {round_lanes(v.even), round_lanes(v.odd)}; }
  static M rounded_sqrt(M x) { return round(sqrt_(x)); }
  static M store_round(uint16_t* x, M v) {
    const M r = round(v);
    store_rounded(x, r);
    return r;
  }

 private:
  static FloatLanes round_lanes(FloatLanes v) {
    return float_from_bits(round_low_bits<16>(bits_of_float(v)));
  }
  // BF16::store_rounded per element, the NaN test made on the bfloat16: round() keeps a NaN a
  // NaN (see BF16::round), and a 16-bit test covers all the elements at once.
  static void store_rounded(uint16_t* x, M r) {
    const BitLanes merged = (bits_of_float(r.even) >> 16) | bits_of_float(r.odd);
    const HalfwordLanes h = (HalfwordLanes)merged;
    const HalfwordLanes is_nan = (h & 0x7fff) > 0x7f80;
    const HalfwordLanes canonical = (h & ~is_nan) | (0x7fc0 & is_nan);
    std::memcpy(x, &canonical, sizeof canonical);
  }
};
#endif

// store() of a value that T::round() returned: the same bits, cheaper where the type allows.
template <typename T>
struct RoundedStore {
  static typename T::S store(typename T::M x) { return T::store(x); }
};
template <>
struct RoundedStore<BF16> {
  static BF16::S store(BF16::M x) { return BF16::store_rounded(x); }
};

// The grad term of the step: the grad with maximize's sign, plus weight decay.
template <typename T, bool kMaximize, bool kWeightDecay, typename M>
inline M decayed_grad(M p, M g, M weight_decay) {
  if constexpr (kMaximize) g = -g;
  if constexpr (kWeightDecay) {
    g = T::round(T::kFmaWeightDecay ? fmadd(p, weight_decay, g) : p * weight_decay + g);
  }
  return g;
}

// sqrt(sum), or sqrt(sum + eps) with eps inside, rounded, from the new sum s (already rounded
// to the storage type). kEpsZero: eps is 0 in the storage type (float16's default: 1e-10
// rounds to 0), so s + eps is s (or +0 for -0), already on the storage type's grid, and its
// rounding can be skipped: the same bits for one conversion fewer.
template <typename T, bool kEpsInsideSqrt, bool kEpsZero = false, typename M>
inline M rounded_root(M s, M eps) {
  if constexpr (kEpsInsideSqrt) {
    return T::rounded_sqrt(kEpsZero ? s + eps : T::round(s + eps));
  } else {
    return T::rounded_sqrt(s);
  }
}

// std, from rounded_root's value (on the storage type's grid, hence kEpsZero as above).
template <typename T, bool kEpsInsideSqrt, bool kEpsZero = false, typename M>
inline M denominator(M root, M eps) {
  if constexpr (kEpsInsideSqrt) {
    return root;
  } else {
    return kEpsZero ? root + eps : T::round(root + eps);
  }
}

// Whether update_run has variants for an eps that is 0 in the storage type: for float16, where
// the default eps is, and a rounding costs the most (float and double round for free).
template <typename T>
struct HasZeroEpsVariants {
  static constexpr bool kValue = false;
};
template <>
struct HasZeroEpsVariants<F16> {
  static constexpr bool kValue = true;
};

// The order of operations is torch's single-tensor path:
//   g = maximize ? -grad : grad;  g = g + wd * p  (fmadd);  sum = sum + g * g  (fmadd);
//   std = sqrt(sum) + eps;  p = p + ((-clr) * g) / std.
// `sum` is therefore bitwise torch's. `p` is bitwise torch's except where torch's sqrt is not
// correctly rounded: torch.sqrt on CPU goes through MKL's vsSqrt when torch is built with MKL,
// and on some CPUs (the AMD EPYC of our dev machine) that result is faithfully but not correctly
// rounded (up to 0.75 ulp; 15 % of fp32 elements differ by 1 ulp from IEEE sqrt). We use the
// IEEE sqrt, as torch's own fused=True kernel does; p then stays within 2 ulp per step of
// torch's for-loop, and is bitwise equal to it wherever its for-loop and fused=True agree.
// For half and bfloat16, torch's for-loop stores each of those intermediates (g, sum, sqrt,
// std) as a tensor of the param's dtype; T::round does the same in registers, so the numbers
// match torch's while the arithmetic between the roundings is float. The vector loop of
// update_run takes the same steps (decayed_grad, the sum, rounded_root, denominator, p).
template <typename T, bool kMaximize, bool kWeightDecay, bool kEpsInsideSqrt, bool kEpsZero,
          typename M>
inline void update_element(M& p, M g, M& s, M neg_clr, M weight_decay, M eps) {
  g = decayed_grad<T, kMaximize, kWeightDecay>(p, g, weight_decay);
  s = T::round(fmadd(g, g, s));
  const M root = rounded_root<T, kEpsInsideSqrt, kEpsZero>(s, eps);
  p = p + (neg_clr * g) / denominator<T, kEpsInsideSqrt, kEpsZero>(root, eps);
}

// A storage type whose loops run on hand-written vectors first (the rest, element by element).
// V works on V::kWidth elements at a time in a V::M, with the scalar type's members
// (kFmaWeightDecay, load, store, round, rounded_sqrt), broadcast(float), a V::M of one value,
// and store_round(S*, M), which stores round() of its argument and returns it.
template <typename T>
struct VectorOf {
  static constexpr bool kExists = false;
};
#if KERNEL_F16_LANES
template <>
struct VectorOf<F16> {
  static constexpr bool kExists = true;
  using V = F16Lanes;
};
template <>
struct VectorOf<BF16> {
  static constexpr bool kExists = true;
  using V = BF16Lanes;
};
#endif
#if KERNEL_F16_QUADS
template <>
struct VectorOf<F16> {
  static constexpr bool kExists = true;
  using V = F16Quad;
};
#endif

template <typename T, bool kMaximize, bool kWeightDecay, bool kEpsInsideSqrt, bool kEpsZero>
void update_run(typename T::S* __restrict param, const typename T::S* __restrict grad,
                typename T::S* __restrict sum, int64_t n, typename T::M neg_clr,
                typename T::M weight_decay, typename T::M eps) {
  using M = typename T::M;
  int64_t i = 0;
  if constexpr (VectorOf<T>::kExists) {
    using V = typename VectorOf<T>::V;
    using VM = typename V::M;
    const VM v_neg_clr = V::broadcast(neg_clr), v_wd = V::broadcast(weight_decay),
             v_eps = V::broadcast(eps);
    // Blocks of up to kBlock vectors in two passes: the sums and their roots, then the
    // denominators and the params. In one pass each vector is one long chain of dependent
    // latency (roundings, sqrt, division) and too few vectors were in flight; split between the
    // sqrt and the division, the step is 20-25 % faster on Zen 4 (AVX2 and AVX-512, float16 and
    // bfloat16; 8 vectors a block were slower, 32 no faster, a third pass no faster).
    constexpr int64_t kBlock = 16;
    VM numer[kBlock], root[kBlock];
    while (i + V::kWidth <= n) {
      const int64_t vectors = (n - i) / V::kWidth < kBlock ? (n - i) / V::kWidth : kBlock;
      for (int64_t b = 0; b < vectors; ++b) {
        const int64_t j = i + b * V::kWidth;
        const VM g = decayed_grad<V, kMaximize, kWeightDecay>(V::load(param + j),
                                                              V::load(grad + j), v_wd);
        const VM s = V::store_round(sum + j, fmadd(g, g, V::load(sum + j)));
        numer[b] = v_neg_clr * g;
        root[b] = rounded_root<V, kEpsInsideSqrt, kEpsZero>(s, v_eps);
      }
      for (int64_t b = 0; b < vectors; ++b) {
        const int64_t j = i + b * V::kWidth;
        const VM denom = denominator<V, kEpsInsideSqrt, kEpsZero>(root[b], v_eps);
        V::store(param + j, V::load(param + j) + numer[b] / denom);
      }
      i += vectors * V::kWidth;
    }
  }
  for (; i < n; ++i) {
    M p = T::load(param[i]), s = T::load(sum[i]);
    update_element<T, kMaximize, kWeightDecay, kEpsInsideSqrt, kEpsZero>(
        p, T::load(grad[i]), s, neg_clr, weight_decay, eps);
    sum[i] = RoundedStore<T>::store(s);
    param[i] = T::store(p);
  }
}

template <typename T, bool kEpsZero>
void update_variant(int variant, typename T::S* p, const typename T::S* g, typename T::S* s,
                    int64_t n, typename T::M neg_clr, typename T::M wd, typename T::M eps) {
  switch (variant) {
    case 0: return update_run<T, false, false, false, kEpsZero>(p, g, s, n, neg_clr, wd, eps);
    case 1: return update_run<T, false, false, true, kEpsZero>(p, g, s, n, neg_clr, wd, eps);
    case 2: return update_run<T, false, true, false, kEpsZero>(p, g, s, n, neg_clr, wd, eps);
    case 3: return update_run<T, false, true, true, kEpsZero>(p, g, s, n, neg_clr, wd, eps);
    case 4: return update_run<T, true, false, false, kEpsZero>(p, g, s, n, neg_clr, wd, eps);
    case 5: return update_run<T, true, false, true, kEpsZero>(p, g, s, n, neg_clr, wd, eps);
    case 6: return update_run<T, true, true, false, kEpsZero>(p, g, s, n, neg_clr, wd, eps);
    default: return update_run<T, true, true, true, kEpsZero>(p, g, s, n, neg_clr, wd, eps);
  }
}

template <typename T>
void update_slice(const Update& u, const Slice& slice, int64_t offset, int64_t n) {
  using S = typename T::S;
  using M = typename T::M;
  auto* p = static_cast<S*>(slice.param) + offset;
  auto* g = static_cast<const S*>(slice.grad) + offset;
  auto* s = static_cast<S*>(slice.sum) + offset;
  const M neg_clr = static_cast<M>(slice.neg_clr);
  const M wd = T::hyper(u.weight_decay);
  const M eps = T::hyper(u.eps);
  const bool wd_on = u.weight_decay != 0;  // torch skips the term entirely at 0 (-0.0, inf*0)
  const int variant = (u.maximize ? 4 : 0) | (wd_on ? 2 : 0) | (u.eps_inside_sqrt ? 1 : 0);
  if constexpr (HasZeroEpsVariants<T>::kValue) {
    if (eps == 0) return update_variant<T, true>(variant, p, g, s, n, neg_clr, wd, eps);
  }
  return update_variant<T, false>(variant, p, g, s, n, neg_clr, wd, eps);
}

template <typename T>
void update_range_typed(const Update& u, int64_t begin, int64_t end) {
  // Binary search for the first slice that ends after `begin`.
  int64_t lo = 0, hi = u.count;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (u.ends[mid] <= begin) lo = mid + 1; else hi = mid;
  }
  for (int64_t k = lo; k < u.count && begin < end; ++k) {
    const int64_t start = k == 0 ? 0 : u.ends[k - 1];
    const int64_t stop = end < u.ends[k] ? end : u.ends[k];
    update_slice<T>(u, u.slices[k], begin - start, stop - begin);
    begin = stop;
  }
}

// torch's sparse path (coalesce, then sparse adds) per element of a row, whose rounding differs
// from the dense path's: sum = sum + g*g (a rounded square, then a rounded add); std = sqrt(sum)
// + eps; p = p + (-clr) * (g / std), the last an axpy: one FMA for float and double (torch calls
// BLAS), a product rounded to the dtype and then the add for half and bfloat16 (torch's loop).
inline float fma_always(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline double fma_always(double a, double b, double c) { return __builtin_fma(a, b, c); }

template <typename T, bool kAxpyFma, bool kMaximize, bool kEpsInsideSqrt, typename M>
inline void sparse_update_element(M& p, M g, M& s, M neg_clr, M eps) {
  if constexpr (kMaximize) g = -g;
  s = T::round(s + T::round(g * g));
  const M denom = denominator<T, kEpsInsideSqrt>(rounded_root<T, kEpsInsideSqrt>(s, eps), eps);
  const M q = T::round(g / denom);
  if constexpr (kAxpyFma) {
    p = fma_always(neg_clr, q, p);
  } else {
    p = p + T::round(neg_clr * q);
  }
}

template <typename T, bool kMaximize, bool kEpsInsideSqrt>
void sparse_update_row(typename T::S* __restrict param, const typename T::S* __restrict grad,
                       typename T::S* __restrict sum, int64_t n, typename T::M neg_clr,
                       typename T::M eps) {
  using M = typename T::M;
  constexpr bool kAxpyFma = sizeof(typename T::S) == sizeof(M);  // float and double
  int64_t i = 0;
  if constexpr (VectorOf<T>::kExists) {
    using V = typename VectorOf<T>::V;
    const auto v_neg_clr = V::broadcast(neg_clr), v_eps = V::broadcast(eps);
    for (; i + V::kWidth <= n; i += V::kWidth) {
      auto p = V::load(param + i), s = V::load(sum + i);
      sparse_update_element<V, kAxpyFma, kMaximize, kEpsInsideSqrt>(p, V::load(grad + i), s,
                                                                    v_neg_clr, v_eps);
      V::store(sum + i, s);
      V::store(param + i, p);
    }
  }
  for (; i < n; ++i) {
    M p = T::load(param[i]), s = T::load(sum[i]);
    sparse_update_element<T, kAxpyFma, kMaximize, kEpsInsideSqrt>(p, T::load(grad[i]), s,
                                                                  neg_clr, eps);
    sum[i] = RoundedStore<T>::store(s);
    param[i] = T::store(p);
  }
}

// Touched rows lie anywhere in a table far larger than the caches, and the step is bound by the
// latency of fetching them: ask for the param, sum and grad rows a few rows ahead of their use.
constexpr int64_t kPrefetchRows = 4;

// The first element of entry e's grad row.
template <typename S>
inline const S* entry_row(const SparseUpdate& u, int64_t e) {
  const int64_t row = u.value_row ? u.value_row[e] : e;
  return static_cast<const S*>(u.values) + row * u.value_stride;
}

// A compile-time bool for generic lambdas (no std:: templates here, see the top).
template <bool kValue>
struct Flag {
  static constexpr bool value = kValue;
};

template <typename S>
inline void prefetch_entry(const SparseUpdate& u, int64_t e) {
  const char* g = reinterpret_cast<const char*>(entry_row<S>(u, e));
  const int64_t bytes = u.row_len * static_cast<int64_t>(sizeof(S));
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(g + b, 0);
}

template <typename S>
inline void prefetch_rows(const SparseUpdate& u, int64_t k, int64_t sum_row_bytes) {
  const int64_t bytes = u.row_len * static_cast<int64_t>(sizeof(S));
  const char* p = static_cast<const char*>(u.param) + u.rows[k] * bytes;
  const char* s = static_cast<const char*>(u.sum) + u.rows[k] * sum_row_bytes;
  const char* g = reinterpret_cast<const char*>(entry_row<S>(u, u.order[u.segments[k]]));
  for (int64_t b = 0; b < bytes; b += 64) {
    __builtin_prefetch(p + b, 1);
    __builtin_prefetch(g + b, 0);
  }
  for (int64_t b = 0; b < sum_row_bytes; b += 64) __builtin_prefetch(s + b, 1);
}

// Sums each distinct row's entries in entry order (scaling each first, when asked), and
// prefetches the rows ahead: both kernels for sparse grads walk distinct rows this way, and
// differ only in the row update. `Acc` is the type entries are summed in (the param's dtype for
// element-wise, as torch's coalesce sums; the math type for row-wise), into u.scratch: one
// thread sums a row, so the result does not depend on how rows are split over threads.
// `update_row(k, grad_row, grad_is_acc)`.
template <typename T, typename Acc, typename LoadAcc, typename StoreAcc, typename RowFn>
inline void for_each_distinct_row(const SparseUpdate& u, int64_t begin, int64_t end,
                                  int64_t sum_row_bytes, LoadAcc load_acc, StoreAcc store_acc,
                                  RowFn update_row) {
  using S = typename T::S;
  const int64_t n = u.row_len;
  const auto* scale = static_cast<const S*>(u.entry_scale);
  Acc* acc = static_cast<Acc*>(u.scratch);
  // Entry e's elements as torch materializes them (scaled grads rounded to the dtype), summed into
  // acc; kScaled is a template argument so that the unscaled loop vectorizes as before.
  const auto sum_entries = [&](auto scaled, int64_t first, int64_t last) {
    constexpr bool kScaled = decltype(scaled)::value;
    const auto value = [&](const S* g, int64_t e, int64_t i) {
      if constexpr (kScaled) return T::round(T::load(g[i]) * T::load(scale[e]));
      else return T::load(g[i]);
    };
    const int64_t e0 = u.order[first];
    const S* g = entry_row<S>(u, e0);
    for (int64_t i = 0; i < n; ++i) acc[i] = store_acc(value(g, e0, i));
    for (int64_t j = first + 1; j < last; ++j) {
      // A hot row's entries lie anywhere in the grad: fetch a few ahead, as rows are.
      if (j + kPrefetchRows < last) prefetch_entry<S>(u, u.order[j + kPrefetchRows]);
      const int64_t e = u.order[j];
      const S* v = entry_row<S>(u, e);
      for (int64_t i = 0; i < n; ++i) acc[i] = store_acc(load_acc(acc[i]) + value(v, e, i));
    }
  };
  for (int64_t k = begin; k < end; ++k) {
    if (k + kPrefetchRows < end) prefetch_rows<S>(u, k + kPrefetchRows, sum_row_bytes);
    const int64_t first = u.segments[k], last = u.segments[k + 1];
    if (last - first == 1 && !scale) {
      update_row(k, static_cast<const void*>(entry_row<S>(u, u.order[first])), false);
      continue;
    }
    if (scale) {
      sum_entries(Flag<true>{}, first, last);
    } else {
      sum_entries(Flag<false>{}, first, last);
    }
    update_row(k, static_cast<const void*>(acc), true);
  }
}

// ---------------------------------------------------------------------------------------------
// Row-wise Adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD, with torch's options), one row of dim 0 at
// a time, all arithmetic in the math type M (float; double for double) and nothing rounded to
// the param's dtype before the store:
//   g = maximize ? -grad : grad;  g = g + wd * p  (a rounded product, then the add);
//   mean = (sum of g * g over the row) / row_len;  m = m + mean;
//   denom = sqrt(m) + eps, or sqrt(m + eps);  scale = neg_clr / denom;  p = p + scale * g.
// The squares are summed in kRowLanes interleaved lanes (element e into lane e % kRowLanes, each
// a rounded square then a rounded add), then ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)):
// one fixed order, so the result is the same on every ISA and thread count, and a plain PyTorch
// reference can reproduce it bitwise (tests/python/test_rowwise.py).
constexpr int kRowLanes = 8;

template <typename T, bool kGradIsMath, bool kMaximize, bool kWeightDecay, bool kEpsInsideSqrt>
void rowwise_update_row(typename T::S* __restrict param, const void* __restrict grad,
                        typename T::M* __restrict m, int64_t n, typename T::M neg_clr,
                        typename T::M weight_decay, typename T::M eps) {
  using S = typename T::S;
  using M = typename T::M;
  auto g_at = [&](int64_t i) -> M {
    M g = kGradIsMath ? static_cast<const M*>(grad)[i] : T::load(static_cast<const S*>(grad)[i]);
    if constexpr (kMaximize) g = -g;
    if constexpr (kWeightDecay) g = g + weight_decay * T::load(param[i]);
    return g;
  };
  // The lanes as one vector (a GCC vector extension, lowered to what the target has): written
  // as an array, the loop was vectorized over i instead, with each lane an in-order reduction
  // made of scalar adds, and the row-wise step ran at half the element-wise one's speed.
  typedef M Lanes __attribute__((vector_size(kRowLanes * sizeof(M))));
  Lanes lanes = {};
  int64_t i = 0;
  for (; i + kRowLanes <= n; i += kRowLanes) {
    Lanes g;
    for (int j = 0; j < kRowLanes; ++j) g[j] = g_at(i + j);
    lanes = lanes + g * g;
  }
  M lane[kRowLanes];
  for (int j = 0; j < kRowLanes; ++j) lane[j] = lanes[j];
  for (int j = 0; i + j < n; ++j) {
    const M g = g_at(i + j);
    lane[j] = lane[j] + g * g;
  }
  const M total = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  const M acc = *m + total / static_cast<M>(n);
  *m = acc;
  const M denom = kEpsInsideSqrt ? sqrt_(acc + eps) : sqrt_(acc) + eps;
  const M scale = neg_clr / denom;
  for (i = 0; i < n; ++i) {
    const M g = g_at(i);
    param[i] = T::store(T::load(param[i]) + scale * g);
  }
}

// The variant of the row update for these options, as a function pointer (8 x 2 instances).
template <typename T, bool kGradIsMath>
auto rowwise_row_fn(bool maximize, bool weight_decay, bool eps_inside_sqrt) {
  using Fn = void (*)(typename T::S*, const void*, typename T::M*, int64_t, typename T::M,
                      typename T::M, typename T::M);
  const int variant = (maximize ? 4 : 0) | (weight_decay ? 2 : 0) | (eps_inside_sqrt ? 1 : 0);
  constexpr Fn fns[8] = {
      rowwise_update_row<T, kGradIsMath, false, false, false>,
      rowwise_update_row<T, kGradIsMath, false, false, true>,
      rowwise_update_row<T, kGradIsMath, false, true, false>,
      rowwise_update_row<T, kGradIsMath, false, true, true>,
      rowwise_update_row<T, kGradIsMath, true, false, false>,
      rowwise_update_row<T, kGradIsMath, true, false, true>,
      rowwise_update_row<T, kGradIsMath, true, true, false>,
      rowwise_update_row<T, kGradIsMath, true, true, true>};
  return fns[variant];
}

// Rows of one element (1-D params: biases, norms): the row update above, exactly (lane 0 holds
// g * g, the other lanes +0, and a division by 1), in a loop over rows that vectorizes instead of
// a call per element.
template <typename T>
void rowwise_unit_rows(const RowUpdate& u, const RowSlice& sl, int64_t first, int64_t last) {
  using S = typename T::S;
  using M = typename T::M;
  auto* __restrict param = static_cast<S*>(sl.param);
  const auto* __restrict grad = static_cast<const S*>(sl.grad);
  auto* __restrict m = static_cast<M*>(sl.sum);
  const M neg_clr = static_cast<M>(sl.neg_clr);
  const M wd = static_cast<M>(u.weight_decay), eps = static_cast<M>(u.eps);
  const M sign = u.maximize ? M(-1) : M(1);  // -g exactly, as the row update's negation
  const bool wd_on = u.weight_decay != 0, inside = u.eps_inside_sqrt;
  for (int64_t r = first; r < last; ++r) {
    const M p = T::load(param[r]);
    M g = sign * T::load(grad[r]);
    g = wd_on ? g + wd * p : g;
    const M acc = m[r] + g * g;
    m[r] = acc;
    const M denom = inside ? sqrt_(acc + eps) : sqrt_(acc) + eps;
    param[r] = T::store(p + (neg_clr / denom) * g);
  }
}

template <typename T>
void rowwise_range_typed(const RowUpdate& u, int64_t begin, int64_t end) {
  using S = typename T::S;
  using M = typename T::M;
  const auto row = rowwise_row_fn<T, false>(u.maximize, u.weight_decay != 0, u.eps_inside_sqrt);
  const M wd = static_cast<M>(u.weight_decay), eps = static_cast<M>(u.eps);
  for (int64_t k = 0; k < u.count; ++k) {
    const int64_t start = k == 0 ? 0 : u.ends[k - 1];
    if (u.ends[k] <= begin) continue;
    if (start >= end) break;
    const RowSlice& sl = u.slices[k];
    const int64_t n = sl.row_len, rows = (u.ends[k] - start) / n;
    // Rows whose first element, start + r * n, lies in [begin, end).
    const int64_t first = begin <= start ? 0 : (begin - start + n - 1) / n;
    const int64_t last = end - start >= rows * n ? rows : (end - start + n - 1) / n;
    if (n == 1) {
      rowwise_unit_rows<T>(u, sl, first, last);
      continue;
    }
    const M neg_clr = static_cast<M>(sl.neg_clr);
    for (int64_t r = first; r < last; ++r) {
      row(static_cast<S*>(sl.param) + r * n, static_cast<const S*>(sl.grad) + r * n,
          static_cast<M*>(sl.sum) + r, n, neg_clr, wd, eps);
    }
  }
}

template <typename T>
void rowwise_sparse_range_typed(const SparseUpdate& u, int64_t begin, int64_t end) {
  using S = typename T::S;
  using M = typename T::M;
  const bool wd_on = u.weight_decay != 0;
  const auto direct = rowwise_row_fn<T, false>(u.maximize, wd_on, u.eps_inside_sqrt);
  const auto summed = rowwise_row_fn<T, true>(u.maximize, wd_on, u.eps_inside_sqrt);
  const M neg_clr = static_cast<M>(u.neg_clr);
  const M wd = static_cast<M>(u.weight_decay), eps = static_cast<M>(u.eps);
  const int64_t n = u.row_len;
  for_each_distinct_row<T, M>(
      u, begin, end, sizeof(M), [](M x) { return x; }, [](M x) { return x; },
      [&](int64_t k, const void* g, bool is_sum) {
        S* p = static_cast<S*>(u.param) + u.rows[k] * n;
        M* m = static_cast<M*>(u.sum) + u.rows[k];
        (is_sum ? summed : direct)(p, g, m, n, neg_clr, wd, eps);
      });
}

// Element-wise Adagrad on distinct rows [begin, end) of a sparse step. A row's duplicates are
// summed in grad order (one thread per row, whatever the partition), so the result does not
// depend on the thread count.
template <typename T>
void sparse_range_typed(const SparseUpdate& u, int64_t begin, int64_t end) {
  using S = typename T::S;
  using M = typename T::M;
  const int64_t n = u.row_len;
  const M neg_clr = T::hyper(u.neg_clr);
  const M eps = T::hyper(u.eps);
  const int variant = (u.maximize ? 2 : 0) | (u.eps_inside_sqrt ? 1 : 0);
  // torch's coalesce sums duplicates in the param's dtype.
  for_each_distinct_row<T, S>(
      u, begin, end, n * static_cast<int64_t>(sizeof(S)), [](S x) { return T::load(x); }, [](M x) { return T::store(x); },
      [&](int64_t k, const void* grad, bool) {
        const S* g = static_cast<const S*>(grad);
        S* p = static_cast<S*>(u.param) + u.rows[k] * n;
        S* s = static_cast<S*>(u.sum) + u.rows[k] * n;
        switch (variant) {
          case 0: return sparse_update_row<T, false, false>(p, g, s, n, neg_clr, eps);
          case 1: return sparse_update_row<T, false, true>(p, g, s, n, neg_clr, eps);
          case 2: return sparse_update_row<T, true, false>(p, g, s, n, neg_clr, eps);
          default: return sparse_update_row<T, true, true>(p, g, s, n, neg_clr, eps);
        }
      });
}

}  // namespace

void sparse_update_range(const SparseUpdate& u, int64_t begin, int64_t end) {
  switch (u.dtype) {
    case Dtype::Float: return sparse_range_typed<F32>(u, begin, end);
    case Dtype::Double: return sparse_range_typed<F64>(u, begin, end);
    case Dtype::Half: return sparse_range_typed<F16>(u, begin, end);
    case Dtype::BFloat16: return sparse_range_typed<BF16>(u, begin, end);
    default: return;  // complex params with sparse grads are refused by the plan
  }
}

void rowwise_update_range(const RowUpdate& u, int64_t begin, int64_t end) {
  switch (u.dtype) {
    case Dtype::Float: return rowwise_range_typed<F32>(u, begin, end);
    case Dtype::Double: return rowwise_range_typed<F64>(u, begin, end);
    case Dtype::Half: return rowwise_range_typed<F16>(u, begin, end);
    case Dtype::BFloat16: return rowwise_range_typed<BF16>(u, begin, end);
    default: return;  // row-wise Adagrad refuses complex params
  }
}

void rowwise_sparse_update_range(const SparseUpdate& u, int64_t begin, int64_t end) {
  switch (u.dtype) {
    case Dtype::Float: return rowwise_sparse_range_typed<F32>(u, begin, end);
    case Dtype::Double: return rowwise_sparse_range_typed<F64>(u, begin, end);
    case Dtype::Half: return rowwise_sparse_range_typed<F16>(u, begin, end);
    case Dtype::BFloat16: return rowwise_sparse_range_typed<BF16>(u, begin, end);
    default: return;
  }
}

void update_range(const Update& u, int64_t begin, int64_t end) {
  switch (u.dtype) {
    case Dtype::Float: return update_range_typed<F32>(u, begin, end);
    case Dtype::Double: return update_range_typed<F64>(u, begin, end);
    case Dtype::Half: return update_range_typed<F16>(u, begin, end);
    case Dtype::BFloat16: return update_range_typed<BF16>(u, begin, end);
    case Dtype::ComplexFloat: return update_range_typed<C32>(u, begin, end);
    case Dtype::ComplexDouble: return update_range_typed<C64>(u, begin, end);
  }
}

// ---------------------------------------------------------------------------------------------
// torch.amp.GradScaler's unscaling (kernel.h, UnscaleFn). GradScaler's scales are powers of two:
// then g * (1 / scale) is exact wherever g / scale is and rounds the same exact quotient, so it
// is the same bits for a multiplication's price. Any other scale is divided by, as torch does.
namespace {

template <typename T, bool kMultiply, typename M>
inline M unscaled(M g, M factor) {
  return kMultiply ? g * factor : g / factor;
}

template <typename T, bool kMultiply>
void unscale_run(typename T::S* __restrict g, int64_t n, float factor) {
  using M = typename T::M;
  int64_t i = 0;
  if constexpr (VectorOf<T>::kExists) {
    using V = typename VectorOf<T>::V;
    const auto v_factor = V::broadcast(factor);
    for (; i + V::kWidth <= n; i += V::kWidth) {
      V::store(g + i, unscaled<V, kMultiply>(V::load(g + i), v_factor));
    }
  }
  for (; i < n; ++i) g[i] = T::store(unscaled<T, kMultiply>(T::load(g[i]), static_cast<M>(factor)));
}

template <typename T>
void unscale_typed(void* grad, int64_t n, float scale) {
  auto* g = static_cast<typename T::S*>(grad);
  const uint32_t bits = bits_of_float(scale);
  const uint32_t exponent = (bits >> 23) & 0xffu;
  // A power of two whose reciprocal is a normal float too.
  if ((bits & 0x007fffffu) == 0 && exponent >= 1 && exponent <= 253) {
    const float inverse = float_from_bits((bits & 0x80000000u) | ((254u - exponent) << 23));
    return unscale_run<T, true>(g, n, inverse);
  }
  return unscale_run<T, false>(g, n, scale);
}

}  // namespace

void unscale(Dtype dtype, void* grad, int64_t n, float scale) {
  switch (dtype) {
    case Dtype::Float: case Dtype::ComplexFloat: return unscale_typed<F32>(grad, n, scale);
    case Dtype::Double: case Dtype::ComplexDouble: return unscale_typed<F64>(grad, n, scale);
    case Dtype::Half: return unscale_typed<F16>(grad, n, scale);
    case Dtype::BFloat16:
      // A NaN scale whose payload has bits that bfloat16 drops would break BF16Lanes' rounding,
      // which takes every NaN to have them 0; the default NaN stores the same NaN (0x7fc0).
      return unscale_typed<BF16>(grad, n, scale != scale ? float_from_bits(0x7fc00000u) : scale);
  }
}

}  // namespace fused_adagrad::cpu::KERNEL_NAMESPACE

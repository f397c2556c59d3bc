// The int8-dot GEMM core shared by the linear ops and the decode layer (see
// int8_dot_linear.cpp for the layouts).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace int8_dot {


constexpr int64_t kBlock = 32;
constexpr int64_t kTile = 16;
// Activation rows sharing one pass over a weight tile. Past 7 the accumulators no longer fit
// the 32 vector registers beside the tile's 8 weight chunks (8 rows ran ~2x slower a row).
constexpr int kMaxRows = 7;

// x ~= d * (q + lo / kLowScale) per block: q = round(x / d) and lo, the rounding error in
// steps of 1 / kLowScale, are both int8, so a block's dot product is two VPDPBUSD sums and
// the activations keep ~15 bits relative to the block's largest (8 with q alone).
constexpr float kLowScale = 254.f;

struct QuantizedRows {
  std::vector<int8_t> q;        // [M, K]
  std::vector<int8_t> lo;       // [M, K]
  std::vector<float> d;         // [M, K / 32]
  std::vector<float> sum;       // [M, K / 32] sum of the block's unquantized inputs
  std::vector<int32_t> qsum;    // [M, K / 32] sums of the block's q and lo
  std::vector<int32_t> losum;
};

inline float as_float(float v) { return v; }
inline float as_float(c10::BFloat16 v) { return static_cast<float>(v); }

template <typename T>
QuantizedRows quantize_rows(const T* x, int64_t rows, int64_t k, int64_t ldx) {
  const int64_t blocks = k / kBlock;
  QuantizedRows out;
  out.q.resize(rows * k);
  out.lo.resize(rows * k);
  out.d.resize(rows * blocks);
  out.sum.resize(rows * blocks);
  out.qsum.resize(rows * blocks);
  out.losum.resize(rows * blocks);
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t b = 0; b < blocks; ++b) {
      const T* src = x + m * ldx + b * kBlock;
      float v[kBlock], amax = 0.f, sum = 0.f;
      for (int i = 0; i < kBlock; ++i) {
        v[i] = as_float(src[i]);
        amax = std::max(amax, std::fabs(v[i]));
        sum += v[i];
      }
      const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
      int32_t qsum = 0, losum = 0;
      int8_t* dst = out.q.data() + m * k + b * kBlock;
      int8_t* low = out.lo.data() + m * k + b * kBlock;
      for (int i = 0; i < kBlock; ++i) {
        const float scaled = v[i] * inv;
        const float q = std::nearbyint(scaled);
        const int l = static_cast<int>(std::nearbyint((scaled - q) * kLowScale));
        dst[i] = static_cast<int8_t>(q);
        low[i] = static_cast<int8_t>(l);
        qsum += static_cast<int>(q);
        losum += l;
      }
      out.d[m * blocks + b] = d;
      out.sum[m * blocks + b] = sum;
      out.qsum[m * blocks + b] = qsum;
      out.losum[m * blocks + b] = losum;
    }
  }
  return out;
}

// One block's integer dot products for 16 rows: two accumulators halve the VPDPBUSD chain.
inline __m512i block_dot(const __m512i* w, const int8_t* x, __m512i init) {
  const int32_t* x32 = reinterpret_cast<const int32_t*>(x);
  __m512i a = init, b = _mm512_setzero_si512();
  for (int c = 0; c < 8; c += 2) {
    a = _mm512_dpbusd_epi32(a, w[c], _mm512_set1_epi32(x32[c]));
    b = _mm512_dpbusd_epi32(b, w[c + 1], _mm512_set1_epi32(x32[c + 1]));
  }
  return _mm512_add_epi32(a, b);
}

template <bool Q8, int Rows>
void tile_rows(const uint8_t* w, const uint16_t* scales, int64_t blocks, const QuantizedRows& x,
               int64_t m0, int64_t k, float* out, int64_t ldo) {
  __m512 acc[Rows];  // NOTE: the row loops are unrolled so that acc stays in registers
#pragma GCC unroll 8
  for (int j = 0; j < Rows; ++j) acc[j] = _mm512_setzero_ps();
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i chunk[8];
    __m512 d, zero;
    if constexpr (Q8) {
      const uint8_t* wb = w + b * 512;
      for (int c = 0; c < 8; ++c) chunk[c] = _mm512_loadu_si512(wb + 64 * c);
      d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + b * 16)));
      zero = _mm512_setzero_ps();
    } else {
      const uint8_t* wb = w + b * 256;
      for (int p = 0; p < 4; ++p) {
        const __m512i v = _mm512_loadu_si512(wb + 64 * p);
        chunk[2 * p] = _mm512_and_si512(v, nibble);
        chunk[2 * p + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
      }
      const __m512i s = _mm512_loadu_si512(scales + b * 32);
      d = _mm512_cvtph_ps(_mm512_castsi512_si256(s));
      zero = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(s, 1));
    }
#pragma GCC unroll 8
    for (int j = 0; j < Rows; ++j) {
      const int64_t row = m0 + j, rb = row * blocks + b;
      const int64_t at = row * k + b * kBlock;
      const __m512i hi_init = Q8 ? _mm512_set1_epi32(-128 * x.qsum[rb]) : _mm512_setzero_si512();
      const __m512i lo_init = Q8 ? _mm512_set1_epi32(-128 * x.losum[rb]) : _mm512_setzero_si512();
      const __m512 hi = _mm512_cvtepi32_ps(block_dot(chunk, x.q.data() + at, hi_init));
      const __m512 lo = _mm512_cvtepi32_ps(block_dot(chunk, x.lo.data() + at, lo_init));
      const __m512 dot = _mm512_fmadd_ps(lo, _mm512_set1_ps(1.f / kLowScale), hi);
      acc[j] = _mm512_fmadd_ps(dot, _mm512_mul_ps(d, _mm512_set1_ps(x.d[rb])), acc[j]);
      if constexpr (!Q8) acc[j] = _mm512_fmadd_ps(zero, _mm512_set1_ps(x.sum[rb]), acc[j]);
    }
  }
  for (int j = 0; j < Rows; ++j) _mm512_storeu_ps(out + j * ldo, acc[j]);
}

using TileFn = void (*)(const uint8_t*, const uint16_t*, int64_t, const QuantizedRows&, int64_t,
                        int64_t, float*, int64_t);

template <bool Q8, int... Rows>
TileFn pick(int rows, std::integer_sequence<int, Rows...>) {
  TileFn fns[] = {&tile_rows<Q8, Rows + 1>...};
  return fns[rows - 1];
}

// float32 -> bfloat16, round to nearest even (the activations' dtype of the quantized mode).
inline void store_bf16(const float* src, c10::BFloat16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i bits = _mm512_castps_si512(_mm512_loadu_ps(src + i));
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
  }
  for (; i < n; ++i) dst[i] = c10::BFloat16(src[i]);
}

// out[rows, n] (float32, row stride ldo) = x @ w.T for a q4 or q8 weight of `tiles` tiles,
// parallel over the tiles; the rows go in equal passes of at most kMaxRows (8 = 4 + 4). Every
// row takes the same instructions whatever the pass: a row's result does not depend on the
// others (a token's logits are the same decoded alone, batched or verifying proposals).
inline void gemm(bool q8, const QuantizedRows& x, int64_t rows, int64_t k, const uint8_t* w,
                 const uint16_t* scales, int64_t tiles, float* out, int64_t ldo) {
  const int64_t blocks = k / kBlock;
  const int64_t w_step = blocks * (q8 ? 512 : 256), s_step = blocks * (q8 ? 16 : 32);
  const int64_t passes = (rows + kMaxRows - 1) / kMaxRows;
  const int64_t group = (rows + passes - 1) / passes;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t m0 = 0; m0 < rows; m0 += group) {
        const int m = static_cast<int>(std::min<int64_t>(group, rows - m0));
        const TileFn fn = q8 ? pick<true>(m, std::make_integer_sequence<int, kMaxRows>{})
                             : pick<false>(m, std::make_integer_sequence<int, kMaxRows>{});
        fn(w + t * w_step, scales + t * s_step, blocks, x, m0, k, out + m0 * ldo + t * kTile, ldo);
      }
    }
  });
}

}  // namespace int8_dot

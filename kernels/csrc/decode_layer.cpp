// One decoder layer of a CPU decode step in one call, on the int8-dot GEMMs: kernels/cpu_decode_layer.py (which holds its torch reference).
//
// A decode step of a few sequences is mostly overhead when every norm, rotation, softmax and
// projection is its own torch op (or inductor graph node: a custom op costs ~10 us there).
// Here one call runs, for S rows of float32 residual stream r:
//   r += o_proj(attention(rope(qkv_proj(rmsnorm(r)) + bias)))
//   r += down_proj(silu(gate) * up), [gate | up] = gate_up_proj(rmsnorm(r))
// everything in float32 between the GEMMs (whose inputs are quantized to int8 per block of
// 32), and writes the new token's K/V (rounded to bf16) into the paged cache at its slot and
// into the decode-context buffers at its position, where the attention then reads it.
// Rows are tokens: several rows may share a buffer row (a sequence verifying speculative
// tokens, at consecutive positions); every row's K/V is written before any row attends, so
// each sees the rows before it in its own sequence.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <array>

#include "int8_dot.h"

namespace {

using namespace int8_dot;

inline __m512 fmadd(__m512 a, __m512 b, float c) {
  return _mm512_fmadd_ps(a, b, _mm512_set1_ps(c));
}

// exp(x) in float32 (Cephes' expf: range reduction by ln 2, a degree-5 polynomial, ~1 ulp).
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-103.0f)), _mm512_set1_ps(88.37626f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = fmadd(p, r, 1.3981999507e-3f);
  p = fmadd(p, r, 8.3334519073e-3f);
  p = fmadd(p, r, 4.1665795894e-2f);
  p = fmadd(p, r, 1.6666665459e-1f);
  p = fmadd(p, r, 5.0000001201e-1f);
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(y, n);
}

inline __m512 load_bf16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

void rms_norm(const float* x, const float* w, float eps, int64_t rows, int64_t h, float* out) {
  for (int64_t m = 0; m < rows; ++m) {
    const float* xm = x + m * h;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < h; i += 16) {
      const __m512 v = _mm512_loadu_ps(xm + i);
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(h) + eps);
    for (int64_t i = 0; i < h; i += 16) {
      const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(xm + i), _mm512_set1_ps(inv));
      _mm512_storeu_ps(out + m * h + i, _mm512_mul_ps(v, _mm512_loadu_ps(w + i)));
    }
  }
}

// x * cos + roll(x, d / 2) * sin over each head (NeoX; sin holds [-sin | sin]), in place.
void rotate(float* heads, int64_t count, int64_t d, const float* cos, const float* sin) {
  float tmp[512];
  for (int64_t h = 0; h < count; ++h) {
    float* x = heads + h * d;
    for (int64_t i = 0; i < d; ++i) tmp[i] = x[(i + d / 2) % d];
    for (int64_t i = 0; i < d; ++i) x[i] = x[i] * cos[i] + tmp[i] * sin[i];
  }
}

// The 16 lane sums of v[0..15], as the lanes of one vector (a transpose-and-add tree: 45
// instructions for what 16 horizontal reductions do in ~150).
inline __m512 sum16(const __m512* v) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's sums of 4 vectors, in order
    const __m512d x = _mm512_castps_pd(pairs[2 * i]), y = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 a = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88),
                                 _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
  const __m512 b = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88),
                                 _mm512_shuffle_f32x4(quads[2], quads[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
}

// out[g] += sum_p s[g][p] * values[p] for G heads and VC vectors of 16 from `v0`: the sums
// stay in registers over the positions, each value vector converted once for the G heads.
template <int G, int VC>
void weigh_values(const float* s, int64_t len, const c10::BFloat16* values, int64_t ld,
                  int64_t v0, int64_t d, float* out) {
  __m512 acc[G][VC];
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < VC; ++v) acc[g][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < len; ++p) {
    __m512 val[VC];
    for (int v = 0; v < VC; ++v) val[v] = load_bf16(values + p * ld + 16 * (v0 + v));
    for (int g = 0; g < G; ++g) {
      const __m512 w = _mm512_set1_ps(s[g * len + p]);
      for (int v = 0; v < VC; ++v) acc[g][v] = _mm512_fmadd_ps(w, val[v], acc[g][v]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < VC; ++v) _mm512_storeu_ps(out + g * d + 16 * (v0 + v), acc[g][v]);
}

using WeighFn = void (*)(const float*, int64_t, const c10::BFloat16*, int64_t, int64_t, int64_t,
                         float*);

template <int G, int... VC>
constexpr std::array<WeighFn, sizeof...(VC)> weigh_row(std::integer_sequence<int, VC...>) {
  return {&weigh_values<G, VC + 1>...};
}

template <int... G>
constexpr std::array<std::array<WeighFn, 4>, sizeof...(G)> weigh_table(
    std::integer_sequence<int, G...>) {
  return {weigh_row<G + 1>(std::make_integer_sequence<int, 4>{})...};
}

constexpr auto kWeigh = weigh_table(std::make_integer_sequence<int, 4>{});  // [G - 1][VC - 1]

// The attention of one row's query heads of one KV head over positions [lo, n) of its
// context: q [group, d] float32, keys/values bf16 with row stride `ld`, out [group, d].
// Scores go 16 positions at a time into 16 lane-wise sums and one sum16.
void attend(const float* q, int64_t group, int64_t d, const c10::BFloat16* keys,
            const c10::BFloat16* values, int64_t ld, int64_t lo, int64_t n, float scale,
            float* out, std::vector<float>& scores) {
  const int64_t len = n - lo, vecs = d / 16;
  scores.resize(group * len);
  keys += lo * ld;
  values += lo * ld;
  for (int64_t g = 0; g < group; ++g) {
    const float* qg = q + g * d;
    float* s = scores.data() + g * len;
    int64_t p = 0;
    for (; p + 16 <= len; p += 16) {
      __m512 acc[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        const c10::BFloat16* k = keys + (p + i) * ld;
        acc[i] = _mm512_mul_ps(_mm512_loadu_ps(qg), load_bf16(k));
        for (int64_t v = 1; v < vecs; ++v)
          acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * v), load_bf16(k + 16 * v), acc[i]);
      }
      _mm512_storeu_ps(s + p, _mm512_mul_ps(sum16(acc), _mm512_set1_ps(scale)));
    }
    for (; p < len; ++p) {
      const c10::BFloat16* k = keys + p * ld;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t v = 0; v < vecs; ++v)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * v), load_bf16(k + 16 * v), acc);
      s[p] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores.data() + g * len;
    float top = -INFINITY, total = 0.f;
    for (int64_t p = 0; p < len; ++p) top = std::max(top, s[p]);
    int64_t p = 0;
    for (; p + 16 <= len; p += 16) {
      const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + p), _mm512_set1_ps(top)));
      _mm512_storeu_ps(s + p, e);
      total += _mm512_reduce_add_ps(e);
    }
    for (; p < len; ++p) total += (s[p] = std::exp(s[p] - top));
    const float inv = 1.f / total;
    for (p = 0; p < len; ++p) s[p] *= inv;
  }
  for (int64_t g0 = 0; g0 < group; g0 += 4) {
    const int64_t gs = std::min<int64_t>(4, group - g0);
    for (int64_t v0 = 0; v0 < vecs; v0 += 4) {
      const int64_t vs = std::min<int64_t>(4, vecs - v0);
      kWeigh[gs - 1][vs - 1](scores.data() + g0 * len, len, values, ld, v0, d, out + g0 * d);
    }
  }
}

void silu_and_mul(const float* gu, int64_t rows, int64_t inter, float* out) {
  for (int64_t m = 0; m < rows; ++m) {
    const float* g = gu + m * 2 * inter;
    for (int64_t i = 0; i < inter; i += 16) {
      const __m512 x = _mm512_loadu_ps(g + i);
      const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), x));
      const __m512 silu = _mm512_div_ps(x, _mm512_add_ps(e, _mm512_set1_ps(1.f)));
      _mm512_storeu_ps(out + m * inter + i, _mm512_mul_ps(silu, _mm512_loadu_ps(g + inter + i)));
    }
  }
}

struct Projection {
  bool q8;
  const uint8_t* w;
  const uint16_t* scales;
  int64_t tiles;

  Projection(const at::Tensor& packed, const at::Tensor& s, int64_t layout)
      : q8(layout == 1), w(packed.data_ptr<uint8_t>()),
        scales(reinterpret_cast<const uint16_t*>(s.data_ptr())), tiles(packed.size(0)) {}

  // out [rows, tiles * 16] = x [rows, k] @ w.T (x quantized to int8 here)
  void apply(const float* x, int64_t rows, int64_t k, float* out) const {
    const QuantizedRows q = quantize_rows(x, rows, k, k);
    gemm(q8, q, rows, k, w, scales, tiles, out, tiles * kTile);
  }
};

void decode_layer(at::Tensor residual, const at::Tensor& norm1, const at::Tensor& norm2,
                  const at::Tensor& qkv_w, const at::Tensor& qkv_s,
                  const std::optional<at::Tensor>& qkv_bias, const at::Tensor& o_w,
                  const at::Tensor& o_s, const at::Tensor& gu_w, const at::Tensor& gu_s,
                  const at::Tensor& down_w, const at::Tensor& down_s, at::IntArrayRef layouts,
                  const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_buf, at::Tensor v_buf,
                  at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& seq_lens,
                  const at::Tensor& slots, const at::Tensor& buffer_rows, int64_t heads,
                  int64_t kv_heads, double eps, double scale, int64_t window) {
  const int64_t rows = residual.size(0), h = residual.size(1), d = k_buf.size(3);
  const int64_t q_size = heads * d, kv_size = kv_heads * d, qkv_n = q_size + 2 * kv_size;
  const int64_t inter = down_w.size(1) * kBlock, capacity = k_buf.size(1);
  TORCH_CHECK(residual.scalar_type() == at::kFloat && residual.is_contiguous(), "residual");
  TORCH_CHECK(k_buf.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16,
              "bf16 K/V");
  TORCH_CHECK(h % 16 == 0 && d % 16 == 0 && d <= 512 && inter % 16 == 0, "layer shape");
  TORCH_CHECK(qkv_w.size(0) * kTile == qkv_n && layouts.size() == 4, "qkv shape");
  TORCH_CHECK(seq_lens.scalar_type() == at::kLong && slots.scalar_type() == at::kLong &&
                  buffer_rows.scalar_type() == at::kLong,
              "int64");
  TORCH_CHECK(rows <= seq_lens.size(0) && rows <= slots.size(0) && rows <= buffer_rows.size(0),
              "fewer lengths, slots or buffer rows than rows");
  const int64_t cache_slots = k_cache.numel() / kv_size;
  for (int64_t m = 0; m < rows; ++m) {
    const int64_t n = seq_lens.data_ptr<int64_t>()[m], s = slots.data_ptr<int64_t>()[m];
    const int64_t b = buffer_rows.data_ptr<int64_t>()[m];
    TORCH_CHECK(n >= 1 && n <= capacity && s < cache_slots && b >= 0 && b < k_buf.size(0),
                "a row outside its buffers");
  }
  float* r = residual.data_ptr<float>();
  const float* cs = cos.data_ptr<float>();
  const float* sn = sin.data_ptr<float>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* buf_row = buffer_rows.data_ptr<int64_t>();
  auto* kb = k_buf.data_ptr<c10::BFloat16>();
  auto* vb = v_buf.data_ptr<c10::BFloat16>();
  auto* kc = k_cache.data_ptr<c10::BFloat16>();
  auto* vc = v_cache.data_ptr<c10::BFloat16>();

  std::vector<float> normed(rows * h), qkv(rows * qkv_n), attn(rows * q_size);
  std::vector<float> proj(rows * std::max(h, 2 * inter)), act(rows * inter);
  rms_norm(r, norm1.data_ptr<float>(), eps, rows, h, normed.data());
  Projection(qkv_w, qkv_s, layouts[0]).apply(normed.data(), rows, h, qkv.data());
  if (qkv_bias.has_value()) {
    const float* b = qkv_bias->data_ptr<float>();
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t i = 0; i < qkv_n; ++i) qkv[m * qkv_n + i] += b[i];
  }
  for (int64_t m = 0; m < rows; ++m) {
    float* row = qkv.data() + m * qkv_n;
    rotate(row, heads + kv_heads, d, cs + m * d, sn + m * d);  // q and k heads are adjacent
    const int64_t pos = lens[m] - 1;
    c10::BFloat16* kdst = kb + (buf_row[m] * capacity + pos) * kv_size;
    c10::BFloat16* vdst = vb + (buf_row[m] * capacity + pos) * kv_size;
    store_bf16(row + q_size, kdst, kv_size);
    store_bf16(row + q_size + kv_size, vdst, kv_size);
    if (slot[m] >= 0) {
      std::copy(kdst, kdst + kv_size, kc + slot[m] * kv_size);
      std::copy(vdst, vdst + kv_size, vc + slot[m] * kv_size);
    }
  }
  const int64_t group = heads / kv_heads;
  int64_t work = 0;
  for (int64_t m = 0; m < rows; ++m) work += lens[m] * kv_heads * d;
  at::parallel_for(0, rows * kv_heads, work < (1 << 17) ? rows * kv_heads : 1,
                   [&](int64_t i0, int64_t i1) {
    std::vector<float> scores;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t m = i / kv_heads, g = i % kv_heads, n = lens[m];
      const int64_t lo = window > 0 ? std::max<int64_t>(0, n - window) : 0;
      const int64_t base = buf_row[m] * capacity * kv_size + g * d;
      attend(qkv.data() + m * qkv_n + g * group * d, group, d, kb + base, vb + base, kv_size,
             lo, n, static_cast<float>(scale), attn.data() + m * q_size + g * group * d, scores);
    }
  });
  Projection(o_w, o_s, layouts[1]).apply(attn.data(), rows, q_size, proj.data());
  for (int64_t i = 0; i < rows * h; ++i) r[i] += proj[i];
  rms_norm(r, norm2.data_ptr<float>(), eps, rows, h, normed.data());
  Projection(gu_w, gu_s, layouts[2]).apply(normed.data(), rows, h, proj.data());
  silu_and_mul(proj.data(), rows, inter, act.data());
  Projection(down_w, down_s, layouts[3]).apply(act.data(), rows, inter, proj.data());
  for (int64_t i = 0; i < rows * h; ++i) r[i] += proj[i];
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill_int8_dot, m) {
  m.def(
      "decode_layer(Tensor(a!) residual, Tensor norm1, Tensor norm2, Tensor qkv_w, "
      "Tensor qkv_s, Tensor? qkv_bias, Tensor o_w, Tensor o_s, Tensor gu_w, Tensor gu_s, "
      "Tensor down_w, Tensor down_s, int[] layouts, Tensor cos, Tensor sin, Tensor(b!) k_buf, "
      "Tensor(c!) v_buf, Tensor(d!) k_cache, Tensor(e!) v_cache, Tensor seq_lens, "
      "Tensor slots, Tensor buffer_rows, int heads, int kv_heads, float eps, float scale, "
      "int window) -> ()");
  m.impl("decode_layer", c10::DispatchKey::CPU, &decode_layer);
}

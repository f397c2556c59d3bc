// 4- and 8-bit weight GEMMs with int8 activations on AVX-512 VNNI (kernels/int8_dot_linear.py).
//
// The activations are quantized per row and block of 32 inputs (d = max|x| / 127, q =
// round(x / d), as llama.cpp's Q8 activations), so that each block's dot product is one
// exact integer sum: VPDPBUSD multiplies 64 unsigned weight bytes by 64 signed activation
// bytes and adds groups of four into 16 int32 lanes.
//
// Layout (made by pack_q4 / pack_q8 in the Python module): output rows in tiles of 16, and
// per tile and block of 32 inputs, 8 "chunks" of 4 inputs, each chunk 64 bytes = 16 rows x
// 4 inputs, so that lane r of one VPDPBUSD accumulates row r and the four activation bytes
// are one broadcast int32.
//   q4: 4 x 64 bytes per (tile, block); byte j of pair p holds chunk 2p in its low nibble
//       and chunk 2p+1 in its high nibble; values 0..15, w = d * q + m; then fp16 scales
//       [d x 16 | m x 16] per (tile, block).
//   q8: 8 x 64 bytes per (tile, block) of q + 128 (unsigned), w = d * q; fp16 d x 16.
// The zero term of q4 uses the exact float sum of the block's inputs; the +128 offset of
// q8 is taken off with the integer sum of the quantized inputs.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "int8_dot.h"

namespace {

using namespace int8_dot;

template <bool Q8>
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                  bool float_out) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [M, K] with contiguous rows");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "x must be bfloat16 or float32");
  TORCH_CHECK(packed.is_contiguous() && scales.is_contiguous(), "weights must be contiguous");
  const int64_t rows = x.size(0), k = x.size(1), blocks = k / kBlock;
  const int64_t tiles = packed.size(0), n = tiles * kTile;
  TORCH_CHECK(k % kBlock == 0 && packed.size(1) == blocks, "input features do not match");
  TORCH_CHECK(packed.numel() == tiles * blocks * (Q8 ? 512 : 256) &&
                  scales.numel() == tiles * blocks * (Q8 ? 16 : 32) &&
                  scales.element_size() == 2,
              "weights not in the layout");
  const QuantizedRows q = x.scalar_type() == at::kFloat
      ? quantize_rows(x.data_ptr<float>(), rows, k, x.stride(0))
      : quantize_rows(x.data_ptr<c10::BFloat16>(), rows, k, x.stride(0));
  at::Tensor out = at::empty({rows, n}, x.options().dtype(at::kFloat));
  gemm(Q8, q, rows, k, packed.data_ptr<uint8_t>(),
       reinterpret_cast<const uint16_t*>(scales.data_ptr()), tiles, out.data_ptr<float>(), n);
  if (float_out || x.scalar_type() == at::kFloat) return out;
  at::Tensor result = at::empty({rows, n}, x.options());
  store_bf16(out.data_ptr<float>(), result.data_ptr<c10::BFloat16>(), rows * n);
  return result;
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                     bool float_out) {
  return linear<false>(x, packed, scales, float_out);
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                     bool float_out) {
  return linear<true>(x, packed, scales, float_out);
}

}  // namespace

TORCH_LIBRARY(tokenmill_int8_dot, m) {
  m.def("q4_linear(Tensor x, Tensor packed, Tensor scales, bool float_out) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor packed, Tensor scales, bool float_out) -> Tensor");
  m.impl("q4_linear", c10::DispatchKey::CPU, &q4_linear);
  m.impl("q8_linear", c10::DispatchKey::CPU, &q8_linear);
}

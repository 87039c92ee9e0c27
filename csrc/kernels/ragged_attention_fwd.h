// Interface of the ragged-attention forward kernel: tile sizes, the head table and the launch parameters.
// Plain C++ (no CUDA syntax), shared by the host file (g++) and the kernel file (nvcc).
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace vitslim {
namespace ragged_attention {

constexpr int kThreads = 128;      // 4 warps
constexpr int kBlockM = 32;        // query rows per block: 8 row groups of 4
constexpr int kBlockN = 32;        // keys per shared-memory tile: 16 column groups of 2
constexpr int kRowsPerThread = 4;
constexpr int kKeysPerThread = 2;
constexpr int kMaxHeads = 128;     // head table passed by value (kernel parameter space)
constexpr int kMaxWidth = 256;     // widest head the kernel accepts
// Shared-memory row strides (floats). Qt and Pt are read as float4 along rows, Kt as float2: strides keep
// 16 / 8 byte alignment; the +4 / +2 spreads the transposing stores over more banks.
constexpr int kQtStride = kBlockM + 4;   // Qt[d][row]
constexpr int kKtStride = kBlockN + 2;   // Kt[d][key]
constexpr int kPtStride = kBlockM + 4;   // Pt[key][row]

struct HeadTable {
  int32_t offset[kMaxHeads];  // first column of each kept (non-zero-width) head
  int32_t width[kMaxHeads];   // its width, 1..kMaxWidth
};

enum class DType : int { kFloat32, kFloat16, kBFloat16 };

// Everything one launch needs; filled and checked by the host file (csrc/ragged_attention.cpp).
struct FwdParams {
  const void* q;              // (B, N, D) in `dtype`
  const void* k;
  const void* v;
  void* o;
  int64_t stride_q[3];        // element strides of (B, N, D)
  int64_t stride_k[3];
  int64_t stride_v[3];
  int64_t stride_o[3];
  int64_t batch;              // B >= 1
  int n;                      // N >= 1
  int heads;                  // kept heads, 1..kMaxHeads
  int widest;                 // widest kept head, 1..kMaxWidth
  float qk_scale;             // softmax scale * log2(e)
  DType dtype;
  HeadTable table;
};

// Launches the kernel on `stream` (defined in ragged_attention_fwd.cu, the only file nvcc compiles, so
// that nvcc parses no torch header). Returns the launch's error code.
cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream);

// nvcc's __CUDA_ARCH_LIST__ for this file, e.g. "800,900"; CUDART_VERSION it was compiled with.
const char* compiled_archs();
int cuda_runtime_version();

}  // namespace ragged_attention
}  // namespace vitslim

// Ragged-width attention forward (docs/design.md section 5): every head has its own width, all heads in one
// launch, fp32 math whatever the input dtype.
//
// q, k, v: (B, N, D) with D = sum(head widths), any strides; head h owns columns [offset_h, offset_h + w_h).
// o:       (B, N, D), any strides (the launcher allocates it contiguous).
//
// Design (plain SIMT, chosen to be right by construction; the tensor-core path is Triton's):
// - one block of 128 threads per (query tile of BM = 32 rows, kept head, batch); zero-width heads are left
//   out of the head table on the host, so they cost nothing;
// - the query tile, pre-multiplied by scale * log2(e), is kept in shared memory for the whole block; key and
//   value tiles of BN = 32 keys stream through shared memory; flash-attention online softmax in base 2
//   with fp32 row statistics and an fp32 output accumulator in registers;
// - thread t owns the 4 query rows 4 * (t / 16) + [0, 4) of the tile: the 16 threads sharing those rows
//   are one half-warp, so row max and row sum are xor-shuffles inside it (offsets 8, 4, 2, 1). In the
//   scores it owns the keys 2 * (t % 16) + {0, 1}; in the output the columns (t % 16) + 16 * j;
// - loops over the head dimension stop at the head's width (scores) or its 16-column groups (output), so
//   the arithmetic of a head scales with its own width, not the widest one. WP, the template parameter,
//   is only the capacity: the widest head of the call rounded up to 64, 128 or 256.
//
// Nothing is read that was not written: rows past N are zero-filled, scores of keys past N are set to
// -inf (their probabilities are exactly 0), value rows past N and value columns past w_h up to the next
// multiple of 16 are zero-filled; only rows < N and columns < w_h are stored.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ragged_attention_fwd.h"

namespace vitslim {
namespace ragged_attention {

// Shared memory in floats for capacity WP: Qt (WP x kQtStride), Kt (WP x kKtStride), V (kBlockN x WP),
// Pt (kBlockN x kPtStride). Every part is a multiple of 4 floats, so each starts 16-byte aligned.
__host__ __device__ constexpr int smem_floats(int WP) {
  return WP * kQtStride + WP * kKtStride + kBlockN * WP + kBlockN * kPtStride;
}

// Explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__ and __CUDA_NO_BFLOAT16_CONVERSIONS__.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// The block's dynamic shared memory. csrc/emulate/ brings its own, to run this kernel on CPU threads.
#ifndef VITSLIM_EMULATED
__device__ __forceinline__ float* dynamic_shared_memory() {
  extern __shared__ float4 smem_f4[];
  return reinterpret_cast<float*>(smem_f4);
}
#endif

template <typename scalar_t, int WP>
__global__ void __launch_bounds__(kThreads)
_ragged_attention_fwd_kernel(
    const scalar_t* __restrict__ Q,                          // (B, N, D) queries
    const scalar_t* __restrict__ K,                          // (B, N, D) keys
    const scalar_t* __restrict__ V,                          // (B, N, D) values
    scalar_t* __restrict__ O,                                // (B, N, D) output
    const HeadTable heads,                                   // kept heads: offsets and widths
    int64_t stride_qb, int64_t stride_qn, int64_t stride_qd, // strides of q
    int64_t stride_kb, int64_t stride_kn, int64_t stride_kd, // strides of k
    int64_t stride_vb, int64_t stride_vn, int64_t stride_vd, // strides of v
    int64_t stride_ob, int64_t stride_on, int64_t stride_od, // strides of o
    int N,                                                   // sequence length (>= 1)
    int H,                                                   // number of kept heads (>= 1)
    float qk_scale) {                                        // softmax scale * log2(e)
  static_assert(WP % 64 == 0 && WP <= kMaxWidth, "capacity must be 64, 128 or 256");
  constexpr int kColGroups = WP / 16;  // output columns per thread at capacity WP
  float* smem = dynamic_shared_memory();
  float* Qt = smem;                          // [WP][kQtStride]: Qt[d][r] = q[row0 + r][d] * qk_scale
  float* Kt = Qt + WP * kQtStride;           // [WP][kKtStride]: Kt[d][j] = k[key0 + j][d]
  float* Vs = Kt + WP * kKtStride;           // [kBlockN][WP]:   Vs[j][d] = v[key0 + j][d]
  float* Pt = Vs + kBlockN * WP;             // [kBlockN][kPtStride]: Pt[j][r] = p[r][j]

  // Query tiles of one (batch, head) are neighbours in the launch order: they share k and v in L2.
  const int num_m_tiles = (N + kBlockM - 1) / kBlockM;
  const int64_t bid = blockIdx.x;
  const int m_tile = static_cast<int>(bid % num_m_tiles);
  const int64_t bh = bid / num_m_tiles;
  const int h = static_cast<int>(bh % H);
  const int64_t b = bh / H;
  const int col0 = heads.offset[h];
  const int w = heads.width[h];
  const int w16 = (w + 15) & ~15;            // width rounded up to the output column groups
  const int row0 = m_tile * kBlockM;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int rg = tid >> 4;                   // row group: rows 4 * rg + [0, 4) of the tile
  const int cg = tid & 15;                   // column group

  const scalar_t* q_base = Q + b * stride_qb + col0 * stride_qd;
  const scalar_t* k_base = K + b * stride_kb + col0 * stride_kd;
  const scalar_t* v_base = V + b * stride_vb + col0 * stride_vd;

  // Query tile: one warp per row, lanes along the head dimension (coalesced when stride_qd == 1).
  for (int r = warp; r < kBlockM; r += kThreads / 32) {
    const int n = row0 + r;
    for (int d = lane; d < w; d += 32) {
      Qt[d * kQtStride + r] = n < N ? to_float(q_base[n * stride_qn + d * stride_qd]) * qk_scale : 0.0f;
    }
  }

  float m_i[kRowsPerThread];                 // running max of the scaled scores of each row (base 2)
  float l_i[kRowsPerThread];                 // running sum of exp2(score - m_i)
  float acc[kRowsPerThread][kColGroups];     // unnormalised output, columns cg + 16 * j
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    m_i[i] = -INFINITY;
    l_i[i] = 0.0f;
#pragma unroll
    for (int j = 0; j < kColGroups; ++j) acc[i][j] = 0.0f;
  }

  for (int key0 = 0; key0 < N; key0 += kBlockN) {
    // Key and value tiles; rows past N (and value columns in [w, w16)) are zeros.
    for (int j = warp; j < kBlockN; j += kThreads / 32) {
      const int n = key0 + j;
      for (int d = lane; d < w16; d += 32) {
        const bool valid = n < N && d < w;
        if (d < w) Kt[d * kKtStride + j] = valid ? to_float(k_base[n * stride_kn + d * stride_kd]) : 0.0f;
        Vs[j * WP + d] = valid ? to_float(v_base[n * stride_vn + d * stride_vd]) : 0.0f;
      }
    }
    __syncthreads();  // (also publishes the query tile on the first pass)

    // Scores s[i][c] = sum_d Qt[d][4 rg + i] * Kt[d][2 cg + c], already scaled to base 2.
    float s[kRowsPerThread][kKeysPerThread];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int c = 0; c < kKeysPerThread; ++c) s[i][c] = 0.0f;
#pragma unroll 4
    for (int d = 0; d < w; ++d) {
      const float4 qv = *reinterpret_cast<const float4*>(&Qt[d * kQtStride + kRowsPerThread * rg]);
      const float2 kv = *reinterpret_cast<const float2*>(&Kt[d * kKtStride + kKeysPerThread * cg]);
      s[0][0] += qv.x * kv.x; s[0][1] += qv.x * kv.y;
      s[1][0] += qv.y * kv.x; s[1][1] += qv.y * kv.y;
      s[2][0] += qv.z * kv.x; s[2][1] += qv.z * kv.y;
      s[3][0] += qv.w * kv.x; s[3][1] += qv.w * kv.y;
    }
#pragma unroll
    for (int c = 0; c < kKeysPerThread; ++c) {
      if (key0 + kKeysPerThread * cg + c >= N) {
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) s[i][c] = -INFINITY;
      }
    }

    // Online softmax. Every tile holds at least one valid key, so each row's new max is finite.
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      float mx = fmaxf(s[i][0], s[i][1]);
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_new = fmaxf(m_i[i], mx);
      const float alpha = exp2f(m_i[i] - m_new);  // 0 on the first tile (m_i = -inf)
      float rowsum = 0.0f;
#pragma unroll
      for (int c = 0; c < kKeysPerThread; ++c) {
        s[i][c] = exp2f(s[i][c] - m_new);          // exactly 0 for keys past N
        rowsum += s[i][c];
      }
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) rowsum += __shfl_xor_sync(0xffffffffu, rowsum, off);
      l_i[i] = l_i[i] * alpha + rowsum;
      m_i[i] = m_new;
#pragma unroll
      for (int j = 0; j < kColGroups; ++j) acc[i][j] *= alpha;
    }
#pragma unroll
    for (int c = 0; c < kKeysPerThread; ++c) {
      *reinterpret_cast<float4*>(&Pt[(kKeysPerThread * cg + c) * kPtStride + kRowsPerThread * rg]) =
          make_float4(s[0][c], s[1][c], s[2][c], s[3][c]);
    }
    __syncthreads();

    // acc[i][j] += sum_key Pt[key][4 rg + i] * Vs[key][cg + 16 j], over the valid keys and column groups.
    const int keys = min(kBlockN, N - key0);
    for (int key = 0; key < keys; ++key) {
      const float4 pv = *reinterpret_cast<const float4*>(&Pt[key * kPtStride + kRowsPerThread * rg]);
#pragma unroll
      for (int j = 0; j < kColGroups; ++j) {
        if (16 * j < w16) {
          const float vv = Vs[key * WP + cg + 16 * j];
          acc[0][j] += pv.x * vv;
          acc[1][j] += pv.y * vv;
          acc[2][j] += pv.z * vv;
          acc[3][j] += pv.w * vv;
        }
      }
    }
    __syncthreads();  // the next pass overwrites Kt, Vs and Pt
  }

  scalar_t* o_base = O + b * stride_ob + col0 * stride_od;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int n = row0 + kRowsPerThread * rg + i;
    if (n < N) {
      const float inv_l = 1.0f / l_i[i];  // l_i >= 1: the row's max contributes exp2(0)
#pragma unroll
      for (int j = 0; j < kColGroups; ++j) {
        const int d = cg + 16 * j;
        if (d < w) o_base[n * stride_on + d * stride_od] = from_float<scalar_t>(acc[i][j] * inv_l);
      }
    }
  }
}

}  // namespace ragged_attention
}  // namespace vitslim

// Runs the CUDA kernel _ragged_attention_fwd_kernel (csrc/kernels/ragged_attention_fwd.cuh) on CPU threads,
// so that CI, which has no GPU, still checks its indexing, masking, online softmax, warp shuffles and shared
// memory against the reference (tests/kernels/test_ragged_attention_cuda.py builds it with g++, under
// AddressSanitizer and UndefinedBehaviorSanitizer). It cannot check what only hardware shows: timing, bank
// conflicts, the launch code of ragged_attention_fwd.cu.
//
// usage: ragged_attention_fwd_emulate <f32|f16|bf16> <split|separate> B N scale w_0 w_1 ...
//   stdin:  split: one contiguous (B, N, 3D) buffer, q | k | v along the last dim (so q, k, v are strided);
//           separate: q, k, v, each a contiguous (B, N, D) buffer.   D = sum(w_h).
//   stdout: o, a contiguous (B, N, D) buffer, NaN wherever the kernel wrote nothing.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "../kernels/ragged_attention_fwd.cuh"

using namespace vitslim::ragged_attention;

namespace {

template <typename T, int WP>
void run_grid(const std::vector<T>& in, std::vector<T>& out, bool split, int64_t B, int N, int D, float scale,
              const HeadTable& table, int H) {
  const T* q = in.data();
  const T* k = in.data() + (split ? D : B * N * D);
  const T* v = in.data() + (split ? 2 * D : 2 * B * N * D);
  const int64_t sb = split ? int64_t{N} * 3 * D : int64_t{N} * D;  // input strides (batch, token, column)
  const int64_t sn = split ? 3 * D : D;
  const int64_t blocks = B * H * ((N + kBlockM - 1) / kBlockM);
  const size_t floats = smem_floats(WP);

  std::barrier<> block_barrier(kThreads);
  emu::block_barrier = &block_barrier;
  for (int w = 0; w < kThreads / 32; ++w) emu::warp_barrier[w] = new std::barrier<>(32);

  // One worker per CUDA thread of a block; the blocks run one after another.
  std::vector<std::thread> workers;
  for (int t = 0; t < kThreads; ++t) {
    workers.emplace_back([&, t] {
      emu::thread_idx = uint3{static_cast<unsigned>(t), 0, 0};
      for (int64_t blk = 0; blk < blocks; ++blk) {
        if (t == 0) {  // this block's shared memory: exact size, NaN until written
          emu::shared_memory = static_cast<float*>(std::aligned_alloc(16, (floats * sizeof(float) + 15) / 16 * 16));
          for (size_t i = 0; i < floats; ++i) emu::shared_memory[i] = NAN;
        }
        block_barrier.arrive_and_wait();
        emu::block_idx = uint3{static_cast<unsigned>(blk), 0, 0};
        _ragged_attention_fwd_kernel<T, WP>(q, k, v, out.data(), table, sb, sn, 1, sb, sn, 1, sb, sn, 1,
                                            int64_t{N} * D, D, 1, N, H,
                                            static_cast<float>(scale * 1.4426950408889634));
        block_barrier.arrive_and_wait();
        if (t == 0) std::free(emu::shared_memory);
      }
    });
  }
  for (auto& worker : workers) worker.join();
  for (int w = 0; w < kThreads / 32; ++w) delete emu::warp_barrier[w];
}

template <typename T>
int run(int argc, char** argv, T nan) {
  const bool split = std::strcmp(argv[2], "split") == 0;
  const int64_t B = std::atol(argv[3]);
  const int N = std::atoi(argv[4]);
  const float scale = static_cast<float>(std::atof(argv[5]));
  HeadTable table{};  // the kept heads, as csrc/ragged_attention.cpp builds them
  int H = 0, D = 0, widest = 0;
  for (int i = 6; i < argc; ++i) {
    const int w = std::atoi(argv[i]);
    if (w > kMaxWidth || (w > 0 && H == kMaxHeads)) return 3;
    if (w > 0) {
      table.offset[H] = D;
      table.width[H] = w;
      ++H;
      widest = std::max(widest, w);
    }
    D += w;
  }
  std::vector<T> in(static_cast<size_t>(3 * B * N * D)), out(static_cast<size_t>(B * N * D), nan);
  if (std::fread(in.data(), sizeof(T), in.size(), stdin) != in.size()) {
    std::fprintf(stderr, "expected %zu input elements\n", in.size());
    return 2;
  }
  if (B > 0 && N > 0 && H > 0) {
    if (widest <= 64) run_grid<T, 64>(in, out, split, B, N, D, scale, table, H);
    else if (widest <= 128) run_grid<T, 128>(in, out, split, B, N, D, scale, table, H);
    else run_grid<T, 256>(in, out, split, B, N, D, scale, table, H);
  }
  std::fwrite(out.data(), sizeof(T), out.size(), stdout);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: %s <f32|f16|bf16> <split|separate> B N scale w_0 w_1 ...\n", argv[0]);
    return 1;
  }
  if (std::strcmp(argv[1], "f32") == 0) return run<float>(argc, argv, NAN);
  if (std::strcmp(argv[1], "f16") == 0) return run<__half>(argc, argv, __float2half_rn(NAN));
  if (std::strcmp(argv[1], "bf16") == 0) return run<__nv_bfloat16>(argc, argv, __float2bfloat16_rn(NAN));
  return 1;
}

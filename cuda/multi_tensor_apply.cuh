// A small multi-tensor engine: the addresses and sizes of many tensors travel to one kernel
// launch as a kernel argument, each block of the grid gets one (tensor, chunk) pair, and lists
// that do not fit one argument table are spread over several launches.
#pragma once

#include <cuda_runtime.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace fused_adagrad::cuda {

constexpr int kBlockThreads = 512;
constexpr int64_t kChunkSize = 65536;  // elements per block; a multiple of every vector width

// Kernel parameters live in constant memory: 4 KB on every GPU, 32764 bytes with CUDA >= 12.1
// on Volta and newer (and a driver >= 12.1, which only the running process can tell).
constexpr size_t kSmallArgBytes = 4096;
constexpr size_t kLargeArgBytes = 32764;

// nvcc lists the architectures of this compilation in __CUDA_ARCH_LIST__, lowest first. A
// kernel with a 32 KB argument does not compile for pre-Volta targets, so it is built only
// when every target is sm_70 or newer.
#define FUSED_ADAGRAD_ARCH_HEAD_(first, ...) first
#define FUSED_ADAGRAD_ARCH_HEAD(...) FUSED_ADAGRAD_ARCH_HEAD_(__VA_ARGS__, 0)
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010 && \
    (!defined(__CUDA_ARCH_LIST__) || FUSED_ADAGRAD_ARCH_HEAD(__CUDA_ARCH_LIST__) >= 700)
#define FUSED_ADAGRAD_LARGE_KERNEL_ARGS 1
#else
#define FUSED_ADAGRAD_LARGE_KERNEL_ARGS 0
#endif

// One launch's worth of work. kDepth arrays per tensor (e.g. param, grad, sum), one `Extra`
// per tensor (whatever the kernel needs besides addresses), and per block the tensor and chunk
// it works on. A struct of arrays, so no padding between the small block entries.
template <int kDepth, typename Extra, int kTensors, int kBlocks>
struct ChunkTable {
  static_assert(kTensors <= 65535, "block -> tensor entries are 16 bit");
  static constexpr int kMaxTensors = kTensors;
  static constexpr int kMaxBlocks = kBlocks;
  void* ptr[kDepth][kTensors];
  int64_t numel[kTensors];
  Extra extra[kTensors];
  int32_t chunk[kBlocks];
  uint16_t tensor[kBlocks];
};

// A tensor as the host hands it over: base addresses of its kDepth arrays (all with the same
// element layout), its element count, and its per-tensor data.
template <int kDepth, typename Extra>
struct TensorEntry {
  std::array<void*, kDepth> ptr;
  int64_t numel;
  Extra extra;
};

// Fills tables with the chunks of `entries` in order and calls `launch(table, blocks)` whenever
// a table is full and once at the end. A tensor whose chunks do not all fit continues in the
// next table, so one tensor can span launches; empty tensors are skipped.
template <typename Table, int kDepth, typename Extra, typename Launch>
void for_each_table(const std::vector<TensorEntry<kDepth, Extra>>& entries, Launch&& launch) {
  Table table;
  int tensors = 0;
  int blocks = 0;
  for (const auto& e : entries) {
    if (e.numel == 0) continue;
    const int slot = tensors++;
    for (int d = 0; d < kDepth; ++d) table.ptr[d][slot] = e.ptr[d];
    table.numel[slot] = e.numel;
    table.extra[slot] = e.extra;

    const int64_t chunks = (e.numel + kChunkSize - 1) / kChunkSize;
    for (int64_t c = 0; c < chunks; ++c) {
      table.tensor[blocks] = static_cast<uint16_t>(tensors - 1);
      table.chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      if (blocks == Table::kMaxBlocks || (last_chunk && tensors == Table::kMaxTensors)) {
        launch(table, blocks);
        blocks = 0;
        if (last_chunk) {
          tensors = 0;
        } else {  // the rest of this tensor's chunks go to the next table, in slot 0
          for (int d = 0; d < kDepth; ++d) table.ptr[d][0] = e.ptr[d];
          table.numel[0] = e.numel;
          table.extra[0] = e.extra;
          tensors = 1;
        }
      }
    }
  }
  if (blocks > 0) launch(table, blocks);
}

}  // namespace fused_adagrad::cuda

// Transparent huge pages for the large CPU tensors this library allocates (Adagrad state,
// FusedEmbeddingBags' tables). A sparse step updates rows scattered over tables of gigabytes; on
// 4 KiB pages nearly every touched row is a TLB miss, whose page walk (two nested walks under a
// hypervisor) waits on memory before the row's own load can start. With 2 MiB pages the page
// tables of a 1 GiB table fit in cache. Most distributions set THP to "madvise", so huge pages
// must be asked for, and before the memory is first written: a page already faulted in stays
// small until khugepaged gets to it.
#include "fused_adagrad/fused_adagrad.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fused_adagrad {

namespace {

constexpr uintptr_t kHugePage = uintptr_t{2} << 20;

bool huge_pages_wanted() {
  static const bool wanted = [] {
    const char* v = std::getenv("FUSED_ADAGRAD_HUGE_PAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return wanted;
}

}  // namespace

bool advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!huge_pages_wanted() || !t.defined() || !t.is_cpu() || !t.has_storage()) return false;
  const c10::Storage& storage = t.storage();
  const auto begin = reinterpret_cast<uintptr_t>(storage.data());
  if (begin == 0) return false;
  // Only the whole huge pages inside the tensor's own allocation: the memory around it may
  // belong to someone else.
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + storage.nbytes()) & ~(kHugePage - 1);
  if (last <= first) return false;
  // Advice, not a requirement: a kernel without THP (EINVAL) leaves the tensor as it was.
  return madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE) == 0;
#else
  (void)t;
  return false;
#endif
}

}  // namespace fused_adagrad

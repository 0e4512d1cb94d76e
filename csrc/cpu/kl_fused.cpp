// CPU version of the fused KL (contract: ops.h kl_fused): the statistics, the combine step of
// one shard and the weighted gradient, a few rows at a time so that each row pair is still in
// the cache when the gradient reads it again (the CPU counterpart of keeping it on chip); and
// its backward for the gradient actually received (kl_backward_fixup).
#include <algorithm>
#include <cstdint>

#include "scope_kernels/ops.h"

namespace scope_kernels {
namespace cpu {

template <typename T>
void kl_fused(const KLArgs<T>& args, const acc_t<T>* weight, acc_t<T>* kl, acc_t<T>* row_stats,
              int32_t* flags, MutRows<T> grad, int64_t row_begin, int64_t row_end) {
  using Acc = acc_t<T>;
  constexpr int64_t kMaxBlock = 16;
  // Rows per block: about 256 KB of the two inputs, within a core's L2.
  const int64_t row_bytes = 2 * args.student.cols * static_cast<int64_t>(sizeof(T));
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(kMaxBlock, (256 << 10) / std::max<int64_t>(row_bytes, 1)));
  Acc stats[kMaxBlock * KLStatsLayout::kWidth];
  for (int64_t b = row_begin; b < row_end; b += block) {
    const int64_t n = std::min(block, row_end - b);
    KLArgs<T> part = args;
    part.student.data += b * args.student.row_stride;
    part.teacher.data += b * args.teacher.row_stride;
    part.student.rows = part.teacher.rows = n;
    MutRows<T> out = grad;
    out.data += b * grad.row_stride;
    out.rows = n;
    kl_partial<T>(part, stats, 0, n);
    kl_combine<Acc>(stats, 1, n, args.reverse, args.inv_temperature_student,
                    args.inv_temperature_teacher, kl + b, row_stats + b * KLRowLayout::kWidth,
                    flags + b, 0, n);
    kl_backward<T>(part, weight + b, row_stats + b * KLRowLayout::kWidth, out, 0, n);
  }
}

template <typename T>
int64_t kl_backward_fixup(const KLArgs<T>& args, const acc_t<T>* grad_out, const acc_t<T>* expected,
                          const acc_t<T>* row_stats, MutRows<T> grad, int64_t row_begin,
                          int64_t row_end) {
  // Each maximal run of rows whose received gradient differs goes through kl_backward at once.
  int64_t rewritten = 0;
  int64_t r = row_begin;
  while (r < row_end) {
    if (grad_out[r] == expected[r]) {
      ++r;
      continue;
    }
    int64_t end = r + 1;
    while (end < row_end && !(grad_out[end] == expected[end])) ++end;
    kl_backward<T>(args, grad_out, row_stats, grad, r, end);
    rewritten += end - r;
    r = end;
  }
  return rewritten;
}

#define SCOPE_INSTANTIATE_KL_FUSED(T)                                                       \
  template void kl_fused<T>(const KLArgs<T>&, const acc_t<T>*, acc_t<T>*, acc_t<T>*, int32_t*, \
                            MutRows<T>, int64_t, int64_t);                                  \
  template int64_t kl_backward_fixup<T>(const KLArgs<T>&, const acc_t<T>*, const acc_t<T>*,    \
                                        const acc_t<T>*, MutRows<T>, int64_t, int64_t);

SCOPE_INSTANTIATE_KL_FUSED(float)
SCOPE_INSTANTIATE_KL_FUSED(double)
SCOPE_INSTANTIATE_KL_FUSED(BFloat16)
SCOPE_INSTANTIATE_KL_FUSED(Half)

#undef SCOPE_INSTANTIATE_KL_FUSED

}  // namespace cpu
}  // namespace scope_kernels

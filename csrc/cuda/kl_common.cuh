// Pieces shared by the KL kernels (kl.cu: partial statistics and backward; kl_fused.cu: loss
// and gradient in one pass): the gradient of one student element and the alignment test.
#pragma once

#include "common.cuh"

namespace scope_kernels {
namespace cuda {
namespace detail {

// Gradient of one student element from the combined row statistics, with the log-probs
// ls = log p, lt = log q computed as the CPU kernel does (the reverse-KL bracket subtracts
// numbers as large as the logits / T, so their rounding matters); zero on padding columns.
//   forward: g * (p - q)
//   reverse: g * p * ((ls - lt) - KL)
template <typename Acc, bool kReverse>
struct KLGrad {
  Acc g, m_s, inv_s, log_sum_s, m_t, inv_t, log_sum_t, kl;
  int64_t valid;

  // The gradient of a valid column.
  __device__ __forceinline__ Acc value(Acc s, Acc t) const {
    const Acc ls = (s - m_s) * inv_s - log_sum_s;
    const Acc lt = (t - m_t) * inv_t - log_sum_t;
    if constexpr (kReverse) {
      return g * exp_acc(ls) * ((ls - lt) - kl);
    } else {
      return g * (exp_acc(ls) - exp_acc(lt));
    }
  }

  // The gradient of column j (0 on padding).
  __device__ __forceinline__ Acc operator()(Acc s, Acc t, int64_t j) const {
    const Acc v = value(s, t);
    return j < valid ? v : Acc(0);
  }
};

template <typename T>
inline bool pair_aligned(const KLArgs<T>& args) {
  return rows_aligned(args.student.data, args.student.rows, args.student.row_stride) &&
         rows_aligned(args.teacher.data, args.teacher.rows, args.teacher.row_stride);
}

}  // namespace detail
}  // namespace cuda
}  // namespace scope_kernels

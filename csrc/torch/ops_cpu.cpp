// CPU backend of the scope_megatron ops (ops_impl.h): the kernels of csrc/cpu, split over rows
// with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

#include "ops_impl.h"

namespace scope_megatron {
namespace {

namespace k = scope_kernels;

template <typename Body>
void parallel_rows(int64_t rows, int64_t cols, const Body& body) {
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t b, int64_t e) { body(b, e); });
}

struct CpuBackend {
  static constexpr bool kHostIndices = true;
  struct Guard {
    explicit Guard(const at::Device&) {}
  };
  static void check_device(const at::Tensor&, const char*, const char*) {}  // dispatch did it

  template <typename T>
  static void logprob_partial(const k::LogprobArgs<T>& args, k::acc_t<T>* stats,
                              const at::Device&, const char*) {
    parallel_rows(args.logits.rows, args.logits.cols,
                  [&](int64_t b, int64_t e) { k::cpu::logprob_partial<T>(args, stats, b, e); });
  }

  template <typename Acc>
  static void logprob_combine(const Acc* stats, int64_t shards, int64_t rows, Acc inv_t,
                              Acc* logprob, Acc* row_stats, int32_t* flags, const at::Device&,
                              const char*) {
    k::cpu::logprob_combine<Acc>(stats, shards, rows, inv_t, logprob, row_stats, flags, 0, rows);
  }

  template <typename T>
  static void logprob_backward(const k::LogprobArgs<T>& args, const k::acc_t<T>* grad_out,
                               const k::acc_t<T>* row_stats, k::MutRows<T> grad,
                               const at::Device&, const char*) {
    parallel_rows(args.logits.rows, args.logits.cols, [&](int64_t b, int64_t e) {
      k::cpu::logprob_backward<T>(args, grad_out, row_stats, grad, b, e);
    });
  }

  template <typename T>
  static void kl_partial(const k::KLArgs<T>& args, k::acc_t<T>* stats, const at::Device&,
                         const char*) {
    parallel_rows(args.student.rows, args.student.cols,
                  [&](int64_t b, int64_t e) { k::cpu::kl_partial<T>(args, stats, b, e); });
  }

  template <typename Acc>
  static void kl_combine(const Acc* stats, int64_t shards, int64_t rows, bool reverse, Acc inv_ts,
                         Acc inv_tt, Acc* kl, Acc* row_stats, int32_t* flags, const at::Device&,
                         const char*) {
    k::cpu::kl_combine<Acc>(stats, shards, rows, reverse, inv_ts, inv_tt, kl, row_stats, flags, 0,
                            rows);
  }

  template <typename T>
  static void kl_backward(const k::KLArgs<T>& args, const k::acc_t<T>* grad_out,
                          const k::acc_t<T>* row_stats, k::MutRows<T> grad, const at::Device&,
                          const char*) {
    parallel_rows(args.student.rows, args.student.cols, [&](int64_t b, int64_t e) {
      k::cpu::kl_backward<T>(args, grad_out, row_stats, grad, b, e);
    });
  }

  template <typename T>
  static void kl_backward_fixup(const k::KLArgs<T>& args, const k::acc_t<T>* grad_out,
                                const k::acc_t<T>* expected, const k::acc_t<T>* row_stats,
                                k::MutRows<T> grad, int64_t* mismatches, const at::Device&,
                                const char*) {
    std::atomic<int64_t> rewritten{0};
    parallel_rows(args.student.rows, args.student.cols, [&](int64_t b, int64_t e) {
      rewritten += k::cpu::kl_backward_fixup<T>(args, grad_out, expected, row_stats, grad, b, e);
    });
    if (mismatches != nullptr) *mismatches += rewritten.load();
  }

  template <typename T>
  static bool kl_fused_on_chip(const k::KLArgs<T>&) {
    return true;  // the CPU kernel blocks rows to stay in cache for any shape
  }

  template <typename T>
  static void kl_fused(const k::KLArgs<T>& args, const k::acc_t<T>* weight, k::acc_t<T>* kl,
                       k::acc_t<T>* row_stats, int32_t* flags, k::MutRows<T> grad,
                       const at::Device&, const char*) {
    parallel_rows(args.student.rows, args.student.cols, [&](int64_t b, int64_t e) {
      k::cpu::kl_fused<T>(args, weight, kl, row_stats, flags, grad, b, e);
    });
  }

  template <typename T>
  static void sequence_logppl(const T* values, const bool* mask, const int64_t* offsets,
                              int64_t seqs, T* log_ppl, int64_t* count, const at::Device&,
                              const char*) {
    k::cpu::sequence_logppl<T>(values, mask, offsets, log_ppl, count, 0, seqs);
  }

  template <typename T>
  static void sequence_logppl_backward(const T* grad_out, const bool* mask,
                                       const int64_t* offsets, const int64_t* count, int64_t seqs,
                                       int64_t /*num_values*/, T* grad, const at::Device&,
                                       const char*) {
    k::cpu::sequence_logppl_backward<T>(grad_out, mask, offsets, count, grad, 0, seqs);
  }

  template <typename T>
  static void group_weights(const T* log_ppl, const int64_t* group_index, const bool* member,
                            int64_t n, int64_t num_groups, T sign_over_tau, bool mean_scale, T* out,
                            const at::Device&, const char*) {
    k::cpu::group_weights<T>(log_ppl, group_index, member, n, num_groups, sign_over_tau,
                             mean_scale, out);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(scope_megatron, CPU, m) { register_ops<CpuBackend>(m); }

}  // namespace scope_megatron

// The eleven scope_megatron ops written once for every backend: input checks, output allocation
// and dtype dispatch around a Backend policy that runs the kernels (ops_cpu.cpp: CPU kernels
// with at::parallel_for; ops_cuda.cpp: CUDA launchers on the current stream).
//
// A Backend provides:
//   kHostIndices                 true if index tensors (offsets, group ids) live on the host and
//                                can be validated here (the CUDA path relies on the Python layer)
//   Guard(device)                RAII device guard
//   check_device(t, op, name)    the tensor is on this backend's device type
//   logprob_partial / logprob_combine / logprob_backward / kl_partial / kl_combine /
//   kl_backward / kl_fused / kl_backward_fixup / sequence_logppl / sequence_logppl_backward / group_weights (kernel calls with
//   the arguments of csrc/include/scope_kernels/ops.h, plus the device)
//   kl_fused_on_chip<T>(args)    whether kl_fused runs in one pass for these inputs (else the
//                                op composes kl_partial, kl_combine and kl_backward)
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common.h"

namespace scope_megatron {
namespace impl {

namespace k = scope_kernels;

template <typename T>
k::LogprobArgs<T> logprob_args(const at::Tensor& logits, const at::Tensor& target,
                               int64_t vocab_start, int64_t vocab_size, double inv_temperature) {
  return {const_rows<T>(logits), cptr<int64_t>(target), vocab_start, vocab_size,
          static_cast<k::acc_t<T>>(inv_temperature)};
}

template <typename T>
k::KLArgs<T> kl_args(const at::Tensor& student, const at::Tensor& teacher, int64_t vocab_start,
                     int64_t vocab_size, double inv_ts, double inv_tt, bool reverse) {
  using Acc = k::acc_t<T>;
  return {const_rows<T>(student), const_rows<T>(teacher), vocab_start, vocab_size,
          static_cast<Acc>(inv_ts), static_cast<Acc>(inv_tt), reverse};
}

// Offsets and group ids are read by the kernels as indices: check them where they are host data.
inline void check_offsets_on_host(const at::Tensor& offsets, int64_t num_values, const char* op) {
  const int64_t* o = offsets.const_data_ptr<int64_t>();
  const int64_t n = offsets.size(0);
  TORCH_CHECK(o[0] >= 0, op, ": offsets[0] must be >= 0, got ", o[0]);
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK(o[i] >= o[i - 1], op, ": offsets must be non-decreasing, but offsets[", i,
                "] = ", o[i], " < offsets[", i - 1, "] = ", o[i - 1]);
  }
  TORCH_CHECK(o[n - 1] <= num_values, op, ": offsets[-1] = ", o[n - 1],
              " exceeds the number of values ", num_values);
}

inline void check_group_index_on_host(const at::Tensor& group_index, int64_t num_groups,
                                      const char* op) {
  const int64_t* gi = group_index.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < group_index.size(0); ++i) {
    TORCH_CHECK(gi[i] >= 0 && gi[i] < num_groups, op, ": group_index[", i, "] = ", gi[i],
                " is outside [0, ", num_groups, ")");
  }
}

template <typename B>
at::Tensor logprob_partial(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start,
                           int64_t vocab_size, double inv_temperature) {
  constexpr const char* op = "scope_megatron::logprob_partial";
  B::check_device(logits, op, "logits");
  check_logits(logits, op, "logits");
  check_vector(target, logits.size(0), at::kLong, op, "target", logits.device());
  check_vocab(vocab_start, vocab_size, op);
  const typename B::Guard guard(logits.device());
  at::Tensor stats = at::empty({logits.size(0), k::LogprobStatsLayout::kWidth},
                               logits.options().dtype(acc_dtype(logits.scalar_type())));
  dispatch_logits_dtype(logits.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    B::template logprob_partial<T>(
        logprob_args<T>(logits, target, vocab_start, vocab_size, inv_temperature),
        mptr<k::acc_t<T>>(stats), logits.device(), op);
  });
  return stats;
}

template <typename B>
std::tuple<at::Tensor, at::Tensor, at::Tensor> logprob_combine(const at::Tensor& stats,
                                                               double inv_temperature) {
  constexpr const char* op = "scope_megatron::logprob_combine";
  B::check_device(stats, op, "stats");
  check_stats(stats, k::LogprobStatsLayout::kWidth, op);
  const typename B::Guard guard(stats.device());
  const int64_t shards = stats.size(0), rows = stats.size(1);
  at::Tensor logprob = at::empty({rows}, stats.options());
  at::Tensor row_stats = at::empty({rows, k::LogprobRowLayout::kWidth}, stats.options());
  at::Tensor flags = at::empty({rows}, stats.options().dtype(at::kInt));
  dispatch_acc_dtype(stats.scalar_type(), op, [&](auto tag) {
    using Acc = typename decltype(tag)::type;
    B::template logprob_combine<Acc>(cptr<Acc>(stats), shards, rows,
                                     static_cast<Acc>(inv_temperature), mptr<Acc>(logprob),
                                     mptr<Acc>(row_stats), mptr<int32_t>(flags), stats.device(),
                                     op);
  });
  return {logprob, row_stats, flags};
}

template <typename B>
at::Tensor logprob_backward(const at::Tensor& grad_out, const at::Tensor& logits,
                            const at::Tensor& target, const at::Tensor& row_stats,
                            int64_t vocab_start, int64_t vocab_size, double inv_temperature) {
  constexpr const char* op = "scope_megatron::logprob_backward";
  B::check_device(logits, op, "logits");
  check_logits(logits, op, "logits");
  const int64_t rows = logits.size(0);
  const auto acc = acc_dtype(logits.scalar_type());
  check_vector(target, rows, at::kLong, op, "target", logits.device());
  check_vector(grad_out, rows, acc, op, "grad_out", logits.device());
  check_row_stats(row_stats, rows, k::LogprobRowLayout::kWidth, acc, op, logits.device());
  check_vocab(vocab_start, vocab_size, op);
  const typename B::Guard guard(logits.device());
  at::Tensor grad = at::empty({rows, logits.size(1)}, logits.options());
  dispatch_logits_dtype(logits.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = k::acc_t<T>;
    B::template logprob_backward<T>(
        logprob_args<T>(logits, target, vocab_start, vocab_size, inv_temperature),
        cptr<Acc>(grad_out), cptr<Acc>(row_stats), mut_rows<T>(grad), logits.device(), op);
  });
  return grad;
}

template <typename B>
at::Tensor kl_partial(const at::Tensor& student, const at::Tensor& teacher, int64_t vocab_start,
                      int64_t vocab_size, double inv_temperature_student,
                      double inv_temperature_teacher, bool reverse) {
  constexpr const char* op = "scope_megatron::kl_partial";
  B::check_device(student, op, "student_logits");
  check_kl_pair(student, teacher, op);
  check_vocab(vocab_start, vocab_size, op);
  const typename B::Guard guard(student.device());
  at::Tensor stats = at::empty({student.size(0), k::KLStatsLayout::kWidth},
                               student.options().dtype(acc_dtype(student.scalar_type())));
  dispatch_logits_dtype(student.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    B::template kl_partial<T>(kl_args<T>(student, teacher, vocab_start, vocab_size,
                                         inv_temperature_student, inv_temperature_teacher,
                                         reverse),
                              mptr<k::acc_t<T>>(stats), student.device(), op);
  });
  return stats;
}

template <typename B>
std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_combine(const at::Tensor& stats, bool reverse,
                                                          double inv_temperature_student,
                                                          double inv_temperature_teacher) {
  constexpr const char* op = "scope_megatron::kl_combine";
  B::check_device(stats, op, "stats");
  check_stats(stats, k::KLStatsLayout::kWidth, op);
  const typename B::Guard guard(stats.device());
  const int64_t shards = stats.size(0), rows = stats.size(1);
  at::Tensor kl = at::empty({rows}, stats.options());
  at::Tensor row_stats = at::empty({rows, k::KLRowLayout::kWidth}, stats.options());
  at::Tensor flags = at::empty({rows}, stats.options().dtype(at::kInt));
  dispatch_acc_dtype(stats.scalar_type(), op, [&](auto tag) {
    using Acc = typename decltype(tag)::type;
    B::template kl_combine<Acc>(cptr<Acc>(stats), shards, rows, reverse,
                                static_cast<Acc>(inv_temperature_student),
                                static_cast<Acc>(inv_temperature_teacher), mptr<Acc>(kl),
                                mptr<Acc>(row_stats), mptr<int32_t>(flags), stats.device(), op);
  });
  return {kl, row_stats, flags};
}

// The inputs of the KL backward ops (kl_backward, kl_backward_fixup).
template <typename B>
void check_kl_backward_inputs(const at::Tensor& grad_out, const at::Tensor& student,
                              const at::Tensor& teacher, const at::Tensor& row_stats,
                              int64_t vocab_start, int64_t vocab_size, const char* op) {
  B::check_device(student, op, "student_logits");
  check_kl_pair(student, teacher, op);
  check_vocab(vocab_start, vocab_size, op);
  const int64_t rows = student.size(0);
  const auto acc = acc_dtype(student.scalar_type());
  check_vector(grad_out, rows, acc, op, "grad_out", student.device());
  check_row_stats(row_stats, rows, k::KLRowLayout::kWidth, acc, op, student.device());
}

template <typename B>
at::Tensor kl_backward(const at::Tensor& grad_out, const at::Tensor& student,
                       const at::Tensor& teacher, const at::Tensor& row_stats,
                       int64_t vocab_start, int64_t vocab_size, double inv_temperature_student,
                       double inv_temperature_teacher, bool reverse) {
  constexpr const char* op = "scope_megatron::kl_backward";
  check_kl_backward_inputs<B>(grad_out, student, teacher, row_stats, vocab_start, vocab_size, op);
  const int64_t rows = student.size(0);
  const typename B::Guard guard(student.device());
  at::Tensor grad = at::empty({rows, student.size(1)}, student.options());
  dispatch_logits_dtype(student.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = k::acc_t<T>;
    B::template kl_backward<T>(kl_args<T>(student, teacher, vocab_start, vocab_size,
                                          inv_temperature_student, inv_temperature_teacher,
                                          reverse),
                               cptr<Acc>(grad_out), cptr<Acc>(row_stats), mut_rows<T>(grad),
                               student.device(), op);
  });
  return grad;
}

// The backward of kl_fused for the upstream gradient received (grad_out): grad holds kl_fused's
// gradient for `expected` and is rewritten in place on the rows where the two differ.
template <typename B>
void kl_backward_fixup(at::Tensor& grad, const at::Tensor& grad_out, const at::Tensor& expected,
                       const at::Tensor& student, const at::Tensor& teacher,
                       const at::Tensor& row_stats, int64_t vocab_start, int64_t vocab_size,
                       double inv_temperature_student, double inv_temperature_teacher,
                       bool reverse, const std::optional<at::Tensor>& mismatches) {
  constexpr const char* op = "scope_megatron::kl_backward_fixup";
  check_kl_backward_inputs<B>(grad_out, student, teacher, row_stats, vocab_start, vocab_size, op);
  check_vector(expected, student.size(0), acc_dtype(student.scalar_type()), op, "expected",
               student.device());
  TORCH_CHECK(grad.sizes() == student.sizes() && grad.scalar_type() == student.scalar_type() &&
                  grad.device() == student.device() && grad.is_contiguous(),
              op, ": grad must be a contiguous tensor of the student logits' shape, dtype and "
              "device (kl_fused's gradient), got ", grad.sizes(), " ", grad.scalar_type());
  int64_t* counter = nullptr;
  if (mismatches.has_value() && mismatches->defined()) {
    TORCH_CHECK(mismatches->numel() == 1 && mismatches->scalar_type() == at::kLong &&
                    mismatches->device() == student.device() && mismatches->is_contiguous(),
                op, ": mismatches must be a one-element int64 tensor on the logits' device (a "
                "running count), got ", mismatches->sizes(), " ", mismatches->scalar_type(), " on ",
                mismatches->device());
    counter = mismatches->data_ptr<int64_t>();
  }
  const typename B::Guard guard(student.device());
  dispatch_logits_dtype(student.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = k::acc_t<T>;
    B::template kl_backward_fixup<T>(kl_args<T>(student, teacher, vocab_start, vocab_size,
                                                inv_temperature_student, inv_temperature_teacher,
                                                reverse),
                                     cptr<Acc>(grad_out), cptr<Acc>(expected), cptr<Acc>(row_stats),
                                     mut_rows<T>(grad), counter, student.device(), op);
  });
}

// KL and weighted gradient of a shard holding the whole vocabulary, in one pass where the
// backend can (kl_fused_on_chip), else through the three phases; the results are the same.
template <typename B>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kl_fused(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& weight,
    int64_t vocab_size, double inv_temperature_student, double inv_temperature_teacher,
    bool reverse) {
  constexpr const char* op = "scope_megatron::kl_fused";
  B::check_device(student, op, "student_logits");
  check_kl_pair(student, teacher, op);
  check_vocab(0, vocab_size, op);
  const int64_t rows = student.size(0);
  const auto acc = acc_dtype(student.scalar_type());
  check_vector(weight, rows, acc, op, "weight", student.device());
  const typename B::Guard guard(student.device());
  bool on_chip = false;
  dispatch_logits_dtype(student.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    on_chip = B::template kl_fused_on_chip<T>(kl_args<T>(student, teacher, 0, vocab_size,
                                                         inv_temperature_student,
                                                         inv_temperature_teacher, reverse));
  });
  if (!on_chip) {
    const at::Tensor stats = kl_partial<B>(student, teacher, 0, vocab_size,
                                           inv_temperature_student, inv_temperature_teacher, reverse);
    auto [kl, row_stats, flags] = kl_combine<B>(stats.unsqueeze(0), reverse,
                                                inv_temperature_student, inv_temperature_teacher);
    at::Tensor grad = kl_backward<B>(weight, student, teacher, row_stats, 0, vocab_size,
                          inv_temperature_student, inv_temperature_teacher, reverse);
    return {kl, row_stats, flags, grad};
  }
  at::Tensor grad = at::empty({rows, student.size(1)}, student.options());
  at::Tensor kl = at::empty({rows}, weight.options());
  at::Tensor row_stats = at::empty({rows, k::KLRowLayout::kWidth}, weight.options());
  at::Tensor flags = at::empty({rows}, weight.options().dtype(at::kInt));
  dispatch_logits_dtype(student.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = k::acc_t<T>;
    B::template kl_fused<T>(kl_args<T>(student, teacher, 0, vocab_size, inv_temperature_student,
                                       inv_temperature_teacher, reverse),
                            cptr<Acc>(weight), mptr<Acc>(kl), mptr<Acc>(row_stats),
                            mptr<int32_t>(flags), mut_rows<T>(grad), student.device(), op);
  });
  return {kl, row_stats, flags, grad};
}

template <typename B>
std::tuple<at::Tensor, at::Tensor> sequence_logppl(const at::Tensor& values,
                                                   const c10::optional<at::Tensor>& mask,
                                                   const at::Tensor& offsets) {
  constexpr const char* op = "scope_megatron::sequence_logppl";
  B::check_device(values, op, "values");
  check_segments(values, mask, offsets, op);
  if (B::kHostIndices) check_offsets_on_host(offsets, values.size(0), op);
  const typename B::Guard guard(values.device());
  const int64_t seqs = offsets.size(0) - 1;
  at::Tensor log_ppl = at::empty({seqs}, values.options());
  at::Tensor count = at::empty({seqs}, values.options().dtype(at::kLong));
  dispatch_acc_dtype(values.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool* m = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
    B::template sequence_logppl<T>(cptr<T>(values), m, offsets.const_data_ptr<int64_t>(), seqs,
                                   mptr<T>(log_ppl), count.mutable_data_ptr<int64_t>(),
                                   values.device(), op);
  });
  return {log_ppl, count};
}

template <typename B>
at::Tensor sequence_logppl_backward(const at::Tensor& grad_out,
                                    const c10::optional<at::Tensor>& mask,
                                    const at::Tensor& offsets, const at::Tensor& count,
                                    int64_t num_values) {
  constexpr const char* op = "scope_megatron::sequence_logppl_backward";
  B::check_device(grad_out, op, "grad_out");
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1, op,
              ": offsets must have shape [sequences + 1], got ", offsets.sizes());
  TORCH_CHECK(num_values >= 0, op, ": num_values must be >= 0, got ", num_values);
  const int64_t seqs = offsets.size(0) - 1;
  TORCH_CHECK(grad_out.dim() == 1 && grad_out.size(0) == seqs && grad_out.is_contiguous(), op,
              ": grad_out must be a contiguous tensor of shape [", seqs, "]");
  const typename B::Guard guard(grad_out.device());
  // Positions outside every sequence keep these zeros.
  at::Tensor grad = at::zeros({num_values}, grad_out.options());
  check_segments(grad, mask, offsets, op);
  check_vector(count, seqs, at::kLong, op, "count", grad_out.device());
  if (B::kHostIndices) check_offsets_on_host(offsets, num_values, op);
  dispatch_acc_dtype(grad_out.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool* m = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
    B::template sequence_logppl_backward<T>(cptr<T>(grad_out), m,
                                            offsets.const_data_ptr<int64_t>(),
                                            count.const_data_ptr<int64_t>(), seqs, num_values,
                                            mptr<T>(grad), grad_out.device(), op);
  });
  return grad;
}

template <typename B>
at::Tensor group_weights(const at::Tensor& log_ppl, const at::Tensor& group_index,
                         const at::Tensor& member, int64_t num_groups, double sign_over_tau,
                         bool mean_scale) {
  constexpr const char* op = "scope_megatron::group_weights";
  B::check_device(log_ppl, op, "log_ppl");
  TORCH_CHECK(log_ppl.dim() == 1 && log_ppl.is_contiguous(), op,
              ": log_ppl must be a contiguous 1-D tensor");
  const int64_t n = log_ppl.size(0);
  check_vector(group_index, n, at::kLong, op, "group_index", log_ppl.device());
  check_vector(member, n, at::kBool, op, "member", log_ppl.device());
  TORCH_CHECK(num_groups >= 0, op, ": num_groups must be >= 0");
  if (B::kHostIndices) check_group_index_on_host(group_index, num_groups, op);
  const typename B::Guard guard(log_ppl.device());
  at::Tensor out = at::empty({n}, log_ppl.options());
  dispatch_acc_dtype(log_ppl.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    B::template group_weights<T>(cptr<T>(log_ppl), cptr<int64_t>(group_index),
                                 member.const_data_ptr<bool>(), n, num_groups,
                                 static_cast<T>(sign_over_tau), mean_scale, mptr<T>(out),
                                 log_ppl.device(), op);
  });
  return out;
}

}  // namespace impl

// Registers the eleven ops for a dispatch key with backend B (inside TORCH_LIBRARY_IMPL).
template <typename B>
void register_ops(torch::Library& m) {
  m.impl("logprob_partial", &impl::logprob_partial<B>);
  m.impl("logprob_combine", &impl::logprob_combine<B>);
  m.impl("logprob_backward", &impl::logprob_backward<B>);
  m.impl("kl_partial", &impl::kl_partial<B>);
  m.impl("kl_combine", &impl::kl_combine<B>);
  m.impl("kl_backward", &impl::kl_backward<B>);
  m.impl("kl_fused", &impl::kl_fused<B>);
  m.impl("kl_backward_fixup", &impl::kl_backward_fixup<B>);
  m.impl("sequence_logppl", &impl::sequence_logppl<B>);
  m.impl("sequence_logppl_backward", &impl::sequence_logppl_backward<B>);
  m.impl("group_weights", &impl::group_weights<B>);
}

}  // namespace scope_megatron

// CPU implementations of the scope_megatron ops: checks, allocation, and at::parallel_for over
// rows around the kernels of csrc/cpu.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

namespace scope_megatron {
namespace {

namespace k = scope_kernels;
using k::KLStatsLayout;
using k::KLRowLayout;
using k::LogprobRowLayout;
using k::LogprobStatsLayout;

template <typename Body>
void parallel_rows(int64_t rows, int64_t cols, const Body& body) {
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t b, int64_t e) { body(b, e); });
}

at::Tensor logprob_partial(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start,
                           int64_t vocab_size, double inv_temperature) {
  constexpr const char* op = "scope_megatron::logprob_partial";
  check_logits(logits, op, "logits");
  check_vector(target, logits.size(0), at::kLong, op, "target", logits.device());
  check_vocab(vocab_start, vocab_size, op);
  const int64_t rows = logits.size(0);
  at::Tensor stats = at::empty({rows, LogprobStatsLayout::kWidth},
                               logits.options().dtype(acc_dtype(logits.scalar_type())));
  dispatch_logits_dtype(logits.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = k::acc_t<T>;
    const k::LogprobArgs<T> args{const_rows<T>(logits), cptr<int64_t>(target), vocab_start,
                                 vocab_size, static_cast<Acc>(inv_temperature)};
    Acc* out = mptr<Acc>(stats);
    parallel_rows(rows, logits.size(1),
                  [&](int64_t b, int64_t e) { k::cpu::logprob_partial<T>(args, out, b, e); });
  });
  return stats;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprob_combine(const at::Tensor& stats,
                                                               double inv_temperature) {
  constexpr const char* op = "scope_megatron::logprob_combine";
  check_stats(stats, LogprobStatsLayout::kWidth, op);
  const int64_t shards = stats.size(0), rows = stats.size(1);
  at::Tensor logprob = at::empty({rows}, stats.options());
  at::Tensor row_stats = at::empty({rows, LogprobRowLayout::kWidth}, stats.options());
  at::Tensor flags = at::empty({rows}, stats.options().dtype(at::kInt));
  dispatch_acc_dtype(stats.scalar_type(), op, [&](auto tag) {
    using Acc = typename decltype(tag)::type;
    k::cpu::logprob_combine<Acc>(cptr<Acc>(stats), shards, rows, static_cast<Acc>(inv_temperature),
                                 mptr<Acc>(logprob), mptr<Acc>(row_stats), mptr<int32_t>(flags),
                                 0, rows);
  });
  return {logprob, row_stats, flags};
}

at::Tensor logprob_backward(const at::Tensor& grad_out, const at::Tensor& logits,
                            const at::Tensor& target, const at::Tensor& row_stats,
                            int64_t vocab_start, int64_t vocab_size, double inv_temperature) {
  constexpr const char* op = "scope_megatron::logprob_backward";
  check_logits(logits, op, "logits");
  const int64_t rows = logits.size(0);
  const auto acc = acc_dtype(logits.scalar_type());
  check_vector(target, rows, at::kLong, op, "target", logits.device());
  check_vector(grad_out, rows, acc, op, "grad_out", logits.device());
  check_row_stats(row_stats, rows, LogprobRowLayout::kWidth, acc, op, logits.device());
  check_vocab(vocab_start, vocab_size, op);
  at::Tensor grad = at::empty({rows, logits.size(1)}, logits.options());
  dispatch_logits_dtype(logits.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = k::acc_t<T>;
    const k::LogprobArgs<T> args{const_rows<T>(logits), cptr<int64_t>(target), vocab_start,
                                 vocab_size, static_cast<Acc>(inv_temperature)};
    const Acc* g = cptr<Acc>(grad_out);
    const Acc* rs = cptr<Acc>(row_stats);
    auto out = mut_rows<T>(grad);
    parallel_rows(rows, logits.size(1), [&](int64_t b, int64_t e) {
      k::cpu::logprob_backward<T>(args, g, rs, out, b, e);
    });
  });
  return grad;
}

at::Tensor kl_partial(const at::Tensor& student, const at::Tensor& teacher, int64_t vocab_start,
                      int64_t vocab_size, double inv_temperature_student,
                      double inv_temperature_teacher, bool reverse) {
  constexpr const char* op = "scope_megatron::kl_partial";
  check_kl_pair(student, teacher, op);
  check_vocab(vocab_start, vocab_size, op);
  const int64_t rows = student.size(0);
  at::Tensor stats = at::empty({rows, KLStatsLayout::kWidth},
                               student.options().dtype(acc_dtype(student.scalar_type())));
  dispatch_logits_dtype(student.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = k::acc_t<T>;
    const k::KLArgs<T> args{const_rows<T>(student),
                            const_rows<T>(teacher),
                            vocab_start,
                            vocab_size,
                            static_cast<Acc>(inv_temperature_student),
                            static_cast<Acc>(inv_temperature_teacher),
                            reverse};
    Acc* out = mptr<Acc>(stats);
    parallel_rows(rows, student.size(1),
                  [&](int64_t b, int64_t e) { k::cpu::kl_partial<T>(args, out, b, e); });
  });
  return stats;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_combine(const at::Tensor& stats, bool reverse,
                                                          double inv_temperature_student,
                                                          double inv_temperature_teacher) {
  constexpr const char* op = "scope_megatron::kl_combine";
  check_stats(stats, KLStatsLayout::kWidth, op);
  const int64_t shards = stats.size(0), rows = stats.size(1);
  at::Tensor kl = at::empty({rows}, stats.options());
  at::Tensor row_stats = at::empty({rows, KLRowLayout::kWidth}, stats.options());
  at::Tensor flags = at::empty({rows}, stats.options().dtype(at::kInt));
  dispatch_acc_dtype(stats.scalar_type(), op, [&](auto tag) {
    using Acc = typename decltype(tag)::type;
    k::cpu::kl_combine<Acc>(cptr<Acc>(stats), shards, rows, reverse,
                            static_cast<Acc>(inv_temperature_student),
                            static_cast<Acc>(inv_temperature_teacher), mptr<Acc>(kl),
                            mptr<Acc>(row_stats), mptr<int32_t>(flags), 0, rows);
  });
  return {kl, row_stats, flags};
}

at::Tensor kl_backward(const at::Tensor& grad_out, const at::Tensor& student,
                       const at::Tensor& teacher, const at::Tensor& row_stats,
                       int64_t vocab_start, int64_t vocab_size, double inv_temperature_student,
                       double inv_temperature_teacher, bool reverse) {
  constexpr const char* op = "scope_megatron::kl_backward";
  check_kl_pair(student, teacher, op);
  check_vocab(vocab_start, vocab_size, op);
  const int64_t rows = student.size(0);
  const auto acc = acc_dtype(student.scalar_type());
  check_vector(grad_out, rows, acc, op, "grad_out", student.device());
  check_row_stats(row_stats, rows, KLRowLayout::kWidth, acc, op, student.device());
  at::Tensor grad = at::empty({rows, student.size(1)}, student.options());
  dispatch_logits_dtype(student.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = k::acc_t<T>;
    const k::KLArgs<T> args{const_rows<T>(student),
                            const_rows<T>(teacher),
                            vocab_start,
                            vocab_size,
                            static_cast<Acc>(inv_temperature_student),
                            static_cast<Acc>(inv_temperature_teacher),
                            reverse};
    const Acc* g = cptr<Acc>(grad_out);
    const Acc* rs = cptr<Acc>(row_stats);
    auto out = mut_rows<T>(grad);
    parallel_rows(rows, student.size(1), [&](int64_t b, int64_t e) {
      k::cpu::kl_backward<T>(args, g, rs, out, b, e);
    });
  });
  return grad;
}

// Offsets are read by the kernels as indices: check them on the host before use.
void check_offsets_cpu(const at::Tensor& offsets, int64_t num_values, const char* op) {
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

std::tuple<at::Tensor, at::Tensor> sequence_logppl(const at::Tensor& values,
                                                   const c10::optional<at::Tensor>& mask,
                                                   const at::Tensor& offsets) {
  constexpr const char* op = "scope_megatron::sequence_logppl";
  check_segments(values, mask, offsets, op);
  check_offsets_cpu(offsets, values.size(0), op);
  const int64_t seqs = offsets.size(0) - 1;
  at::Tensor log_ppl = at::empty({seqs}, values.options());
  at::Tensor count = at::empty({seqs}, values.options().dtype(at::kLong));
  dispatch_acc_dtype(values.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool* m = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
    k::cpu::sequence_logppl<T>(cptr<T>(values), m, offsets.const_data_ptr<int64_t>(),
                               mptr<T>(log_ppl), count.mutable_data_ptr<int64_t>(), 0, seqs);
  });
  return {log_ppl, count};
}

at::Tensor sequence_logppl_backward(const at::Tensor& grad_out,
                                    const c10::optional<at::Tensor>& mask,
                                    const at::Tensor& offsets, const at::Tensor& count,
                                    int64_t num_values) {
  constexpr const char* op = "scope_megatron::sequence_logppl_backward";
  const int64_t seqs = offsets.size(0) - 1;
  TORCH_CHECK(grad_out.dim() == 1 && grad_out.size(0) == seqs && grad_out.is_contiguous(), op,
              ": grad_out must be a contiguous tensor of shape [", seqs, "]");
  at::Tensor grad = at::zeros({num_values}, grad_out.options());
  check_segments(grad, mask, offsets, op);
  check_offsets_cpu(offsets, num_values, op);
  check_vector(count, seqs, at::kLong, op, "count", grad_out.device());
  dispatch_acc_dtype(grad_out.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool* m = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
    k::cpu::sequence_logppl_backward<T>(cptr<T>(grad_out), m, offsets.const_data_ptr<int64_t>(),
                                        count.const_data_ptr<int64_t>(), mptr<T>(grad), 0, seqs);
  });
  return grad;
}

at::Tensor group_weights(const at::Tensor& log_ppl, const at::Tensor& group_index,
                         const at::Tensor& member, int64_t num_groups, double sign_over_tau,
                         bool mean_scale) {
  constexpr const char* op = "scope_megatron::group_weights";
  TORCH_CHECK(log_ppl.dim() == 1 && log_ppl.is_contiguous(), op,
              ": log_ppl must be a contiguous 1-D tensor");
  const int64_t n = log_ppl.size(0);
  check_vector(group_index, n, at::kLong, op, "group_index", log_ppl.device());
  check_vector(member, n, at::kBool, op, "member", log_ppl.device());
  TORCH_CHECK(num_groups >= 0, op, ": num_groups must be >= 0");
  const int64_t* gi = group_index.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(gi[i] >= 0 && gi[i] < num_groups, op, ": group_index[", i, "] = ", gi[i],
                " is outside [0, ", num_groups, ")");
  }
  at::Tensor out = at::empty({n}, log_ppl.options());
  dispatch_acc_dtype(log_ppl.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    k::cpu::group_weights<T>(cptr<T>(log_ppl), gi, member.const_data_ptr<bool>(), n, num_groups,
                             static_cast<T>(sign_over_tau), mean_scale, mptr<T>(out));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(scope_megatron, CPU, m) {
  m.impl("logprob_partial", &logprob_partial);
  m.impl("logprob_combine", &logprob_combine);
  m.impl("logprob_backward", &logprob_backward);
  m.impl("kl_partial", &kl_partial);
  m.impl("kl_combine", &kl_combine);
  m.impl("kl_backward", &kl_backward);
  m.impl("sequence_logppl", &sequence_logppl);
  m.impl("sequence_logppl_backward", &sequence_logppl_backward);
  m.impl("group_weights", &group_weights);
}

}  // namespace scope_megatron

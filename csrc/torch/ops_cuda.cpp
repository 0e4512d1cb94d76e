// CUDA implementations of the scope_megatron ops: the checks, output shapes and dtypes of
// ops_cpu.cpp around the launchers of cuda_ops.h, on the tensors' device and its current stream.
//
// No c10/cuda or ATen/cuda header is included (the stream comes through the device-generic
// guard interface), so this file also compiles against a CPU-only torch. Nothing here copies
// device data to the host: sequence_logppl* and group_weights trust offsets and group ids that
// the Python layer has validated (the CPU implementations check them, on host data).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include "common.h"
#include "scope_kernels/cuda_ops.h"

namespace scope_megatron {
namespace {

namespace k = scope_kernels;
using k::KLRowLayout;
using k::KLStatsLayout;
using k::LogprobRowLayout;
using k::LogprobStatsLayout;

// The current CUDA stream of a device, as a cudaStream_t passed as void*.
void* current_stream(const at::Device& device) {
  c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return impl.getStream(device).native_handle();
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
}

void check_launch(int code, const char* op) {
  TORCH_CHECK(code == 0, op, ": CUDA launch failed: ", k::cuda::error_string(code));
}

at::Tensor logprob_partial(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start,
                           int64_t vocab_size, double inv_temperature) {
  constexpr const char* op = "scope_megatron::logprob_partial";
  check_cuda(logits, op, "logits");
  check_logits(logits, op, "logits");
  check_vector(target, logits.size(0), at::kLong, op, "target", logits.device());
  check_vocab(vocab_start, vocab_size, op);
  const c10::DeviceGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  at::Tensor stats = at::empty({rows, LogprobStatsLayout::kWidth},
                               logits.options().dtype(acc_dtype(logits.scalar_type())));
  dispatch_logits_dtype(logits.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = k::acc_t<T>;
    const k::LogprobArgs<T> args{const_rows<T>(logits), cptr<int64_t>(target), vocab_start,
                                 vocab_size, static_cast<Acc>(inv_temperature)};
    check_launch(k::cuda::logprob_partial<T>(args, mptr<Acc>(stats),
                                             current_stream(logits.device())),
                 op);
  });
  return stats;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprob_combine(const at::Tensor& stats,
                                                               double inv_temperature) {
  constexpr const char* op = "scope_megatron::logprob_combine";
  check_cuda(stats, op, "stats");
  check_stats(stats, LogprobStatsLayout::kWidth, op);
  const c10::DeviceGuard guard(stats.device());
  const int64_t shards = stats.size(0), rows = stats.size(1);
  at::Tensor logprob = at::empty({rows}, stats.options());
  at::Tensor row_stats = at::empty({rows, LogprobRowLayout::kWidth}, stats.options());
  at::Tensor flags = at::empty({rows}, stats.options().dtype(at::kInt));
  dispatch_acc_dtype(stats.scalar_type(), op, [&](auto tag) {
    using Acc = typename decltype(tag)::type;
    check_launch(k::cuda::logprob_combine<Acc>(cptr<Acc>(stats), shards, rows,
                                               static_cast<Acc>(inv_temperature),
                                               mptr<Acc>(logprob), mptr<Acc>(row_stats),
                                               mptr<int32_t>(flags),
                                               current_stream(stats.device())),
                 op);
  });
  return {logprob, row_stats, flags};
}

at::Tensor logprob_backward(const at::Tensor& grad_out, const at::Tensor& logits,
                            const at::Tensor& target, const at::Tensor& row_stats,
                            int64_t vocab_start, int64_t vocab_size, double inv_temperature) {
  constexpr const char* op = "scope_megatron::logprob_backward";
  check_cuda(logits, op, "logits");
  check_logits(logits, op, "logits");
  const int64_t rows = logits.size(0);
  const auto acc = acc_dtype(logits.scalar_type());
  check_vector(target, rows, at::kLong, op, "target", logits.device());
  check_vector(grad_out, rows, acc, op, "grad_out", logits.device());
  check_row_stats(row_stats, rows, LogprobRowLayout::kWidth, acc, op, logits.device());
  check_vocab(vocab_start, vocab_size, op);
  const c10::DeviceGuard guard(logits.device());
  at::Tensor grad = at::empty({rows, logits.size(1)}, logits.options());
  dispatch_logits_dtype(logits.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = k::acc_t<T>;
    const k::LogprobArgs<T> args{const_rows<T>(logits), cptr<int64_t>(target), vocab_start,
                                 vocab_size, static_cast<Acc>(inv_temperature)};
    check_launch(k::cuda::logprob_backward<T>(args, cptr<Acc>(grad_out), cptr<Acc>(row_stats),
                                              mut_rows<T>(grad), current_stream(logits.device())),
                 op);
  });
  return grad;
}

at::Tensor kl_partial(const at::Tensor& student, const at::Tensor& teacher, int64_t vocab_start,
                      int64_t vocab_size, double inv_temperature_student,
                      double inv_temperature_teacher, bool reverse) {
  constexpr const char* op = "scope_megatron::kl_partial";
  check_cuda(student, op, "student_logits");
  check_kl_pair(student, teacher, op);
  check_vocab(vocab_start, vocab_size, op);
  const c10::DeviceGuard guard(student.device());
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
    check_launch(
        k::cuda::kl_partial<T>(args, mptr<Acc>(stats), current_stream(student.device())), op);
  });
  return stats;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_combine(const at::Tensor& stats, bool reverse,
                                                          double inv_temperature_student,
                                                          double inv_temperature_teacher) {
  constexpr const char* op = "scope_megatron::kl_combine";
  check_cuda(stats, op, "stats");
  check_stats(stats, KLStatsLayout::kWidth, op);
  const c10::DeviceGuard guard(stats.device());
  const int64_t shards = stats.size(0), rows = stats.size(1);
  at::Tensor kl = at::empty({rows}, stats.options());
  at::Tensor row_stats = at::empty({rows, KLRowLayout::kWidth}, stats.options());
  at::Tensor flags = at::empty({rows}, stats.options().dtype(at::kInt));
  dispatch_acc_dtype(stats.scalar_type(), op, [&](auto tag) {
    using Acc = typename decltype(tag)::type;
    check_launch(k::cuda::kl_combine<Acc>(cptr<Acc>(stats), shards, rows, reverse,
                                          static_cast<Acc>(inv_temperature_student),
                                          static_cast<Acc>(inv_temperature_teacher),
                                          mptr<Acc>(kl), mptr<Acc>(row_stats),
                                          mptr<int32_t>(flags), current_stream(stats.device())),
                 op);
  });
  return {kl, row_stats, flags};
}

at::Tensor kl_backward(const at::Tensor& grad_out, const at::Tensor& student,
                       const at::Tensor& teacher, const at::Tensor& row_stats,
                       int64_t vocab_start, int64_t vocab_size, double inv_temperature_student,
                       double inv_temperature_teacher, bool reverse) {
  constexpr const char* op = "scope_megatron::kl_backward";
  check_cuda(student, op, "student_logits");
  check_kl_pair(student, teacher, op);
  check_vocab(vocab_start, vocab_size, op);
  const int64_t rows = student.size(0);
  const auto acc = acc_dtype(student.scalar_type());
  check_vector(grad_out, rows, acc, op, "grad_out", student.device());
  check_row_stats(row_stats, rows, KLRowLayout::kWidth, acc, op, student.device());
  const c10::DeviceGuard guard(student.device());
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
    check_launch(k::cuda::kl_backward<T>(args, cptr<Acc>(grad_out), cptr<Acc>(row_stats),
                                         mut_rows<T>(grad), current_stream(student.device())),
                 op);
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor> sequence_logppl(const at::Tensor& values,
                                                   const c10::optional<at::Tensor>& mask,
                                                   const at::Tensor& offsets) {
  constexpr const char* op = "scope_megatron::sequence_logppl";
  check_cuda(values, op, "values");
  check_segments(values, mask, offsets, op);
  const c10::DeviceGuard guard(values.device());
  const int64_t seqs = offsets.size(0) - 1;
  at::Tensor log_ppl = at::empty({seqs}, values.options());
  at::Tensor count = at::empty({seqs}, values.options().dtype(at::kLong));
  dispatch_acc_dtype(values.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool* m = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
    check_launch(k::cuda::sequence_logppl<T>(cptr<T>(values), m,
                                             offsets.const_data_ptr<int64_t>(), seqs,
                                             mptr<T>(log_ppl), count.mutable_data_ptr<int64_t>(),
                                             current_stream(values.device())),
                 op);
  });
  return {log_ppl, count};
}

at::Tensor sequence_logppl_backward(const at::Tensor& grad_out,
                                    const c10::optional<at::Tensor>& mask,
                                    const at::Tensor& offsets, const at::Tensor& count,
                                    int64_t num_values) {
  constexpr const char* op = "scope_megatron::sequence_logppl_backward";
  check_cuda(grad_out, op, "grad_out");
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1, op,
              ": offsets must have shape [sequences + 1], got ", offsets.sizes());
  TORCH_CHECK(num_values >= 0, op, ": num_values must be >= 0, got ", num_values);
  const int64_t seqs = offsets.size(0) - 1;
  TORCH_CHECK(grad_out.dim() == 1 && grad_out.size(0) == seqs && grad_out.is_contiguous(), op,
              ": grad_out must be a contiguous tensor of shape [", seqs, "]");
  const c10::DeviceGuard guard(grad_out.device());
  // Every element is written by the launcher (zeros outside the sequences and where masked).
  at::Tensor grad = at::empty({num_values}, grad_out.options());
  check_segments(grad, mask, offsets, op);
  check_vector(count, seqs, at::kLong, op, "count", grad_out.device());
  dispatch_acc_dtype(grad_out.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool* m = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
    check_launch(k::cuda::sequence_logppl_backward<T>(
                     cptr<T>(grad_out), m, offsets.const_data_ptr<int64_t>(),
                     count.const_data_ptr<int64_t>(), seqs, num_values, mptr<T>(grad),
                     current_stream(grad_out.device())),
                 op);
  });
  return grad;
}

at::Tensor group_weights(const at::Tensor& log_ppl, const at::Tensor& group_index,
                         const at::Tensor& member, int64_t num_groups, double sign_over_tau,
                         bool mean_scale) {
  constexpr const char* op = "scope_megatron::group_weights";
  check_cuda(log_ppl, op, "log_ppl");
  TORCH_CHECK(log_ppl.dim() == 1 && log_ppl.is_contiguous(), op,
              ": log_ppl must be a contiguous 1-D tensor");
  const int64_t n = log_ppl.size(0);
  check_vector(group_index, n, at::kLong, op, "group_index", log_ppl.device());
  check_vector(member, n, at::kBool, op, "member", log_ppl.device());
  TORCH_CHECK(num_groups >= 0, op, ": num_groups must be >= 0");
  const c10::DeviceGuard guard(log_ppl.device());
  at::Tensor out = at::empty({n}, log_ppl.options());
  dispatch_acc_dtype(log_ppl.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_launch(k::cuda::group_weights<T>(cptr<T>(log_ppl), cptr<int64_t>(group_index),
                                           member.const_data_ptr<bool>(), n, num_groups,
                                           static_cast<T>(sign_over_tau), mean_scale,
                                           mptr<T>(out), current_stream(log_ppl.device())),
                 op);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(scope_megatron, CUDA, m) {
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

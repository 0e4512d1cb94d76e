// Operator schemas of the scope_megatron library and the Python module scope_megatron._C.
//
// The kernels are registered per backend in ops_cpu.cpp and ops_cuda.cpp; fake (meta)
// implementations for torch.compile live in scope_megatron/ops/_library.py. Autograd and the
// tensor-parallel collectives are in the Python layer, between the phases defined here.
#include <torch/extension.h>
#include <torch/library.h>

#include "scope_kernels/ops.h"

TORCH_LIBRARY(scope_megatron, m) {
  // Token log-prob: partial statistics of one vocabulary shard, combine, backward.
  m.def(
      "logprob_partial(Tensor logits, Tensor target, int vocab_start, int vocab_size, "
      "float inv_temperature) -> Tensor");
  m.def(
      "logprob_combine(Tensor stats, float inv_temperature) -> (Tensor logprob, "
      "Tensor row_stats, Tensor flags)");
  m.def(
      "logprob_backward(Tensor grad_out, Tensor logits, Tensor target, Tensor row_stats, "
      "int vocab_start, int vocab_size, float inv_temperature) -> Tensor");
  // KL between student and teacher softmaxes: same three phases.
  m.def(
      "kl_partial(Tensor student, Tensor teacher, int vocab_start, int vocab_size, "
      "float inv_temperature_student, float inv_temperature_teacher, bool reverse) -> Tensor");
  m.def(
      "kl_combine(Tensor stats, bool reverse, float inv_temperature_student, "
      "float inv_temperature_teacher) -> (Tensor kl, Tensor row_stats, Tensor flags)");
  m.def(
      "kl_backward(Tensor grad_out, Tensor student, Tensor teacher, Tensor row_stats, "
      "int vocab_start, int vocab_size, float inv_temperature_student, "
      "float inv_temperature_teacher, bool reverse) -> Tensor");
  // KL and its gradient weighted by a known upstream gradient, for a shard holding the whole
  // vocabulary: one pass over the logits where the kernels can.
  m.def(
      "kl_fused(Tensor student, Tensor teacher, Tensor weight, int vocab_size, "
      "float inv_temperature_student, float inv_temperature_teacher, bool reverse) -> "
      "(Tensor kl, Tensor row_stats, Tensor flags, Tensor grad)");
  // Its backward for the upstream gradient received: rewrites, in place, the rows of kl_fused's
  // gradient where grad_out differs from the weight it was computed for, and adds their number
  // to the int64 scalar `mismatches` when given (a running count: no host sync, no extra launch).
  m.def(
      "kl_backward_fixup(Tensor(a!) grad, Tensor grad_out, Tensor expected, Tensor student, "
      "Tensor teacher, Tensor row_stats, int vocab_start, int vocab_size, "
      "float inv_temperature_student, float inv_temperature_teacher, bool reverse, "
      "Tensor(b!)? mismatches=None) -> ()");
  // Per-sequence mean negative log-likelihood (log perplexity).
  m.def("sequence_logppl(Tensor values, Tensor? mask, Tensor offsets) -> (Tensor log_ppl, Tensor count)");
  m.def(
      "sequence_logppl_backward(Tensor grad_out, Tensor? mask, Tensor offsets, Tensor count, "
      "int num_values) -> Tensor");
  // Group-normalized perplexity weights.
  m.def(
      "group_weights(Tensor log_ppl, Tensor group_index, Tensor member, int num_groups, "
      "float sign_over_tau, bool mean_scale) -> Tensor");
}

namespace {

bool built_with_cuda() {
#if defined(SCOPE_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "scope_megatron C++/CUDA kernels (registered as torch.ops.scope_megatron.*)";
  m.def("built_with_cuda", &built_with_cuda,
        "Whether this build contains the CUDA kernels.");
  m.def("cpu_simd_flavour", &scope_kernels::cpu::simd_flavour,
        "SIMD flavour the CPU kernels dispatch to ('avx2' or 'baseline').");
}

// CUDA backend of the scope_megatron ops (ops_impl.h): the launchers of cuda_ops.h on the
// tensors' device and its current stream.
//
// No c10/cuda or ATen/cuda header is included (the stream comes through the device-generic
// guard interface), so this file also compiles against a CPU-only torch. Nothing here copies
// device data to the host: sequence_logppl* and group_weights trust offsets and group ids that
// the Python layer has validated (the CPU backend checks them, on host data).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include "ops_impl.h"
#include "scope_kernels/cuda_ops.h"

namespace scope_megatron {
namespace {

namespace k = scope_kernels;

// The current CUDA stream of a device, as a cudaStream_t passed as void*.
void* current_stream(const at::Device& device) {
  c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return impl.getStream(device).native_handle();
}

void check_launch(int code, const char* op) {
  TORCH_CHECK(code == 0, op, ": CUDA launch failed: ", k::cuda::error_string(code));
}

struct CudaBackend {
  static constexpr bool kHostIndices = false;
  using Guard = c10::DeviceGuard;

  static void check_device(const at::Tensor& t, const char* op, const char* name) {
    TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  }

  template <typename T>
  static void logprob_partial(const k::LogprobArgs<T>& args, k::acc_t<T>* stats,
                              const at::Device& device, const char* op) {
    check_launch(k::cuda::logprob_partial<T>(args, stats, current_stream(device)), op);
  }

  template <typename Acc>
  static void logprob_combine(const Acc* stats, int64_t shards, int64_t rows, Acc inv_t,
                              Acc* logprob, Acc* row_stats, int32_t* flags,
                              const at::Device& device, const char* op) {
    check_launch(k::cuda::logprob_combine<Acc>(stats, shards, rows, inv_t, logprob, row_stats,
                                               flags, current_stream(device)),
                 op);
  }

  template <typename T>
  static void logprob_backward(const k::LogprobArgs<T>& args, const k::acc_t<T>* grad_out,
                               const k::acc_t<T>* row_stats, k::MutRows<T> grad,
                               const at::Device& device, const char* op) {
    check_launch(
        k::cuda::logprob_backward<T>(args, grad_out, row_stats, grad, current_stream(device)),
        op);
  }

  template <typename T>
  static void kl_partial(const k::KLArgs<T>& args, k::acc_t<T>* stats, const at::Device& device,
                         const char* op) {
    check_launch(k::cuda::kl_partial<T>(args, stats, current_stream(device)), op);
  }

  template <typename Acc>
  static void kl_combine(const Acc* stats, int64_t shards, int64_t rows, bool reverse, Acc inv_ts,
                         Acc inv_tt, Acc* kl, Acc* row_stats, int32_t* flags,
                         const at::Device& device, const char* op) {
    check_launch(k::cuda::kl_combine<Acc>(stats, shards, rows, reverse, inv_ts, inv_tt, kl,
                                          row_stats, flags, current_stream(device)),
                 op);
  }

  template <typename T>
  static void kl_backward(const k::KLArgs<T>& args, const k::acc_t<T>* grad_out,
                          const k::acc_t<T>* row_stats, k::MutRows<T> grad,
                          const at::Device& device, const char* op) {
    check_launch(
        k::cuda::kl_backward<T>(args, grad_out, row_stats, grad, current_stream(device)), op);
  }

  template <typename T>
  static void kl_backward_fixup(const k::KLArgs<T>& args, const k::acc_t<T>* grad_out,
                                const k::acc_t<T>* expected, const k::acc_t<T>* row_stats,
                                k::MutRows<T> grad, int64_t* mismatches, const at::Device& device,
                                const char* op) {
    // int64 and unsigned long long share a size: the counter only ever grows from zero.
    static_assert(sizeof(int64_t) == sizeof(unsigned long long), "counter width");
    check_launch(k::cuda::kl_backward_fixup<T>(args, grad_out, expected, row_stats, grad,
                                               reinterpret_cast<unsigned long long*>(mismatches),
                                               current_stream(device)),
                 op);
  }

  template <typename T>
  static bool kl_fused_on_chip(const k::KLArgs<T>& args) {
    return k::cuda::kl_fused_on_chip<T>(args);
  }

  template <typename T>
  static void kl_fused(const k::KLArgs<T>& args, const k::acc_t<T>* weight, k::acc_t<T>* kl,
                       k::acc_t<T>* row_stats, int32_t* flags, k::MutRows<T> grad,
                       const at::Device& device, const char* op) {
    check_launch(k::cuda::kl_fused<T>(args, weight, kl, row_stats, flags, grad,
                                      current_stream(device)),
                 op);
  }

  template <typename T>
  static void sequence_logppl(const T* values, const bool* mask, const int64_t* offsets,
                              int64_t seqs, T* log_ppl, int64_t* count, const at::Device& device,
                              const char* op) {
    check_launch(k::cuda::sequence_logppl<T>(values, mask, offsets, seqs, log_ppl, count,
                                             current_stream(device)),
                 op);
  }

  template <typename T>
  static void sequence_logppl_backward(const T* grad_out, const bool* mask,
                                       const int64_t* offsets, const int64_t* count, int64_t seqs,
                                       int64_t num_values, T* grad, const at::Device& device,
                                       const char* op) {
    check_launch(k::cuda::sequence_logppl_backward<T>(grad_out, mask, offsets, count, seqs,
                                                      num_values, grad, current_stream(device)),
                 op);
  }

  template <typename T>
  static void group_weights(const T* log_ppl, const int64_t* group_index, const bool* member,
                            int64_t n, int64_t num_groups, T sign_over_tau, bool mean_scale, T* out,
                            const at::Device& device, const char* op) {
    check_launch(k::cuda::group_weights<T>(log_ppl, group_index, member, n, num_groups,
                                           sign_over_tau, mean_scale, out,
                                           current_stream(device)),
                 op);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(scope_megatron, CUDA, m) { register_ops<CudaBackend>(m); }

}  // namespace scope_megatron

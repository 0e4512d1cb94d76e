// CUDA launchers with the same contract as the CPU kernels of ops.h (one call processes all
// rows). Plain C++ declarations: no CUDA or torch headers, so the torch bindings and the C++
// tests include this file with any host compiler. Pointers are device pointers; `stream` is a
// cudaStream_t passed as void*. Every launcher returns a cudaError_t value (0 = success), to be
// turned into a message with error_string(). Launches are asynchronous on `stream`.
#pragma once

#include <cstdint>

#include "scope_kernels/ops.h"

namespace scope_kernels {
namespace cuda {

const char* error_string(int code);

template <typename T>
int logprob_partial(const LogprobArgs<T>& args, acc_t<T>* stats, void* stream);

template <typename Acc>
int logprob_combine(const Acc* stats, int64_t shards, int64_t rows, Acc inv_temperature,
                    Acc* logprob, Acc* row_stats, int32_t* flags, void* stream);

template <typename T>
int logprob_backward(const LogprobArgs<T>& args, const acc_t<T>* grad_out,
                     const acc_t<T>* row_stats, MutRows<T> grad, void* stream);

template <typename T>
int kl_partial(const KLArgs<T>& args, acc_t<T>* stats, void* stream);

template <typename Acc>
int kl_combine(const Acc* stats, int64_t shards, int64_t rows, bool reverse,
               Acc inv_temperature_student, Acc inv_temperature_teacher, Acc* kl, Acc* row_stats,
               int32_t* flags, void* stream);

template <typename T>
int kl_backward(const KLArgs<T>& args, const acc_t<T>* grad_out, const acc_t<T>* row_stats,
                MutRows<T> grad, void* stream);

// The fused KL of ops.h (cpu::kl_fused) in one pass over the logits. Runs when
// kl_fused_on_chip(args) (16-byte aligned rows, a whole number of 16-byte packs, at most
// 40960 bf16 / fp16 or 20480 float32 columns, not float64) and grad's rows are 16-byte aligned;
// otherwise returns an error (cudaErrorNotSupported: use kl_partial / kl_combine / kl_backward).
template <typename T>
bool kl_fused_on_chip(const KLArgs<T>& args);

template <typename T>
int kl_fused(const KLArgs<T>& args, const acc_t<T>* weight, acc_t<T>* kl, acc_t<T>* row_stats,
             int32_t* flags, MutRows<T> grad, void* stream);

// ops.h's kl_backward_fixup (the backward of kl_fused for the gradient received) on the device:
// the rows where grad_out equals expected are skipped, the others rewritten; no host decision.
// mismatches (may be null): a device counter the number of rewritten rows is added to.
template <typename T>
int kl_backward_fixup(const KLArgs<T>& args, const acc_t<T>* grad_out, const acc_t<T>* expected,
                      const acc_t<T>* row_stats, MutRows<T> grad, unsigned long long* mismatches,
                      void* stream);

// offsets: [num_seqs + 1] (validated by the caller); mask may be null.
template <typename T>
int sequence_logppl(const T* values, const bool* mask, const int64_t* offsets, int64_t num_seqs,
                    T* log_ppl, int64_t* count, void* stream);

// grad_values must hold num_values elements; positions outside every sequence are set to 0.
template <typename T>
int sequence_logppl_backward(const T* grad_out, const bool* mask, const int64_t* offsets,
                             const int64_t* count, int64_t num_seqs, int64_t num_values,
                             T* grad_values, void* stream);

// group_index in [0, num_groups) (validated by the caller); out gets 0 for non-members.
template <typename T>
int group_weights(const T* log_ppl, const int64_t* group_index, const bool* member, int64_t n,
                  int64_t num_groups, T sign_over_tau, bool mean_scale, T* out, void* stream);

}  // namespace cuda
}  // namespace scope_kernels

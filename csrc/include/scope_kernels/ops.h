// The op contract shared by the CPU and CUDA kernels (no torch, no Python).
//
// Logit ops work on one tensor-parallel shard: a [rows, cols] matrix holding vocabulary ids
// [vocab_start, vocab_start + cols); ids >= vocab_size are padding and take part in nothing.
// Each op runs in three phases so that the caller can combine shards in between:
//   partial  -> per-row statistics of this shard (layouts in softmax_stats.h),
//   combine  -> statistics of all shards [shards, rows, width] -> per-row results,
//   backward -> gradient w.r.t. this shard's logits, written once in the logits' dtype.
// Values are accumulated in acc_t<T> (float, or double for double inputs).
//
// CPU functions process rows [row_begin, row_end) so that the caller can split rows across
// threads; they never allocate per element and never write outside their rows.
#pragma once

#include <cstdint>

#include "scope_kernels/softmax_stats.h"
#include "scope_kernels/types.h"

namespace scope_kernels {

// A read-only [rows, cols] matrix whose rows start row_stride elements apart (columns are
// contiguous).
template <typename T>
struct ConstRows {
  const T* data;
  int64_t rows;
  int64_t cols;
  int64_t row_stride;
};

// A writable [rows, cols] matrix, same conventions.
template <typename T>
struct MutRows {
  T* data;
  int64_t rows;
  int64_t cols;
  int64_t row_stride;
};

// log softmax(logits / temperature)[target] for each row.
template <typename T>
struct LogprobArgs {
  ConstRows<T> logits;
  const int64_t* target;  // [rows], global vocabulary ids
  int64_t vocab_start;    // global id of column 0 of this shard
  int64_t vocab_size;     // true vocabulary size (columns with id >= vocab_size are padding)
  acc_t<T> inv_temperature;
};

// KL between softmax(student / t_s) and softmax(teacher / t_t) for each row:
// reverse = KL(student || teacher), forward = KL(teacher || student).
template <typename T>
struct KLArgs {
  ConstRows<T> student;
  ConstRows<T> teacher;  // same rows and cols as student (strides may differ)
  int64_t vocab_start;
  int64_t vocab_size;
  acc_t<T> inv_temperature_student;
  acc_t<T> inv_temperature_teacher;
  bool reverse;
};

namespace cpu {

// ---- token log-prob ----
// stats: [rows, LogprobStatsLayout::kWidth]
template <typename T>
void logprob_partial(const LogprobArgs<T>& args, acc_t<T>* stats, int64_t row_begin,
                     int64_t row_end);

// stats: [shards, rows, kWidth] -> logprob[rows], row_stats[rows, LogprobRowLayout::kWidth]
// (what the backward needs), flags[rows] (ErrorFlag bits OR-ed over shards); a flagged row's
// logprob is NaN.
template <typename Acc>
void logprob_combine(const Acc* stats, int64_t shards, int64_t rows, Acc inv_temperature,
                     Acc* logprob, Acc* row_stats, int32_t* flags, int64_t row_begin,
                     int64_t row_end);

// grad[r, j] = grad_out[r] / T * (onehot(target)[j] - softmax(logits[r] / T)[j]); zero on
// padding columns. row_stats from logprob_combine.
template <typename T>
void logprob_backward(const LogprobArgs<T>& args, const acc_t<T>* grad_out,
                      const acc_t<T>* row_stats, MutRows<T> grad, int64_t row_begin,
                      int64_t row_end);

// ---- KL ----
// stats: [rows, KLStatsLayout::kWidth]
template <typename T>
void kl_partial(const KLArgs<T>& args, acc_t<T>* stats, int64_t row_begin, int64_t row_end);

// stats: [shards, rows, kWidth] -> kl[rows], row_stats[rows, KLRowLayout::kWidth], flags[rows];
// a flagged row's kl is NaN.
template <typename Acc>
void kl_combine(const Acc* stats, int64_t shards, int64_t rows, bool reverse,
                Acc inv_temperature_student, Acc inv_temperature_teacher, Acc* kl, Acc* row_stats,
                int32_t* flags, int64_t row_begin, int64_t row_end);

// Gradient of grad_out[r] * KL_r w.r.t. the student shard (the teacher is frozen):
//   reverse: grad = g / t_s * p * ((log p - log q) - KL),   forward: grad = g / t_s * (p - q),
// with p, q the student / teacher softmaxes; zero on padding columns. row_stats from kl_combine.
template <typename T>
void kl_backward(const KLArgs<T>& args, const acc_t<T>* grad_out, const acc_t<T>* row_stats,
                 MutRows<T> grad, int64_t row_begin, int64_t row_end);

// ---- KL and its gradient in one call ----
// For a shard that holds the whole vocabulary (args.vocab_start == 0, no tensor parallelism)
// and an upstream gradient known before the forward (weight[rows], e.g. per-token loss
// weights): kl[r], row_stats[r] and flags[r] as kl_combine writes them for one shard, and
// grad = weight[r] * dKL_r / dstudent, as kl_backward with grad_out = weight writes it. Each row
// pair is read once while it is in cache (CPU) or on chip (CUDA).
template <typename T>
void kl_fused(const KLArgs<T>& args, const acc_t<T>* weight, acc_t<T>* kl, acc_t<T>* row_stats,
              int32_t* flags, MutRows<T> grad, int64_t row_begin, int64_t row_end);

// The backward of kl_fused, for the upstream gradient grad_out actually received: grad holds
// kl_fused's gradient for weight = expected; rows with grad_out[r] == expected[r] are left as
// they are (no memory traffic), the others are rewritten as kl_backward writes them for
// grad_out[r] (the gradient is linear in each row's upstream gradient, so the rows are
// independent). NaN in either compares unequal: that row is recomputed. Returns the number of
// rows rewritten.
template <typename T>
int64_t kl_backward_fixup(const KLArgs<T>& args, const acc_t<T>* grad_out, const acc_t<T>* expected,
                       const acc_t<T>* row_stats, MutRows<T> grad, int64_t row_begin,
                       int64_t row_end);

// ---- sequence perplexity ----
// Sequence s covers values[offsets[s], offsets[s + 1]); mask (may be null) selects the tokens
// that count. log_ppl[s] = -mean of the selected values; count[s] = number selected.
template <typename T>
void sequence_logppl(const T* values, const bool* mask, const int64_t* offsets, T* log_ppl,
                     int64_t* count, int64_t seq_begin, int64_t seq_end);

// grad_values[i] = -grad_out[s] * mask[i] / count[s] for i in sequence s (0 if count is 0).
template <typename T>
void sequence_logppl_backward(const T* grad_out, const bool* mask, const int64_t* offsets,
                              const int64_t* count, T* grad_values, int64_t seq_begin,
                              int64_t seq_end);

// ---- group-normalized weights ----
// For each group g, over the members i (member[i] && group_index[i] == g):
//   out[i] = exp(sign_over_tau * log_ppl[i]) / sum_j exp(sign_over_tau * log_ppl[j]),
// times the number of members when mean_scale. Non-members get 0. group_index in
// [0, num_groups). Sequential: the number of sequences is small.
template <typename T>
void group_weights(const T* log_ppl, const int64_t* group_index, const bool* member, int64_t n,
                   int64_t num_groups, T sign_over_tau, bool mean_scale, T* out);

// Which SIMD flavour the CPU dispatch selected ("avx2" or "baseline").
const char* simd_flavour();

}  // namespace cpu
}  // namespace scope_kernels

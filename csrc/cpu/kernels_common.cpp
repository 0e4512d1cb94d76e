// CPU kernels that work on per-row or per-sequence scalars (combine steps, perplexity, group
// weights): O(rows) work, no SIMD flavours needed.
#include <cmath>
#include <cstdint>
#include <vector>

#include "scope_kernels/ops.h"

namespace scope_kernels {
namespace cpu {

template <typename Acc>
void logprob_combine(const Acc* stats, int64_t shards, int64_t rows, Acc inv_temperature,
                     Acc* logprob, Acc* row_stats, int32_t* flags, int64_t row_begin,
                     int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    combine_logprob_row(stats, shards, rows, r, inv_temperature, logprob, row_stats, flags);
  }
}

template <typename Acc>
void kl_combine(const Acc* stats, int64_t shards, int64_t rows, bool reverse,
                Acc inv_temperature_student, Acc inv_temperature_teacher, Acc* kl, Acc* row_stats,
                int32_t* flags, int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    combine_kl_row(stats, shards, rows, r, reverse, inv_temperature_student,
                   inv_temperature_teacher, kl, row_stats, flags);
  }
}

template <typename T>
void sequence_logppl(const T* values, const bool* mask, const int64_t* offsets, T* log_ppl,
                     int64_t* count, int64_t seq_begin, int64_t seq_end) {
  // A running sum in double: one token after another in float32 drifts by 1e-5 relative at a
  // million tokens and by percents at tens of millions (packed long-context batches).
  using Acc = double;
  for (int64_t s = seq_begin; s < seq_end; ++s) {
    Acc sum = 0;
    int64_t n = 0;
    for (int64_t i = offsets[s]; i < offsets[s + 1]; ++i) {
      if (mask == nullptr || mask[i]) {
        sum += values[i];
        ++n;
      }
    }
    count[s] = n;
    // An empty sequence has no perplexity: NaN here, and the caller reports it.
    log_ppl[s] = n > 0 ? static_cast<T>(-sum / static_cast<Acc>(n)) : static_cast<T>(NAN);
  }
}

template <typename T>
void sequence_logppl_backward(const T* grad_out, const bool* mask, const int64_t* offsets,
                              const int64_t* count, T* grad_values, int64_t seq_begin,
                              int64_t seq_end) {
  for (int64_t s = seq_begin; s < seq_end; ++s) {
    const T coeff = count[s] > 0 ? -grad_out[s] / static_cast<T>(count[s]) : T(0);
    for (int64_t i = offsets[s]; i < offsets[s + 1]; ++i) {
      grad_values[i] = (mask == nullptr || mask[i]) ? coeff : T(0);
    }
  }
}

template <typename T>
void group_weights(const T* log_ppl, const int64_t* group_index, const bool* member, int64_t n,
                   int64_t num_groups, T sign_over_tau, bool mean_scale, T* out) {
  // Softmax of sign/tau * log PPL over each group's members, stabilized by the group maximum of
  // sign * log PPL, subtracted before scaling by 1/tau: exp((sign * x - max) / tau) stays finite
  // for any finite 1/tau (a tiny tau makes the weights one-hot, not NaN).
  const T sign = sign_over_tau < T(0) ? T(-1) : T(1);
  const T inv_tau = sign * sign_over_tau;
  std::vector<T> gmax(num_groups, neg_inf<T>());
  std::vector<T> gsum(num_groups, T(0));
  std::vector<int64_t> gcount(num_groups, 0);
  for (int64_t i = 0; i < n; ++i) {
    out[i] = T(0);
    if (!member[i]) continue;
    const int64_t g = group_index[i];
    gmax[g] = stats_max(gmax[g], sign * log_ppl[i]);
    ++gcount[g];
  }
  for (int64_t i = 0; i < n; ++i) {
    if (!member[i]) continue;
    const int64_t g = group_index[i];
    gsum[g] += stats_exp((sign * log_ppl[i] - gmax[g]) * inv_tau);
  }
  for (int64_t i = 0; i < n; ++i) {
    if (!member[i]) continue;
    const int64_t g = group_index[i];
    const T scale = mean_scale ? static_cast<T>(gcount[g]) : T(1);
    out[i] = stats_exp((sign * log_ppl[i] - gmax[g]) * inv_tau) / gsum[g] * scale;
  }
}

template void logprob_combine<float>(const float*, int64_t, int64_t, float, float*, float*,
                                     int32_t*, int64_t, int64_t);
template void logprob_combine<double>(const double*, int64_t, int64_t, double, double*, double*,
                                      int32_t*, int64_t, int64_t);
template void kl_combine<float>(const float*, int64_t, int64_t, bool, float, float, float*, float*,
                                int32_t*, int64_t, int64_t);
template void kl_combine<double>(const double*, int64_t, int64_t, bool, double, double, double*,
                                 double*, int32_t*, int64_t, int64_t);
template void sequence_logppl<float>(const float*, const bool*, const int64_t*, float*, int64_t*,
                                     int64_t, int64_t);
template void sequence_logppl<double>(const double*, const bool*, const int64_t*, double*,
                                      int64_t*, int64_t, int64_t);
template void sequence_logppl_backward<float>(const float*, const bool*, const int64_t*,
                                              const int64_t*, float*, int64_t, int64_t);
template void sequence_logppl_backward<double>(const double*, const bool*, const int64_t*,
                                               const int64_t*, double*, int64_t, int64_t);
template void group_weights<float>(const float*, const int64_t*, const bool*, int64_t, int64_t,
                                   float, bool, float*);
template void group_weights<double>(const double*, const int64_t*, const bool*, int64_t, int64_t,
                                    double, bool, double*);

}  // namespace cpu
}  // namespace scope_kernels

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
  using L = LogprobStatsLayout;
  using R = LogprobRowLayout;
  for (int64_t r = row_begin; r < row_end; ++r) {
    LseStats<Acc> acc = lse_empty<Acc>();
    Acc target_logit = 0, owners = 0;
    int32_t f = 0;
    for (int64_t s = 0; s < shards; ++s) {
      const Acc* row = stats + (s * rows + r) * L::kWidth;
      acc = lse_merge(acc, LseStats<Acc>{row[L::kMax], row[L::kSum]}, inv_temperature);
      target_logit += row[L::kTarget];  // only the owning shard contributes a non-zero value
      owners += row[L::kOwner];
      f |= static_cast<int32_t>(row[L::kFlags]);
    }
    if (!(f & kFlagTargetOutOfRange) && owners != Acc(1)) f |= kFlagShardLayout;
    const Acc log_sum = stats_log(acc.z);
    logprob[r] = (target_logit - acc.m) * inv_temperature - log_sum;
    row_stats[r * R::kWidth + R::kMax] = acc.m;
    row_stats[r * R::kWidth + R::kLogSum] = log_sum;
    flags[r] = f;
  }
}

template <typename Acc>
void kl_combine(const Acc* stats, int64_t shards, int64_t rows, bool reverse,
                Acc inv_temperature_student, Acc inv_temperature_teacher, Acc* kl, Acc* row_stats,
                int32_t* flags, int64_t row_begin, int64_t row_end) {
  using L = KLStatsLayout;
  using R = KLRowLayout;
  const Acc inv_w = reverse ? inv_temperature_student : inv_temperature_teacher;
  const Acc inv_o = reverse ? inv_temperature_teacher : inv_temperature_student;
  for (int64_t r = row_begin; r < row_end; ++r) {
    PairStats<Acc> acc = pair_empty<Acc>();
    int32_t f = 0;
    for (int64_t s = 0; s < shards; ++s) {
      const Acc* row = stats + (s * rows + r) * L::kWidth;
      acc = pair_merge(acc, pair_from_kl_stats(row, reverse), inv_w, inv_o);
      f |= static_cast<int32_t>(row[L::kFlags]);
    }
    const Acc k = pair_kl(acc);
    Acc* out = row_stats + r * R::kWidth;
    kl[r] = k;
    out[R::kKL] = k;
    out[R::kMaxStudent] = reverse ? acc.m_w : acc.m_o;
    out[R::kLogSumStudent] = stats_log(reverse ? acc.z_w : acc.z_o);
    out[R::kMaxTeacher] = reverse ? acc.m_o : acc.m_w;
    out[R::kLogSumTeacher] = stats_log(reverse ? acc.z_o : acc.z_w);
    flags[r] = f;
  }
}

template <typename T>
void sequence_logppl(const T* values, const bool* mask, const int64_t* offsets, T* log_ppl,
                     int64_t* count, int64_t seq_begin, int64_t seq_end) {
  using Acc = acc_t<T>;
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
  // Softmax of sign/tau * log PPL over each group's members, stabilized by the group maximum.
  std::vector<T> gmax(num_groups, neg_inf<T>());
  std::vector<T> gsum(num_groups, T(0));
  std::vector<int64_t> gcount(num_groups, 0);
  for (int64_t i = 0; i < n; ++i) {
    out[i] = T(0);
    if (!member[i]) continue;
    const int64_t g = group_index[i];
    gmax[g] = stats_max(gmax[g], sign_over_tau * log_ppl[i]);
    ++gcount[g];
  }
  for (int64_t i = 0; i < n; ++i) {
    if (!member[i]) continue;
    const int64_t g = group_index[i];
    gsum[g] += stats_exp(sign_over_tau * log_ppl[i] - gmax[g]);
  }
  for (int64_t i = 0; i < n; ++i) {
    if (!member[i]) continue;
    const int64_t g = group_index[i];
    const T scale = mean_scale ? static_cast<T>(gcount[g]) : T(1);
    out[i] = stats_exp(sign_over_tau * log_ppl[i] - gmax[g]) / gsum[g] * scale;
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

// Partial softmax statistics and how to merge them (host and device).
//
// A row of logits, or one shard of it, or one chunk of a shard, is summarized by a few numbers
// relative to its running maximum. Merging two summaries gives the summary of the union, so the
// same code combines chunks inside a kernel, threads inside a CUDA block, and tensor-parallel
// shards after the all-gather. Keeping the sums relative to the maxima keeps every term of the
// KL of order log(V), with no cancellation between large log-sum-exps (a source of negative KL
// at large vocabularies).
#pragma once

#include <math.h>

#include "scope_kernels/types.h"

namespace scope_kernels {

SCOPE_INLINE float stats_exp(float x) { return expf(x); }
SCOPE_INLINE double stats_exp(double x) { return exp(x); }
SCOPE_INLINE float stats_log(float x) { return logf(x); }
SCOPE_INLINE double stats_log(double x) { return log(x); }
template <typename Acc>
SCOPE_INLINE Acc stats_max(Acc a, Acc b) {
  return a > b ? a : b;
}
template <typename Acc>
SCOPE_INLINE Acc neg_inf() {
  return -static_cast<Acc>(INFINITY);
}

// Every summary keeps the maximum of the *raw* logits (before 1/temperature) and sums relative
// to it: a log-prob is then (x - max) / T - log(sum), where x - max is exact for nearby values and
// nothing of the size of the logits is ever rounded. With logits around 1e4 this keeps log-probs
// accurate to float32 precision of their own size (and never above 0), where the textbook
// x / T - lse loses about 1e-3 to the rounding of lse.

// Log-sum-exp summary of x / T: z = sum_i exp((x_i - m) * inv_t). Empty: z == 0 (m = -inf).
template <typename Acc>
struct LseStats {
  Acc m;
  Acc z;
};

template <typename Acc>
SCOPE_INLINE LseStats<Acc> lse_empty() {
  return LseStats<Acc>{neg_inf<Acc>(), Acc(0)};
}

template <typename Acc>
SCOPE_INLINE LseStats<Acc> lse_merge(LseStats<Acc> x, LseStats<Acc> y, Acc inv_t) {
  if (!(y.z > Acc(0))) return x;
  if (!(x.z > Acc(0))) return y;
  const Acc m = stats_max(x.m, y.m);
  return LseStats<Acc>{m, x.z * stats_exp((x.m - m) * inv_t) + y.z * stats_exp((y.m - m) * inv_t)};
}

// Summary for KL(w || o) between softmax(x * inv_w) (weighting side) and softmax(y * inv_o):
//   z_w = sum_i exp(dx_i),  z_o = sum_i exp(dy_i),  c = sum_i exp(dx_i) * (dx_i - dy_i),
// with dx_i = (x_i - m_w) * inv_w and dy_i = (y_i - m_o) * inv_o (m_w, m_o raw maxima), so that
//   KL(w || o) = c / z_w - log z_w + log z_o.
// Both rows cover the same columns, so z_w > 0 exactly when z_o > 0.
template <typename Acc>
struct PairStats {
  Acc m_w;
  Acc z_w;
  Acc c;
  Acc m_o;
  Acc z_o;
};

template <typename Acc>
SCOPE_INLINE PairStats<Acc> pair_empty() {
  return PairStats<Acc>{neg_inf<Acc>(), Acc(0), Acc(0), neg_inf<Acc>(), Acc(0)};
}

template <typename Acc>
SCOPE_INLINE PairStats<Acc> pair_merge(PairStats<Acc> x, PairStats<Acc> y, Acc inv_w, Acc inv_o) {
  if (!(y.z_w > Acc(0))) return x;
  if (!(x.z_w > Acc(0))) return y;
  const Acc mw = stats_max(x.m_w, y.m_w);
  const Acc mo = stats_max(x.m_o, y.m_o);
  const Acc xw = (x.m_w - mw) * inv_w, yw = (y.m_w - mw) * inv_w;  // <= 0
  const Acc xo = (x.m_o - mo) * inv_o, yo = (y.m_o - mo) * inv_o;
  const Acc sx = stats_exp(xw);
  const Acc sy = stats_exp(yw);
  // Re-reference each part's cross term to the new maxima before adding.
  const Acc cx = x.c + x.z_w * (xw - xo);
  const Acc cy = y.c + y.z_w * (yw - yo);
  PairStats<Acc> r;
  r.m_w = mw;
  r.m_o = mo;
  r.z_w = x.z_w * sx + y.z_w * sy;
  r.c = cx * sx + cy * sy;
  r.z_o = x.z_o * stats_exp(xo) + y.z_o * stats_exp(yo);
  return r;
}

template <typename Acc>
SCOPE_INLINE Acc pair_kl(PairStats<Acc> s) {
  return s.c / s.z_w - stats_log(s.z_w) + stats_log(s.z_o);
}

// Per-row partial statistics that the partial kernels write and the combine kernels read (in
// the accumulation type; one row of kWidth values per token and shard).
struct LogprobStatsLayout {
  static constexpr int kMax = 0;     // max raw logit over the shard's valid columns
  static constexpr int kSum = 1;     // sum of exp((x - max) / T)
  static constexpr int kTarget = 2;  // raw target logit if the shard owns the target, else 0
  static constexpr int kOwner = 3;   // 1 if the shard owns the target, else 0
  static constexpr int kFlags = 4;   // ErrorFlag bits
  static constexpr int kWidth = 5;
};

// Stored in student / teacher order whatever the direction; `c` is the cross term of the
// direction's weighting side (student for reverse KL, teacher for forward KL).
struct KLStatsLayout {
  static constexpr int kMaxStudent = 0;
  static constexpr int kSumStudent = 1;
  static constexpr int kCross = 2;
  static constexpr int kMaxTeacher = 3;
  static constexpr int kSumTeacher = 4;
  static constexpr int kFlags = 5;
  static constexpr int kWidth = 6;
};

// What the combine step hands to the backward, per row: log p(x_j) = (x_j - max) / T - log_sum.
struct LogprobRowLayout {
  static constexpr int kMax = 0;
  static constexpr int kLogSum = 1;
  static constexpr int kWidth = 2;
};

struct KLRowLayout {
  static constexpr int kKL = 0;
  static constexpr int kMaxStudent = 1;
  static constexpr int kLogSumStudent = 2;
  static constexpr int kMaxTeacher = 3;
  static constexpr int kLogSumTeacher = 4;
  static constexpr int kWidth = 5;
};

template <typename Acc>
SCOPE_INLINE PairStats<Acc> pair_from_kl_stats(const Acc* row, bool reverse) {
  using L = KLStatsLayout;
  if (reverse) {
    return PairStats<Acc>{row[L::kMaxStudent], row[L::kSumStudent], row[L::kCross],
                          row[L::kMaxTeacher], row[L::kSumTeacher]};
  }
  return PairStats<Acc>{row[L::kMaxTeacher], row[L::kSumTeacher], row[L::kCross],
                        row[L::kMaxStudent], row[L::kSumStudent]};
}

template <typename Acc>
SCOPE_INLINE void pair_to_kl_stats(PairStats<Acc> s, bool reverse, Acc flags, Acc* row) {
  using L = KLStatsLayout;
  row[L::kCross] = s.c;
  row[L::kFlags] = flags;
  row[reverse ? L::kMaxStudent : L::kMaxTeacher] = s.m_w;
  row[reverse ? L::kSumStudent : L::kSumTeacher] = s.z_w;
  row[reverse ? L::kMaxTeacher : L::kMaxStudent] = s.m_o;
  row[reverse ? L::kSumTeacher : L::kSumStudent] = s.z_o;
}

// Combine step of one row (CPU and CUDA): merges the row's statistics over the shards of
// stats [shards, rows, LogprobStatsLayout::kWidth] and writes its log-prob, its row statistics
// for the backward and its error flags (an in-range target must be owned by exactly one shard).
// A flagged row's log-prob is NaN: never a finite value for an invalid row.
template <typename Acc>
SCOPE_INLINE void combine_logprob_row(const Acc* stats, int64_t shards, int64_t rows, int64_t r,
                                      Acc inv_temperature, Acc* logprob, Acc* row_stats,
                                      int32_t* flags) {
  using L = LogprobStatsLayout;
  using R = LogprobRowLayout;
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
  logprob[r] = f ? static_cast<Acc>(NAN) : (target_logit - acc.m) * inv_temperature - log_sum;
  row_stats[r * R::kWidth + R::kMax] = acc.m;
  row_stats[r * R::kWidth + R::kLogSum] = log_sum;
  flags[r] = f;
}

// Combine step of one row of the KL: merges stats [shards, rows, KLStatsLayout::kWidth] and
// writes the row's KL (NaN when flagged), its row statistics for the backward and its flags.
template <typename Acc>
SCOPE_INLINE void combine_kl_row(const Acc* stats, int64_t shards, int64_t rows, int64_t r,
                                 bool reverse, Acc inv_temperature_student,
                                 Acc inv_temperature_teacher, Acc* kl, Acc* row_stats,
                                 int32_t* flags) {
  using L = KLStatsLayout;
  using R = KLRowLayout;
  const Acc inv_w = reverse ? inv_temperature_student : inv_temperature_teacher;
  const Acc inv_o = reverse ? inv_temperature_teacher : inv_temperature_student;
  PairStats<Acc> acc = pair_empty<Acc>();
  int32_t f = 0;
  for (int64_t s = 0; s < shards; ++s) {
    const Acc* row = stats + (s * rows + r) * L::kWidth;
    acc = pair_merge(acc, pair_from_kl_stats(row, reverse), inv_w, inv_o);
    f |= static_cast<int32_t>(row[L::kFlags]);
  }
  const Acc k = pair_kl(acc);
  Acc* out = row_stats + r * R::kWidth;
  kl[r] = f ? static_cast<Acc>(NAN) : k;
  out[R::kKL] = k;
  out[R::kMaxStudent] = reverse ? acc.m_w : acc.m_o;
  out[R::kLogSumStudent] = stats_log(reverse ? acc.z_w : acc.z_o);
  out[R::kMaxTeacher] = reverse ? acc.m_o : acc.m_w;
  out[R::kLogSumTeacher] = stats_log(reverse ? acc.z_o : acc.z_w);
  flags[r] = f;
}

}  // namespace scope_kernels

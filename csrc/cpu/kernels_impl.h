// CPU kernels for the row-wise logit ops, compiled once per SIMD flavour.
//
// Including files define SCOPE_CPU_NS (the flavour's namespace), include the standard headers and
// ops.h, switch the compilation target if needed, then include this file and instantiate
// SCOPE_CPU_INSTANTIATE. Each row is processed in chunks of kChunk columns: the chunk is loaded,
// converted to the accumulation type and scaled by 1/temperature into an L1-resident buffer while
// its maximum is found, then exponentiated against that maximum; chunk summaries are merged with
// the same functions that merge tensor-parallel shards. Every input element is read once per
// phase and nothing of size [rows, cols] is allocated.
#pragma once

#include "simd_math.h"

namespace scope_kernels {
namespace SCOPE_CPU_NS {

constexpr int64_t kChunk = 1024;

template <typename T>
SCOPE_INLINE const T* row_ptr(const ConstRows<T>& m, int64_t r) {
  return m.data + r * m.row_stride;
}

// Loads columns [c0, c0 + n) of a row (raw values, in the accumulation type) into buf; returns
// their maximum and sets `finite` to false when any value is NaN or infinite.
template <typename T>
SCOPE_INLINE acc_t<T> load_chunk(const T* src, int64_t n, acc_t<T>* buf, bool* finite) {
  using Acc = acc_t<T>;
  Acc m = neg_inf<Acc>();
  Acc check = 0;  // x - x is 0 for finite x and NaN otherwise
#pragma omp simd reduction(max : m) reduction(+ : check)
  for (int64_t j = 0; j < n; ++j) {
    const Acc x = load_acc(src[j]);
    buf[j] = x;
    m = vmax(m, x);
    check += x - x;
  }
  *finite = (check == Acc(0));
  return m;
}

// ---------------------------------------------------------------------------------------------
// Token log-prob
// ---------------------------------------------------------------------------------------------
template <typename T>
void logprob_partial(const LogprobArgs<T>& args, acc_t<T>* stats, int64_t row_begin,
                     int64_t row_end) {
  using Acc = acc_t<T>;
  using L = LogprobStatsLayout;
  const int64_t valid = valid_columns(args.vocab_start, args.vocab_size, args.logits.cols);
  const Acc inv_t = args.inv_temperature;
  alignas(64) Acc buf[kChunk];
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* x = row_ptr(args.logits, r);
    int32_t flags = 0;
    const int64_t target = args.target[r];
    if (target < 0 || target >= args.vocab_size) flags |= kFlagTargetOutOfRange;
    LseStats<Acc> acc = lse_empty<Acc>();
    for (int64_t c0 = 0; c0 < valid; c0 += kChunk) {
      const int64_t n = valid - c0 < kChunk ? valid - c0 : kChunk;
      bool finite = true;
      const Acc m = load_chunk(x + c0, n, buf, &finite);
      if (!finite) {
        flags |= kFlagNonFiniteFirst;
        continue;
      }
      Acc z = 0;
#pragma omp simd reduction(+ : z)
      for (int64_t j = 0; j < n; ++j) z += vexp((buf[j] - m) * inv_t);
      acc = lse_merge(acc, LseStats<Acc>{m, z}, inv_t);
    }
    const int64_t local = target - args.vocab_start;
    const bool owner = local >= 0 && local < valid;
    Acc* out = stats + r * L::kWidth;
    out[L::kMax] = acc.m;
    out[L::kSum] = acc.z;
    out[L::kTarget] = owner ? load_acc(x[local]) : Acc(0);
    out[L::kOwner] = owner ? Acc(1) : Acc(0);
    out[L::kFlags] = static_cast<Acc>(flags);
  }
}

template <typename T>
void logprob_backward(const LogprobArgs<T>& args, const acc_t<T>* grad_out,
                      const acc_t<T>* row_stats, MutRows<T> grad, int64_t row_begin,
                      int64_t row_end) {
  using Acc = acc_t<T>;
  using R = LogprobRowLayout;
  const int64_t cols = args.logits.cols;
  const int64_t valid = valid_columns(args.vocab_start, args.vocab_size, cols);
  const Acc inv_t = args.inv_temperature;
  const T zero = store_as<T>(Acc(0));
  for (int64_t r = row_begin; r < row_end; ++r) {
    T* out = grad.data + r * grad.row_stride;
    const Acc g = grad_out[r] * inv_t;
    if (g == Acc(0)) {  // masked tokens: nothing to compute
      for (int64_t j = 0; j < cols; ++j) out[j] = zero;
      continue;
    }
    const T* x = row_ptr(args.logits, r);
    const Acc m = row_stats[r * R::kWidth + R::kMax];
    const Acc log_sum = row_stats[r * R::kWidth + R::kLogSum];
#pragma omp simd
    for (int64_t j = 0; j < valid; ++j) {
      out[j] = store_as<T>(-g * vexp((load_acc(x[j]) - m) * inv_t - log_sum));
    }
    for (int64_t j = valid; j < cols; ++j) out[j] = zero;
    const int64_t local = args.target[r] - args.vocab_start;
    if (local >= 0 && local < valid) {
      const Acc p = vexp((load_acc(x[local]) - m) * inv_t - log_sum);
      out[local] = store_as<T>(g * (Acc(1) - p));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// KL
// ---------------------------------------------------------------------------------------------
template <typename T, bool kReverse>
void kl_partial_dir(const KLArgs<T>& args, acc_t<T>* stats, int64_t row_begin, int64_t row_end) {
  using Acc = acc_t<T>;
  const int64_t valid = valid_columns(args.vocab_start, args.vocab_size, args.student.cols);
  alignas(64) Acc sbuf[kChunk];
  alignas(64) Acc tbuf[kChunk];
  // The weighting side of the KL: the distribution the expectation is taken under.
  const Acc* wbuf = kReverse ? sbuf : tbuf;
  const Acc* obuf = kReverse ? tbuf : sbuf;
  const Acc inv_w = kReverse ? args.inv_temperature_student : args.inv_temperature_teacher;
  const Acc inv_o = kReverse ? args.inv_temperature_teacher : args.inv_temperature_student;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* s = row_ptr(args.student, r);
    const T* t = row_ptr(args.teacher, r);
    int32_t flags = 0;
    PairStats<Acc> acc = pair_empty<Acc>();
    for (int64_t c0 = 0; c0 < valid; c0 += kChunk) {
      const int64_t n = valid - c0 < kChunk ? valid - c0 : kChunk;
      bool finite_s = true, finite_t = true;
      const Acc ms = load_chunk(s + c0, n, sbuf, &finite_s);
      const Acc mt = load_chunk(t + c0, n, tbuf, &finite_t);
      if (!finite_s) flags |= kFlagNonFiniteFirst;
      if (!finite_t) flags |= kFlagNonFiniteSecond;
      if (!(finite_s && finite_t)) continue;
      const Acc mw = kReverse ? ms : mt;
      const Acc mo = kReverse ? mt : ms;
      Acc zw = 0, zo = 0, c = 0;
#pragma omp simd reduction(+ : zw, zo, c)
      for (int64_t j = 0; j < n; ++j) {
        const Acc dw = (wbuf[j] - mw) * inv_w;
        const Acc dob = (obuf[j] - mo) * inv_o;
        const Acc ew = vexp(dw);
        zw += ew;
        zo += vexp(dob);
        c += ew * (dw - dob);
      }
      acc = pair_merge(acc, PairStats<Acc>{mw, zw, c, mo, zo}, inv_w, inv_o);
    }
    pair_to_kl_stats(acc, kReverse, static_cast<Acc>(flags), stats + r * KLStatsLayout::kWidth);
  }
}

template <typename T>
void kl_partial(const KLArgs<T>& args, acc_t<T>* stats, int64_t row_begin, int64_t row_end) {
  if (args.reverse) {
    kl_partial_dir<T, true>(args, stats, row_begin, row_end);
  } else {
    kl_partial_dir<T, false>(args, stats, row_begin, row_end);
  }
}

template <typename T, bool kReverse>
void kl_backward_dir(const KLArgs<T>& args, const acc_t<T>* grad_out, const acc_t<T>* row_stats,
                     MutRows<T> grad, int64_t row_begin, int64_t row_end) {
  using Acc = acc_t<T>;
  using R = KLRowLayout;
  const int64_t cols = args.student.cols;
  const int64_t valid = valid_columns(args.vocab_start, args.vocab_size, cols);
  const Acc inv_s = args.inv_temperature_student;
  const Acc inv_t = args.inv_temperature_teacher;
  const T zero = store_as<T>(Acc(0));
  for (int64_t r = row_begin; r < row_end; ++r) {
    T* out = grad.data + r * grad.row_stride;
    const Acc g = grad_out[r] * inv_s;
    if (g == Acc(0)) {
      for (int64_t j = 0; j < cols; ++j) out[j] = zero;
      continue;
    }
    const T* s = row_ptr(args.student, r);
    const T* t = row_ptr(args.teacher, r);
    const Acc* rs = row_stats + r * R::kWidth;
    const Acc ms = rs[R::kMaxStudent], ls_sum = rs[R::kLogSumStudent];
    const Acc mt = rs[R::kMaxTeacher], lt_sum = rs[R::kLogSumTeacher];
    if (kReverse) {
      const Acc k = rs[R::kKL];
#pragma omp simd
      for (int64_t j = 0; j < valid; ++j) {
        const Acc ls = (load_acc(s[j]) - ms) * inv_s - ls_sum;
        const Acc lt = (load_acc(t[j]) - mt) * inv_t - lt_sum;
        out[j] = store_as<T>(g * vexp(ls) * ((ls - lt) - k));
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < valid; ++j) {
        const Acc ls = (load_acc(s[j]) - ms) * inv_s - ls_sum;
        const Acc lt = (load_acc(t[j]) - mt) * inv_t - lt_sum;
        out[j] = store_as<T>(g * (vexp(ls) - vexp(lt)));
      }
    }
    for (int64_t j = valid; j < cols; ++j) out[j] = zero;
  }
}

template <typename T>
void kl_backward(const KLArgs<T>& args, const acc_t<T>* grad_out, const acc_t<T>* row_stats,
                 MutRows<T> grad, int64_t row_begin, int64_t row_end) {
  if (args.reverse) {
    kl_backward_dir<T, true>(args, grad_out, row_stats, grad, row_begin, row_end);
  } else {
    kl_backward_dir<T, false>(args, grad_out, row_stats, grad, row_begin, row_end);
  }
}

}  // namespace SCOPE_CPU_NS
}  // namespace scope_kernels

#define SCOPE_CPU_INSTANTIATE_FOR(T)                                                              \
  template void scope_kernels::SCOPE_CPU_NS::logprob_partial<T>(                                 \
      const scope_kernels::LogprobArgs<T>&, scope_kernels::acc_t<T>*, int64_t, int64_t);          \
  template void scope_kernels::SCOPE_CPU_NS::logprob_backward<T>(                                \
      const scope_kernels::LogprobArgs<T>&, const scope_kernels::acc_t<T>*,                       \
      const scope_kernels::acc_t<T>*, scope_kernels::MutRows<T>, int64_t, int64_t);               \
  template void scope_kernels::SCOPE_CPU_NS::kl_partial<T>(                                      \
      const scope_kernels::KLArgs<T>&, scope_kernels::acc_t<T>*, int64_t, int64_t);               \
  template void scope_kernels::SCOPE_CPU_NS::kl_backward<T>(                                     \
      const scope_kernels::KLArgs<T>&, const scope_kernels::acc_t<T>*,                            \
      const scope_kernels::acc_t<T>*, scope_kernels::MutRows<T>, int64_t, int64_t);

#define SCOPE_CPU_INSTANTIATE               \
  SCOPE_CPU_INSTANTIATE_FOR(float)          \
  SCOPE_CPU_INSTANTIATE_FOR(double)         \
  SCOPE_CPU_INSTANTIATE_FOR(scope_kernels::BFloat16) \
  SCOPE_CPU_INSTANTIATE_FOR(scope_kernels::Half)

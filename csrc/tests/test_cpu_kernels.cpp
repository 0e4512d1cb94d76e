// The CPU kernels of csrc/cpu against straightforward double-precision loops written here:
// every op and dtype, odd row lengths, padded columns, extreme logits, one-element rows, and the
// tensor-parallel path (a row split into 1, 2 and 4 shards whose partial statistics are combined).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "harness.h"
#include "scope_kernels/ops.h"

using namespace scope_kernels;

namespace {

template <typename T>
T from_double(double x);
template <>
float from_double<float>(double x) { return static_cast<float>(x); }
template <>
double from_double<double>(double x) { return x; }
template <>
BFloat16 from_double<BFloat16>(double x) { return to_bfloat16(static_cast<float>(x)); }
template <>
Half from_double<Half>(double x) { return to_half(static_cast<float>(x)); }

template <typename T>
double to_double(T x) { return static_cast<double>(to_float(x)); }

template <typename T>
const char* type_name();
template <> const char* type_name<float>() { return "float32"; }
template <> const char* type_name<double>() { return "float64"; }
template <> const char* type_name<BFloat16>() { return "bfloat16"; }
template <> const char* type_name<Half>() { return "float16"; }

// Relative precision of a gradient stored as T (a few ulps of the storage type).
template <typename T>
double grad_rtol() { return std::is_same<T, double>::value ? 1e-12 : std::is_same<T, float>::value ? 1e-5 : std::is_same<T, Half>::value ? 2e-3 : 1e-2; }
template <typename T>
double value_tol() { return std::is_same<T, double>::value ? 1e-12 : 1e-5; }

std::mt19937_64& rng() {
  static std::mt19937_64 g(scope_test::seed());
  return g;
}

enum class Kind { kNormal, kExtreme, kPeaked };

// A [rows, width] matrix of logits stored as T (values generated in double, rounded once).
template <typename T>
std::vector<T> random_logits(int64_t rows, int64_t width, Kind kind) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<T> out(rows * width);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t hot = static_cast<int64_t>(rng()() % width);
    for (int64_t j = 0; j < width; ++j) {
      double x = 3.0 * normal(rng());
      if (kind == Kind::kExtreme) x = (x >= 0 ? 1e4 : -1e4) + 50.0 * normal(rng());
      if (kind == Kind::kPeaked) x = (j == hot ? 1e4 : -1e4) + normal(rng());
      if (std::is_same<T, Half>::value) x = std::max(-6e4, std::min(6e4, x));
      out[r * width + j] = from_double<T>(x);
    }
  }
  return out;
}

// ---- straightforward references over the first `vocab` columns of a row, in long double: with
// logits of 1e4, plain double loses ~1e-11 to the rounding of x / T - lse (more than the kernels
// lose in float64), so the references use the wider type where the platform has one.
using Ref = long double;

Ref ref_lse(const std::vector<Ref>& x, int64_t vocab, Ref inv_t) {
  Ref m = -INFINITY;
  for (int64_t j = 0; j < vocab; ++j) m = std::max(m, x[j] * inv_t);
  Ref z = 0;
  for (int64_t j = 0; j < vocab; ++j) z += std::exp(x[j] * inv_t - m);
  return m + std::log(z);
}

template <typename T>
std::vector<Ref> row_as_ref(const std::vector<T>& m, int64_t r, int64_t width) {
  std::vector<Ref> out(width);
  for (int64_t j = 0; j < width; ++j) out[j] = to_double(m[r * width + j]);
  return out;
}

struct Layout {
  int64_t rows, shards, cols, vocab;  // cols per shard, vocab = true vocabulary (<= shards*cols)
  int64_t width() const { return shards * cols; }
};

// ------------------------------------------------------------------------------------------------
// token log-prob
// ------------------------------------------------------------------------------------------------
template <typename T>
void check_logprob(Layout L, Kind kind, double temperature, const std::string& what) {
  using Acc = acc_t<T>;
  const int64_t W = L.width();
  const double inv_t = 1.0 / temperature;
  std::vector<T> logits = random_logits<T>(L.rows, W, kind);
  std::vector<int64_t> target(L.rows);
  for (auto& t : target) t = static_cast<int64_t>(rng()() % L.vocab);
  std::vector<Acc> grad_out(L.rows);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (auto& g : grad_out) g = static_cast<Acc>(normal(rng()));
  grad_out[0] = 0;  // a masked token

  // partial per shard (strided rows: each shard is a column slice of the full matrix)
  std::vector<Acc> stats(L.shards * L.rows * LogprobStatsLayout::kWidth);
  for (int64_t s = 0; s < L.shards; ++s) {
    LogprobArgs<T> args{{logits.data() + s * L.cols, L.rows, L.cols, W}, target.data(), s * L.cols,
                        L.vocab, static_cast<Acc>(inv_t)};
    cpu::logprob_partial<T>(args, stats.data() + s * L.rows * LogprobStatsLayout::kWidth, 0, L.rows);
  }
  std::vector<Acc> logprob(L.rows), row_stats(L.rows * LogprobRowLayout::kWidth);
  std::vector<int32_t> flags(L.rows);
  cpu::logprob_combine<Acc>(stats.data(), L.shards, L.rows, static_cast<Acc>(inv_t), logprob.data(),
                            row_stats.data(), flags.data(), 0, L.rows);
  std::vector<T> grad(L.rows * W, from_double<T>(123.0));
  for (int64_t s = 0; s < L.shards; ++s) {
    LogprobArgs<T> args{{logits.data() + s * L.cols, L.rows, L.cols, W}, target.data(), s * L.cols,
                        L.vocab, static_cast<Acc>(inv_t)};
    cpu::logprob_backward<T>(args, grad_out.data(), row_stats.data(),
                             {grad.data() + s * L.cols, L.rows, L.cols, W}, 0, L.rows);
  }

  for (int64_t r = 0; r < L.rows; ++r) {
    const auto x = row_as_ref(logits, r, W);
    const Ref lse = ref_lse(x, L.vocab, inv_t);
    const double ref = static_cast<double>(x[target[r]] * inv_t - lse);
    CHECK(flags[r] == 0, what << " row " << r << " flags " << flags[r]);
    CHECK_CLOSE(logprob[r], ref, value_tol<T>(), value_tol<T>(), what << " logprob row " << r);
    CHECK(logprob[r] <= 0, what << " logprob > 0 at row " << r);
    double gmax = 0;
    std::vector<double> gref(W, 0.0);
    for (int64_t j = 0; j < L.vocab; ++j) {
      const Ref p = std::exp(x[j] * inv_t - lse);
      gref[j] = static_cast<double>(grad_out[r] * inv_t * ((j == target[r] ? 1.0 : 0.0) - p));
      gmax = std::max(gmax, std::fabs(gref[j]));
    }
    for (int64_t j = 0; j < W; ++j) {
      CHECK_CLOSE(to_double(grad[r * W + j]), gref[j], grad_rtol<T>(), grad_rtol<T>() * std::max(1.0, gmax),
                  what << " grad row " << r << " col " << j);
    }
  }
}

template <typename T>
void logprob_suite() {
  const std::string t = type_name<T>();
  for (int64_t shards : {1, 2, 4}) {
    const std::string s = t + " shards=" + std::to_string(shards);
    check_logprob<T>({7, shards, 131, shards * 131}, Kind::kNormal, 1.0, s + " odd cols");
    check_logprob<T>({3, shards, 1, shards}, Kind::kNormal, 1.0, s + " one-column shards");
    check_logprob<T>({5, shards, 1500, shards * 1500 - 700}, Kind::kNormal, 0.6, s + " padded, 2 chunks");
    check_logprob<T>({9, shards, 257, shards * 257}, Kind::kExtreme, 0.7, s + " extreme");
    check_logprob<T>({9, shards, 300, shards * 300 - 11}, Kind::kPeaked, 1.3, s + " peaked");
    if (shards > 1) {  // the last shards hold only padding columns
      check_logprob<T>({4, shards, 64, 60}, Kind::kNormal, 1.0, s + " padding-only shards");
    }
  }
  check_logprob<T>({1, 1, 1, 1}, Kind::kNormal, 1.0, t + " one element");
}

TEST(logprob_float32) { logprob_suite<float>(); }
TEST(logprob_float64) { logprob_suite<double>(); }
TEST(logprob_bfloat16) { logprob_suite<BFloat16>(); }
TEST(logprob_float16) { logprob_suite<Half>(); }

TEST(logprob_flags) {
  // NaN / Inf in a shard, targets out of range, a target owned by no shard
  std::vector<float> logits = random_logits<float>(4, 100, Kind::kNormal);
  logits[1 * 100 + 70] = NAN;
  logits[2 * 100 + 10] = INFINITY;
  std::vector<int64_t> target = {5, 6, 7, 100};
  std::vector<float> stats(2 * 4 * LogprobStatsLayout::kWidth);
  for (int64_t s = 0; s < 2; ++s) {
    LogprobArgs<float> args{{logits.data() + s * 50, 4, 50, 100}, target.data(), s * 50, 100, 1.0f};
    cpu::logprob_partial<float>(args, stats.data() + s * 4 * LogprobStatsLayout::kWidth, 0, 4);
  }
  std::vector<float> lp(4), rs(4 * LogprobRowLayout::kWidth);
  std::vector<int32_t> flags(4);
  cpu::logprob_combine<float>(stats.data(), 2, 4, 1.0f, lp.data(), rs.data(), flags.data(), 0, 4);
  CHECK(flags[0] == 0, "clean row flagged: " << flags[0]);
  CHECK(flags[1] == kFlagNonFiniteFirst, "NaN row: " << flags[1]);
  CHECK(flags[2] == kFlagNonFiniteFirst, "Inf row: " << flags[2]);
  CHECK(flags[3] == kFlagTargetOutOfRange, "target 100 >= vocab 100: " << flags[3]);
  // a flagged row's log-prob is NaN (an out-of-range target would otherwise give a finite one)
  CHECK(std::isfinite(lp[0]) && std::isnan(lp[1]) && std::isnan(lp[2]) && std::isnan(lp[3]),
        "flagged rows' log-probs must be NaN: " << lp[0] << " " << lp[1] << " " << lp[2] << " " << lp[3]);
  // combining only the first shard: targets 5..7 are owned, so no layout error; then pretend the
  // second shard claims the same ids (vocab_start 0 twice): owned twice -> layout flag
  for (int64_t s = 0; s < 2; ++s) {
    LogprobArgs<float> args{{logits.data() + s * 50, 4, 50, 100}, target.data(), 0, 100, 1.0f};
    cpu::logprob_partial<float>(args, stats.data() + s * 4 * LogprobStatsLayout::kWidth, 0, 4);
  }
  cpu::logprob_combine<float>(stats.data(), 2, 4, 1.0f, lp.data(), rs.data(), flags.data(), 0, 4);
  CHECK(flags[0] == kFlagShardLayout, "target owned by two shards: " << flags[0]);
  CHECK(std::isnan(lp[0]), "a layout-flagged row's log-prob must be NaN: " << lp[0]);
}

// ------------------------------------------------------------------------------------------------
// KL
// ------------------------------------------------------------------------------------------------
template <typename T>
void check_kl(Layout L, Kind kind, bool reverse, double ts, double tt, const std::string& what) {
  using Acc = acc_t<T>;
  const int64_t W = L.width();
  const double is = 1.0 / ts, it = 1.0 / tt;
  std::vector<T> student = random_logits<T>(L.rows, W, kind);
  std::vector<T> teacher = random_logits<T>(L.rows, W, kind);
  if (L.rows > 1) std::copy(student.begin() + W, student.begin() + 2 * W, teacher.begin() + W);  // KL ~ 0 row
  std::vector<Acc> grad_out(L.rows);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (auto& g : grad_out) g = static_cast<Acc>(normal(rng()));
  grad_out[0] = 0;

  auto args_for = [&](int64_t s) {
    return KLArgs<T>{{student.data() + s * L.cols, L.rows, L.cols, W},
                     {teacher.data() + s * L.cols, L.rows, L.cols, W},
                     s * L.cols, L.vocab, static_cast<Acc>(is), static_cast<Acc>(it), reverse};
  };
  std::vector<Acc> stats(L.shards * L.rows * KLStatsLayout::kWidth);
  for (int64_t s = 0; s < L.shards; ++s) {
    cpu::kl_partial<T>(args_for(s), stats.data() + s * L.rows * KLStatsLayout::kWidth, 0, L.rows);
  }
  std::vector<Acc> kl(L.rows), row_stats(L.rows * KLRowLayout::kWidth);
  std::vector<int32_t> flags(L.rows);
  cpu::kl_combine<Acc>(stats.data(), L.shards, L.rows, reverse, static_cast<Acc>(is), static_cast<Acc>(it),
                       kl.data(), row_stats.data(), flags.data(), 0, L.rows);
  std::vector<T> grad(L.rows * W, from_double<T>(123.0));
  for (int64_t s = 0; s < L.shards; ++s) {
    cpu::kl_backward<T>(args_for(s), grad_out.data(), row_stats.data(),
                        {grad.data() + s * L.cols, L.rows, L.cols, W}, 0, L.rows);
  }

  for (int64_t r = 0; r < L.rows; ++r) {
    const auto x = row_as_ref(student, r, W);
    const auto y = row_as_ref(teacher, r, W);
    const Ref lse_s = ref_lse(x, L.vocab, is), lse_t = ref_lse(y, L.vocab, it);
    Ref ref = 0;
    double scale = 0;
    for (int64_t j = 0; j < L.vocab; ++j) {
      const Ref ls = x[j] * is - lse_s, lt = y[j] * it - lse_t;
      ref += reverse ? std::exp(ls) * (ls - lt) : std::exp(lt) * (lt - ls);
      scale = std::max({scale, static_cast<double>(std::fabs(x[j])), static_cast<double>(std::fabs(y[j]))});
    }
    CHECK(flags[r] == 0, what << " row " << r << " flags " << flags[r]);
    CHECK_CLOSE(kl[r], static_cast<double>(ref), value_tol<T>(), value_tol<T>(), what << " kl row " << r);
    std::vector<double> gref(W, 0.0);
    double gmax = 0;
    for (int64_t j = 0; j < L.vocab; ++j) {
      const Ref ls = x[j] * is - lse_s, lt = y[j] * it - lse_t;
      gref[j] = static_cast<double>(grad_out[r] * is *
                                    (reverse ? std::exp(ls) * ((ls - lt) - ref) : std::exp(ls) - std::exp(lt)));
      gmax = std::max(gmax, std::fabs(gref[j]));
    }
    // The reverse-KL bracket (log p - log q) - KL subtracts numbers as large as the scaled
    // logit spans (|x - max| / T up to 2 * scale / T on each side): the accumulation type
    // resolves them to ~eps * that, times the gradient's factor g / T (see tests/helpers.py
    // assert_grad_close). At +-1e4 logits in float64 that is ~1e-10 absolute.
    const double eps = std::is_same<Acc, float>::value ? 1.2e-7 : 2.3e-16;
    const double g_factor = std::max(1.0, std::fabs(static_cast<double>(grad_out[r])) * is);
    const double magnitude_tol = reverse ? 16 * eps * 2 * scale * (is + it) * g_factor : 0.0;
    for (int64_t j = 0; j < W; ++j) {
      CHECK_CLOSE(to_double(grad[r * W + j]), gref[j], grad_rtol<T>(),
                  std::max(grad_rtol<T>() * std::max(1.0, gmax), magnitude_tol),
                  what << " grad row " << r << " col " << j);
    }
  }
}

template <typename T>
void kl_suite() {
  const std::string t = type_name<T>();
  for (bool reverse : {true, false}) {
    for (int64_t shards : {1, 2, 4}) {
      const std::string s = t + (reverse ? " reverse" : " forward") + " shards=" + std::to_string(shards);
      check_kl<T>({7, shards, 131, shards * 131}, Kind::kNormal, reverse, 1.0, 1.0, s + " odd cols");
      check_kl<T>({3, shards, 1, shards}, Kind::kNormal, reverse, 1.0, 1.0, s + " one-column shards");
      check_kl<T>({5, shards, 1500, shards * 1500 - 700}, Kind::kNormal, reverse, 0.6, 1.4, s + " padded, 2 chunks");
      check_kl<T>({6, shards, 257, shards * 257}, Kind::kExtreme, reverse, 0.7, 1.0, s + " extreme");
      check_kl<T>({6, shards, 300, shards * 300 - 11}, Kind::kPeaked, reverse, 1.0, 1.3, s + " peaked");
      if (shards > 1) check_kl<T>({4, shards, 64, 60}, Kind::kNormal, reverse, 1.0, 1.0, s + " padding-only shards");
    }
  }
  check_kl<T>({1, 1, 1, 1}, Kind::kNormal, true, 1.0, 1.0, t + " one element");
}

TEST(kl_float32) { kl_suite<float>(); }
TEST(kl_float64) { kl_suite<double>(); }
TEST(kl_bfloat16) { kl_suite<BFloat16>(); }
TEST(kl_float16) { kl_suite<Half>(); }

// kl_backward_fixup: starting from the gradient for `expected`, the rows where grad_out differs
// become exactly what kl_backward writes for grad_out; the other rows are not touched.
template <typename T>
void check_kl_backward_fixup(bool reverse) {
  using Acc = acc_t<T>;
  const int64_t rows = 9, cols = 300, vocab = 290;
  std::vector<T> student = random_logits<T>(rows, cols, Kind::kNormal);
  std::vector<T> teacher = random_logits<T>(rows, cols, Kind::kNormal);
  const KLArgs<T> args{{student.data(), rows, cols, cols}, {teacher.data(), rows, cols, cols}, 0, vocab,
                       static_cast<Acc>(1.25), static_cast<Acc>(0.9), reverse};
  std::vector<Acc> stats(rows * KLStatsLayout::kWidth), kl(rows), row_stats(rows * KLRowLayout::kWidth);
  std::vector<int32_t> flags(rows);
  cpu::kl_partial<T>(args, stats.data(), 0, rows);
  cpu::kl_combine<Acc>(stats.data(), 1, rows, reverse, args.inv_temperature_student,
                       args.inv_temperature_teacher, kl.data(), row_stats.data(), flags.data(), 0, rows);
  std::vector<Acc> expected(rows), got(rows);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (int64_t r = 0; r < rows; ++r) expected[r] = got[r] = static_cast<Acc>(normal(rng()));
  got[2] = static_cast<Acc>(3.5);
  got[3] = 0;  // a run of two differing rows
  got[8] = expected[8] * 2;  // the last row
  std::vector<T> fused(rows * cols), grad(rows * cols), exact(rows * cols);
  cpu::kl_backward<T>(args, expected.data(), row_stats.data(), {fused.data(), rows, cols, cols}, 0, rows);
  cpu::kl_backward<T>(args, got.data(), row_stats.data(), {exact.data(), rows, cols, cols}, 0, rows);
  // kept rows carry a sentinel: a fixup that writes them (even the same values) is caught
  auto changed = [](int64_t r) { return r == 2 || r == 3 || r == 8; };
  for (int64_t i = 0; i < rows * cols; ++i) grad[i] = changed(i / cols) ? fused[i] : from_double<T>(7.0);
  const int64_t rewritten = cpu::kl_backward_fixup<T>(args, got.data(), expected.data(), row_stats.data(),
                                                      {grad.data(), rows, cols, cols}, 0, rows);
  CHECK(rewritten == 3, type_name<T>() << " fixup: " << rewritten << " rows rewritten, 3 differ");
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j) {
      const double want = changed(r) ? to_double(exact[r * cols + j]) : 7.0;
      CHECK(to_double(grad[r * cols + j]) == want,
            type_name<T>() << " fixup row " << r << " col " << j << (changed(r) ? " (rewritten)" : " (kept)"));
    }
  }
  CHECK(to_double(fused[2 * cols]) != to_double(exact[2 * cols]),
        "the rewritten row must differ from the fused one for this test to mean anything");
}

TEST(kl_backward_fixup) {
  for (bool reverse : {true, false}) {
    check_kl_backward_fixup<float>(reverse);
    check_kl_backward_fixup<BFloat16>(reverse);
    check_kl_backward_fixup<double>(reverse);
  }
}

TEST(kl_flags_and_ignored_padding) {
  std::vector<float> s = random_logits<float>(3, 80, Kind::kNormal);
  std::vector<float> t = random_logits<float>(3, 80, Kind::kNormal);
  s[0 * 80 + 5] = NAN;
  t[1 * 80 + 6] = -INFINITY;
  for (int64_t j = 70; j < 80; ++j) s[2 * 80 + j] = NAN;  // padding: never read
  std::vector<float> stats(3 * KLStatsLayout::kWidth), kl(3), rs(3 * KLRowLayout::kWidth);
  std::vector<int32_t> flags(3);
  KLArgs<float> args{{s.data(), 3, 80, 80}, {t.data(), 3, 80, 80}, 0, 70, 1.0f, 1.0f, true};
  cpu::kl_partial<float>(args, stats.data(), 0, 3);
  cpu::kl_combine<float>(stats.data(), 1, 3, true, 1.0f, 1.0f, kl.data(), rs.data(), flags.data(), 0, 3);
  CHECK(flags[0] == kFlagNonFiniteFirst, "student NaN: " << flags[0]);
  CHECK(flags[1] == kFlagNonFiniteSecond, "teacher -inf: " << flags[1]);
  CHECK(flags[2] == 0 && std::isfinite(kl[2]), "NaN in padding columns must not matter: " << flags[2]);
  CHECK(std::isnan(kl[0]) && std::isnan(kl[1]), "flagged rows' KL must be NaN: " << kl[0] << " " << kl[1]);
}

// ------------------------------------------------------------------------------------------------
// sequence perplexity and group weights
// ------------------------------------------------------------------------------------------------
template <typename T>
void check_sequence_logppl() {
  const std::vector<int64_t> offsets = {0, 5, 6, 23, 23 + 9};
  const int64_t seqs = 4, n = offsets.back() + 3;  // 3 positions after the last sequence
  std::uniform_real_distribution<double> u(-6.0, 0.0);
  std::vector<T> values(n);
  std::unique_ptr<bool[]> mask(new bool[n]);
  for (int64_t i = 0; i < n; ++i) {
    values[i] = static_cast<T>(u(rng()));
    mask[i] = (rng()() % 4) != 0;
  }
  for (int64_t s = 0; s < seqs; ++s) mask[offsets[s]] = true;
  std::vector<T> lp(seqs), grad(n, T(99)), gout = {T(0.5), T(-1.0), T(2.0), T(0.25)};
  std::vector<int64_t> count(seqs);
  for (const bool* m : {static_cast<const bool*>(nullptr), static_cast<const bool*>(mask.get())}) {
    cpu::sequence_logppl<T>(values.data(), m, offsets.data(), lp.data(), count.data(), 0, seqs);
    std::fill(grad.begin(), grad.end(), T(0));
    cpu::sequence_logppl_backward<T>(gout.data(), m, offsets.data(), count.data(), grad.data(), 0, seqs);
    for (int64_t s = 0; s < seqs; ++s) {
      double sum = 0;
      int64_t c = 0;
      for (int64_t i = offsets[s]; i < offsets[s + 1]; ++i) {
        if (m == nullptr || m[i]) {
          sum += static_cast<double>(values[i]);
          ++c;
        }
      }
      CHECK(count[s] == c, "count of sequence " << s);
      CHECK_CLOSE(lp[s], -sum / c, 1e-6, 1e-6, "log ppl of sequence " << s);
      for (int64_t i = offsets[s]; i < offsets[s + 1]; ++i) {
        const double expected = (m == nullptr || m[i]) ? -static_cast<double>(gout[s]) / c : 0.0;
        CHECK_CLOSE(grad[i], expected, 1e-6, 1e-9, "grad at " << i);
      }
    }
  }
  // an empty sequence: count 0, NaN (the caller reports it), zero gradient
  const std::vector<int64_t> off2 = {0, 2, 2};
  cpu::sequence_logppl<T>(values.data(), nullptr, off2.data(), lp.data(), count.data(), 0, 2);
  CHECK(count[1] == 0 && std::isnan(static_cast<double>(lp[1])), "empty sequence");
}

TEST(sequence_logppl_float32) { check_sequence_logppl<float>(); }
TEST(sequence_logppl_float64) { check_sequence_logppl<double>(); }

template <typename T>
void check_group_weights(double sign, double tau, bool mean) {
  const int64_t n = 23, groups = 5;
  std::uniform_real_distribution<double> u(0.0, 3.0);
  std::vector<T> log_ppl(n), out(n, T(42));
  std::vector<int64_t> gi(n);
  std::unique_ptr<bool[]> member(new bool[n]);
  for (int64_t i = 0; i < n; ++i) {
    log_ppl[i] = static_cast<T>(u(rng()));
    gi[i] = static_cast<int64_t>(rng()() % groups);
    member[i] = (rng()() % 3) != 0;
  }
  cpu::group_weights<T>(log_ppl.data(), gi.data(), member.get(), n, groups, static_cast<T>(sign / tau), mean, out.data());
  for (int64_t g = 0; g < groups; ++g) {
    double denom = 0;
    int64_t count = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (member[i] && gi[i] == g) {
        denom += std::pow(std::exp(static_cast<double>(log_ppl[i])), sign / tau);
        ++count;
      }
    }
    double total = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (gi[i] != g) continue;
      if (!member[i]) {
        CHECK(out[i] == T(0), "non-member weight " << i);
        continue;
      }
      const double w = std::pow(std::exp(static_cast<double>(log_ppl[i])), sign / tau) / denom * (mean ? count : 1);
      CHECK_CLOSE(out[i], w, 1e-5, 1e-7, "weight " << i << " group " << g);
      total += static_cast<double>(out[i]);
    }
    if (count > 0) CHECK_CLOSE(total, mean ? count : 1.0, 1e-5, 0, "group " << g << " total");
  }
}

TEST(group_weights_paper_example) {
  // arXiv 2604.10688, tau = 1, "sum": student PPL 1.2, 2.6, 3.8 -> 0.158, 0.342, 0.500
  double lp[3] = {std::log(1.2), std::log(2.6), std::log(3.8)}, out[3];
  int64_t gi[3] = {0, 0, 0};
  bool member[3] = {true, true, true};
  cpu::group_weights<double>(lp, gi, member, 3, 1, 1.0, false, out);
  CHECK_CLOSE(out[0], 0.158, 0, 1e-3, "");
  CHECK_CLOSE(out[1], 0.342, 0, 1e-3, "");
  CHECK_CLOSE(out[2], 0.500, 0, 1e-3, "");
  double lt[3] = {std::log(4.5), std::log(2.9), std::log(1.7)};  // teacher: PPL^-1
  cpu::group_weights<double>(lt, gi, member, 3, 1, -1.0, false, out);
  CHECK_CLOSE(out[0], 0.192, 0, 1e-3, "");
  CHECK_CLOSE(out[1], 0.298, 0, 1e-3, "");
  CHECK_CLOSE(out[2], 0.510, 0, 1e-3, "");
}

TEST(group_weights_random) {
  for (double sign : {1.0, -1.0})
    for (double tau : {0.5, 1.0, 4.0})
      for (bool mean : {false, true}) {
        check_group_weights<float>(sign, tau, mean);
        check_group_weights<double>(sign, tau, mean);
      }
}

TEST(simd_flavour_reported) {
  const std::string f = cpu::simd_flavour();
  CHECK(f == "avx2" || f == "baseline", f);
  const char* env = std::getenv("SCOPE_KERNELS_SIMD");
  if (env != nullptr && std::string(env) == "baseline") CHECK(f == "baseline", "forced baseline: " << f);
  std::printf("  cpu simd flavour: %s\n", f.c_str());
}

}  // namespace

SCOPE_TEST_MAIN()

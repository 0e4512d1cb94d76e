// The CUDA launchers of cuda_ops.h against the CPU kernels (themselves checked against
// references by test_cpu_kernels): statistics, combine, backward and the small ops, for every
// dtype, shard counts 1/2/4, aligned and misaligned rows, padded vocabularies and extreme
// logits. Host code only; exits 77 (CTest: skipped) when no CUDA device is present.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "harness.h"
#include "scope_kernels/cuda_ops.h"
#include "scope_kernels/ops.h"

using namespace scope_kernels;

namespace {

std::mt19937_64& rng() {
  static std::mt19937_64 g(scope_test::seed());
  return g;
}

template <typename T>
T from_double(double x);
template <> float from_double<float>(double x) { return static_cast<float>(x); }
template <> double from_double<double>(double x) { return x; }
template <> BFloat16 from_double<BFloat16>(double x) { return to_bfloat16(static_cast<float>(x)); }
template <> Half from_double<Half>(double x) { return to_half(static_cast<float>(x)); }
template <typename T>
double to_double(T x) { return static_cast<double>(to_float(x)); }
template <typename T>
double grad_rtol() { return std::is_same<T, double>::value ? 1e-12 : std::is_same<T, float>::value ? 1e-5 : std::is_same<T, Half>::value ? 2e-3 : 1e-2; }
template <typename T>
const char* type_name() { return std::is_same<T, double>::value ? "float64" : std::is_same<T, float>::value ? "float32" : std::is_same<T, Half>::value ? "float16" : "bfloat16"; }

#define CUDA_OK(expr)                                                                  \
  do {                                                                                 \
    const int code_ = static_cast<int>(expr);                                          \
    CHECK(code_ == 0, #expr << ": " << cuda::error_string(code_));                     \
  } while (0)

// A device copy of a host vector, copied back on request.
template <typename T>
struct Device {
  T* ptr = nullptr;
  size_t n = 0;
  explicit Device(const std::vector<T>& host) : n(host.size()) {
    CUDA_OK(cudaMalloc(&ptr, std::max<size_t>(1, n) * sizeof(T)));
    if (n) CUDA_OK(cudaMemcpy(ptr, host.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  explicit Device(size_t count) : n(count) { CUDA_OK(cudaMalloc(&ptr, std::max<size_t>(1, n) * sizeof(T))); }
  ~Device() { cudaFree(ptr); }
  Device(const Device&) = delete;
  std::vector<T> host() const {
    std::vector<T> out(n);
    CUDA_OK(cudaDeviceSynchronize());
    if (n) CUDA_OK(cudaMemcpy(out.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
    return out;
  }
};

template <typename T>
std::vector<T> random_logits(int64_t rows, int64_t width, bool extreme) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<T> out(rows * width);
  for (auto& v : out) {
    double x = 3.0 * normal(rng());
    if (extreme) x = (x >= 0 ? 1e4 : -1e4) + 50.0 * normal(rng());
    if (std::is_same<T, Half>::value) x = std::max(-6e4, std::min(6e4, x));
    v = from_double<T>(x);
  }
  return out;
}

template <typename A>
void check_stats(const std::vector<A>& gpu, const std::vector<A>& cpu, const std::string& what) {
  for (size_t i = 0; i < cpu.size(); ++i) {
    CHECK_CLOSE(gpu[i], cpu[i], 1e-5, 1e-5 * std::max(1.0, std::fabs(static_cast<double>(cpu[i]))),
                what << " stats[" << i << "]");
  }
}

template <typename T>
void check_grads(const std::vector<T>& gpu, const std::vector<T>& cpu, const std::string& what) {
  double gmax = 0;
  for (const T& v : cpu) gmax = std::max(gmax, std::fabs(to_double(v)));
  for (size_t i = 0; i < cpu.size(); ++i) {
    CHECK_CLOSE(to_double(gpu[i]), to_double(cpu[i]), grad_rtol<T>(), grad_rtol<T>() * std::max(1.0, gmax),
                what << " grad[" << i << "]");
  }
}

struct Layout {
  int64_t rows, shards, cols, vocab;
  int64_t width() const { return shards * cols; }
};

template <typename T>
void compare_logprob(Layout L, bool extreme, double temperature, const std::string& what) {
  using Acc = acc_t<T>;
  using SL = LogprobStatsLayout;
  const int64_t W = L.width();
  const Acc inv_t = static_cast<Acc>(1.0 / temperature);
  const auto logits = random_logits<T>(L.rows, W, extreme);
  std::vector<int64_t> target(L.rows);
  for (auto& t : target) t = static_cast<int64_t>(rng()() % L.vocab);
  std::vector<Acc> grad_out(L.rows);
  for (auto& g : grad_out) g = static_cast<Acc>(std::normal_distribution<double>(0, 1)(rng()));
  grad_out[0] = 0;
  Device<T> d_logits(logits);
  Device<int64_t> d_target(target);
  Device<Acc> d_grad_out(grad_out);

  std::vector<Acc> stats(L.shards * L.rows * SL::kWidth);
  Device<Acc> d_stats(stats.size());
  for (int64_t s = 0; s < L.shards; ++s) {
    LogprobArgs<T> host{{logits.data() + s * L.cols, L.rows, L.cols, W}, target.data(), s * L.cols, L.vocab, inv_t};
    cpu::logprob_partial<T>(host, stats.data() + s * L.rows * SL::kWidth, 0, L.rows);
    LogprobArgs<T> dev{{d_logits.ptr + s * L.cols, L.rows, L.cols, W}, d_target.ptr, s * L.cols, L.vocab, inv_t};
    CUDA_OK(cuda::logprob_partial<T>(dev, d_stats.ptr + s * L.rows * SL::kWidth, nullptr));
  }
  check_stats(d_stats.host(), stats, what + " partial");

  std::vector<Acc> lp(L.rows), rs(L.rows * LogprobRowLayout::kWidth);
  std::vector<int32_t> flags(L.rows);
  cpu::logprob_combine<Acc>(stats.data(), L.shards, L.rows, inv_t, lp.data(), rs.data(), flags.data(), 0, L.rows);
  Device<Acc> d_lp(L.rows), d_rs(rs.size());
  Device<int32_t> d_flags(L.rows);
  Device<Acc> d_cpu_stats(stats);  // combine the CPU statistics on the GPU: same inputs
  CUDA_OK(cuda::logprob_combine<Acc>(d_cpu_stats.ptr, L.shards, L.rows, inv_t, d_lp.ptr, d_rs.ptr, d_flags.ptr, nullptr));
  check_stats(d_lp.host(), lp, what + " logprob");
  check_stats(d_rs.host(), rs, what + " row stats");
  CHECK(d_flags.host() == flags, what << " flags");

  std::vector<T> grad(L.rows * W, from_double<T>(7.0));
  Device<T> d_grad(grad);
  Device<Acc> d_rs_cpu(rs);
  for (int64_t s = 0; s < L.shards; ++s) {
    LogprobArgs<T> host{{logits.data() + s * L.cols, L.rows, L.cols, W}, target.data(), s * L.cols, L.vocab, inv_t};
    cpu::logprob_backward<T>(host, grad_out.data(), rs.data(), {grad.data() + s * L.cols, L.rows, L.cols, W}, 0, L.rows);
    LogprobArgs<T> dev{{d_logits.ptr + s * L.cols, L.rows, L.cols, W}, d_target.ptr, s * L.cols, L.vocab, inv_t};
    CUDA_OK(cuda::logprob_backward<T>(dev, d_grad_out.ptr, d_rs_cpu.ptr, {d_grad.ptr + s * L.cols, L.rows, L.cols, W}, nullptr));
  }
  check_grads(d_grad.host(), grad, what + " backward");
}

template <typename T>
void compare_kl(Layout L, bool extreme, bool reverse, double ts, double tt, const std::string& what) {
  using Acc = acc_t<T>;
  using SL = KLStatsLayout;
  const int64_t W = L.width();
  const Acc is = static_cast<Acc>(1.0 / ts), it = static_cast<Acc>(1.0 / tt);
  const auto student = random_logits<T>(L.rows, W, extreme);
  const auto teacher = random_logits<T>(L.rows, W, extreme);
  std::vector<Acc> grad_out(L.rows);
  for (auto& g : grad_out) g = static_cast<Acc>(std::normal_distribution<double>(0, 1)(rng()));
  grad_out[0] = 0;
  Device<T> d_s(student), d_t(teacher);
  Device<Acc> d_grad_out(grad_out);
  auto host_args = [&](int64_t s) {
    return KLArgs<T>{{student.data() + s * L.cols, L.rows, L.cols, W}, {teacher.data() + s * L.cols, L.rows, L.cols, W},
                     s * L.cols, L.vocab, is, it, reverse};
  };
  auto dev_args = [&](int64_t s) {
    return KLArgs<T>{{d_s.ptr + s * L.cols, L.rows, L.cols, W}, {d_t.ptr + s * L.cols, L.rows, L.cols, W},
                     s * L.cols, L.vocab, is, it, reverse};
  };
  std::vector<Acc> stats(L.shards * L.rows * SL::kWidth);
  Device<Acc> d_stats(stats.size());
  for (int64_t s = 0; s < L.shards; ++s) {
    cpu::kl_partial<T>(host_args(s), stats.data() + s * L.rows * SL::kWidth, 0, L.rows);
    CUDA_OK(cuda::kl_partial<T>(dev_args(s), d_stats.ptr + s * L.rows * SL::kWidth, nullptr));
  }
  check_stats(d_stats.host(), stats, what + " partial");

  std::vector<Acc> kl(L.rows), rs(L.rows * KLRowLayout::kWidth);
  std::vector<int32_t> flags(L.rows);
  cpu::kl_combine<Acc>(stats.data(), L.shards, L.rows, reverse, is, it, kl.data(), rs.data(), flags.data(), 0, L.rows);
  Device<Acc> d_cpu_stats(stats), d_kl(L.rows), d_rs(rs.size());
  Device<int32_t> d_flags(L.rows);
  CUDA_OK(cuda::kl_combine<Acc>(d_cpu_stats.ptr, L.shards, L.rows, reverse, is, it, d_kl.ptr, d_rs.ptr, d_flags.ptr, nullptr));
  check_stats(d_kl.host(), kl, what + " kl");
  check_stats(d_rs.host(), rs, what + " row stats");
  CHECK(d_flags.host() == flags, what << " flags");

  std::vector<T> grad(L.rows * W, from_double<T>(7.0));
  Device<T> d_grad(grad);
  Device<Acc> d_rs_cpu(rs);
  for (int64_t s = 0; s < L.shards; ++s) {
    cpu::kl_backward<T>(host_args(s), grad_out.data(), rs.data(), {grad.data() + s * L.cols, L.rows, L.cols, W}, 0, L.rows);
    CUDA_OK(cuda::kl_backward<T>(dev_args(s), d_grad_out.ptr, d_rs_cpu.ptr, {d_grad.ptr + s * L.cols, L.rows, L.cols, W}, nullptr));
  }
  check_grads(d_grad.host(), grad, what + " backward");
}

// The fused KL (one shard holding the whole vocabulary) against the CPU's: on chip where
// cuda::kl_fused_on_chip says so, else the launcher must refuse (the binding then composes the
// three phases).
template <typename T>
void compare_kl_fused(int64_t rows, int64_t cols, int64_t vocab, bool reverse, const std::string& what) {
  using Acc = acc_t<T>;
  const Acc is = static_cast<Acc>(1.0 / 0.9), it = static_cast<Acc>(1.0 / 1.1);
  const auto student = random_logits<T>(rows, cols, false);
  const auto teacher = random_logits<T>(rows, cols, false);
  std::vector<Acc> weight(rows);
  for (auto& g : weight) g = static_cast<Acc>(std::normal_distribution<double>(0, 1)(rng()));
  weight[0] = 0;
  Device<T> d_s(student), d_t(teacher);
  Device<Acc> d_w(weight);
  const KLArgs<T> host{{student.data(), rows, cols, cols}, {teacher.data(), rows, cols, cols}, 0, vocab, is, it, reverse};
  const KLArgs<T> dev{{d_s.ptr, rows, cols, cols}, {d_t.ptr, rows, cols, cols}, 0, vocab, is, it, reverse};
  std::vector<Acc> kl(rows), rs(rows * KLRowLayout::kWidth);
  std::vector<int32_t> flags(rows);
  std::vector<T> grad(rows * cols);
  cpu::kl_fused<T>(host, weight.data(), kl.data(), rs.data(), flags.data(), {grad.data(), rows, cols, cols}, 0, rows);
  Device<Acc> d_kl(rows), d_rs(rs.size());
  Device<int32_t> d_flags(rows);
  Device<T> d_grad(std::vector<T>(rows * cols, from_double<T>(7.0)));
  const int code = cuda::kl_fused<T>(dev, d_w.ptr, d_kl.ptr, d_rs.ptr, d_flags.ptr, {d_grad.ptr, rows, cols, cols}, nullptr);
  if (!cuda::kl_fused_on_chip<T>(dev)) {
    CHECK(code == static_cast<int>(cudaErrorNotSupported), what << ": expected a refusal, got " << code);
    return;
  }
  CUDA_OK(code);
  check_stats(d_kl.host(), kl, what + " kl");
  check_stats(d_rs.host(), rs, what + " row stats");
  CHECK(d_flags.host() == flags, what << " flags");
  check_grads(d_grad.host(), grad, what + " grad");
}

template <typename T>
void logit_suite() {
  const std::string t = type_name<T>();
  for (int64_t shards : {1, 2, 4}) {
    const std::string s = t + " shards=" + std::to_string(shards);
    // 131 columns: rows not 16-byte aligned (scalar path); 1024 / 2048: aligned (vector path)
    for (int64_t cols : {int64_t(1), int64_t(131), int64_t(1024), int64_t(2500)}) {
      for (int64_t pad : {int64_t(0), std::min<int64_t>(cols * shards - 1, cols / 2 + 3)}) {
        const Layout L{7, shards, cols, shards * cols - pad};
        const std::string w = s + " cols=" + std::to_string(cols) + " pad=" + std::to_string(pad);
        compare_logprob<T>(L, false, 0.7, w);
        compare_kl<T>(L, false, true, 0.8, 1.2, w + " reverse");
        compare_kl<T>(L, false, false, 1.0, 1.0, w + " forward");
      }
    }
    compare_logprob<T>({5, shards, 2048, shards * 2048}, true, 1.0, s + " extreme");
    compare_kl<T>({5, shards, 2048, shards * 2048}, true, true, 1.0, 1.0, s + " extreme");
  }
  // fused: one warp .. 512 threads per block, many rows per block, padding, too long, unaligned
  for (bool reverse : {true, false}) {
    const std::string d = reverse ? " reverse" : " forward";
    compare_kl_fused<T>(7, 64, 64, reverse, t + " fused 7x64" + d);
    compare_kl_fused<T>(3000, 256, 250, reverse, t + " fused 3000x256" + d);
    compare_kl_fused<T>(40, 18992, 18900, reverse, t + " fused 40x18992" + d);
    compare_kl_fused<T>(9, 37984, 37984, reverse, t + " fused 9x37984" + d);
    compare_kl_fused<T>(2, 151936, 151936, reverse, t + " fused 2x151936" + d);
    compare_kl_fused<T>(5, 1001, 1001, reverse, t + " fused 5x1001" + d);
  }
}

TEST(cuda_logit_ops_float32) { logit_suite<float>(); }
TEST(cuda_logit_ops_float64) { logit_suite<double>(); }
TEST(cuda_logit_ops_bfloat16) { logit_suite<BFloat16>(); }
TEST(cuda_logit_ops_float16) { logit_suite<Half>(); }

TEST(cuda_sequence_logppl_and_group_weights) {
  const std::vector<int64_t> offsets = {0, 5, 6, 23, 32};
  const int64_t seqs = 4, n = 35;
  std::vector<float> values(n);
  for (auto& v : values) v = -static_cast<float>(std::uniform_real_distribution<double>(0, 6)(rng()));
  std::unique_ptr<bool[]> mask(new bool[n]);
  for (int64_t i = 0; i < n; ++i) mask[i] = (rng()() % 4) != 0 || i == 0 || i == 5 || i == 6 || i == 23;
  std::vector<bool> mask_vec(mask.get(), mask.get() + n);
  std::vector<char> mask_bytes(n);
  for (int64_t i = 0; i < n; ++i) mask_bytes[i] = mask[i];
  Device<float> d_values(values);
  Device<int64_t> d_offsets(offsets);
  Device<char> d_mask(mask_bytes);
  std::vector<float> lp(seqs);
  std::vector<int64_t> count(seqs);
  cpu::sequence_logppl<float>(values.data(), mask.get(), offsets.data(), lp.data(), count.data(), 0, seqs);
  Device<float> d_lp(seqs);
  Device<int64_t> d_count(seqs);
  CUDA_OK(cuda::sequence_logppl<float>(d_values.ptr, reinterpret_cast<const bool*>(d_mask.ptr), d_offsets.ptr, seqs,
                                       d_lp.ptr, d_count.ptr, nullptr));
  check_stats(d_lp.host(), lp, "sequence_logppl");
  CHECK(d_count.host() == count, "counts");
  std::vector<float> gout = {0.5f, -1.f, 2.f, 0.25f}, grad(n, 0.f);
  cpu::sequence_logppl_backward<float>(gout.data(), mask.get(), offsets.data(), count.data(), grad.data(), 0, seqs);
  Device<float> d_gout(gout), d_grad(std::vector<float>(n, 9.f));
  CUDA_OK(cuda::sequence_logppl_backward<float>(d_gout.ptr, reinterpret_cast<const bool*>(d_mask.ptr), d_offsets.ptr,
                                                d_count.ptr, seqs, n, d_grad.ptr, nullptr));
  check_stats(d_grad.host(), grad, "sequence_logppl backward");

  const int64_t groups = 5;
  std::vector<int64_t> gi(n);
  for (auto& g : gi) g = static_cast<int64_t>(rng()() % groups);
  for (bool mean : {false, true}) {
    std::vector<float> w(n);
    cpu::group_weights<float>(values.data(), gi.data(), mask.get(), n, groups, -0.5f, mean, w.data());
    Device<int64_t> d_gi(gi);
    Device<float> d_w(std::vector<float>(n, 9.f));
    CUDA_OK(cuda::group_weights<float>(d_values.ptr, d_gi.ptr, reinterpret_cast<const bool*>(d_mask.ptr), n, groups,
                                       -0.5f, mean, d_w.ptr, nullptr));
    check_stats(d_w.host(), w, mean ? "group weights mean" : "group weights sum");
  }
}

}  // namespace

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: CUDA kernel tests skipped\n");
    return 77;
  }
  return scope_test::run_all(argc, argv);
}

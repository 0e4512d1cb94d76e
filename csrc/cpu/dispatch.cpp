// Public CPU entry points: pick the widest SIMD flavour this CPU supports, once.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "flavour_api.h"

SCOPE_DECLARE_CPU_FLAVOUR(baseline)
#if defined(SCOPE_HAVE_AVX2_FLAVOUR)
SCOPE_DECLARE_CPU_FLAVOUR(avx2)
#endif

namespace scope_kernels {
namespace cpu {
namespace {

// SCOPE_KERNELS_SIMD=baseline forces the baseline kernels (used by the tests to cover both).
bool use_avx2() {
#if defined(SCOPE_HAVE_AVX2_FLAVOUR)
  static const bool value = [] {
    const char* env = std::getenv("SCOPE_KERNELS_SIMD");
    if (env != nullptr && std::strcmp(env, "baseline") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return value;
#else
  return false;
#endif
}

}  // namespace

#if defined(SCOPE_HAVE_AVX2_FLAVOUR)
#define SCOPE_DISPATCH(call) (use_avx2() ? avx2::call : baseline::call)
#else
#define SCOPE_DISPATCH(call) (baseline::call)
#endif

const char* simd_flavour() { return use_avx2() ? "avx2" : "baseline"; }

template <typename T>
void logprob_partial(const LogprobArgs<T>& args, acc_t<T>* stats, int64_t b, int64_t e) {
  SCOPE_DISPATCH(logprob_partial<T>(args, stats, b, e));
}

template <typename T>
void logprob_backward(const LogprobArgs<T>& args, const acc_t<T>* grad_out,
                      const acc_t<T>* row_stats, MutRows<T> grad, int64_t b, int64_t e) {
  SCOPE_DISPATCH(logprob_backward<T>(args, grad_out, row_stats, grad, b, e));
}

template <typename T>
void kl_partial(const KLArgs<T>& args, acc_t<T>* stats, int64_t b, int64_t e) {
  SCOPE_DISPATCH(kl_partial<T>(args, stats, b, e));
}

template <typename T>
void kl_backward(const KLArgs<T>& args, const acc_t<T>* grad_out, const acc_t<T>* row_stats,
                 MutRows<T> grad, int64_t b, int64_t e) {
  SCOPE_DISPATCH(kl_backward<T>(args, grad_out, row_stats, grad, b, e));
}

#define SCOPE_INSTANTIATE_DISPATCH(T)                                                        \
  template void logprob_partial<T>(const LogprobArgs<T>&, acc_t<T>*, int64_t, int64_t);     \
  template void logprob_backward<T>(const LogprobArgs<T>&, const acc_t<T>*, const acc_t<T>*, \
                                    MutRows<T>, int64_t, int64_t);                          \
  template void kl_partial<T>(const KLArgs<T>&, acc_t<T>*, int64_t, int64_t);               \
  template void kl_backward<T>(const KLArgs<T>&, const acc_t<T>*, const acc_t<T>*, MutRows<T>, \
                               int64_t, int64_t);

SCOPE_INSTANTIATE_DISPATCH(float)
SCOPE_INSTANTIATE_DISPATCH(double)
SCOPE_INSTANTIATE_DISPATCH(BFloat16)
SCOPE_INSTANTIATE_DISPATCH(Half)

}  // namespace cpu
}  // namespace scope_kernels

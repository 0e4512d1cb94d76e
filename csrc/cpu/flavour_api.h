// Declarations of the row kernels that each SIMD flavour provides (definitions: kernels_impl.h).
#pragma once

#include "scope_kernels/ops.h"

#define SCOPE_DECLARE_CPU_FLAVOUR(NS)                                                          \
  namespace scope_kernels {                                                                    \
  namespace NS {                                                                               \
  template <typename T>                                                                        \
  void logprob_partial(const LogprobArgs<T>&, acc_t<T>*, int64_t, int64_t);                    \
  template <typename T>                                                                        \
  void logprob_backward(const LogprobArgs<T>&, const acc_t<T>*, const acc_t<T>*, MutRows<T>,   \
                        int64_t, int64_t);                                                     \
  template <typename T>                                                                        \
  void kl_partial(const KLArgs<T>&, acc_t<T>*, int64_t, int64_t);                              \
  template <typename T>                                                                        \
  void kl_backward(const KLArgs<T>&, const acc_t<T>*, const acc_t<T>*, MutRows<T>, int64_t,    \
                   int64_t);                                                                   \
  }                                                                                            \
  }

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SCOPE_HAVE_AVX2_FLAVOUR 1
#endif

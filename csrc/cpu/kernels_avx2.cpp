// Row kernels compiled for AVX2 + FMA + F16C (x86-64 only); dispatch.cpp picks them at run time
// when the CPU has those features. Standard headers come before the target switch so that only
// the kernels themselves are compiled for the wider ISA.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "flavour_api.h"

#if defined(SCOPE_HAVE_AVX2_FLAVOUR)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#define SCOPE_CPU_NS avx2
#include "kernels_impl.h"

SCOPE_CPU_INSTANTIATE

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

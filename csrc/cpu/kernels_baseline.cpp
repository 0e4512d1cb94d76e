// Row kernels compiled for the baseline ISA of the build (SSE2 on x86-64, NEON on aarch64).
#include <cmath>
#include <cstdint>
#include <cstring>

#include "flavour_api.h"

#define SCOPE_CPU_NS baseline
#include "kernels_impl.h"

SCOPE_CPU_INSTANTIATE

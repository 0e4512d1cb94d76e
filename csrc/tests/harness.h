// A minimal unit-test harness for the kernel tests (no dependency beyond the standard library):
// TEST(name) registers a function, CHECK / CHECK_CLOSE record failures with file:line and a
// message, main() runs every test (or those whose name contains argv[1]) and returns non-zero if
// any check failed. Random inputs are fresh per run; the seed is printed and can be replayed
// with SCOPE_TEST_SEED=<seed>.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace scope_test {

struct Registry {
  std::vector<std::pair<std::string, std::function<void()>>> tests;
  int64_t checks = 0;
  int64_t failures = 0;
  int64_t failures_reported = 0;
  static Registry& get() {
    static Registry r;
    return r;
  }
};

struct Register {
  Register(const char* name, std::function<void()> fn) {
    Registry::get().tests.emplace_back(name, std::move(fn));
  }
};

inline uint64_t& seed() {
  static uint64_t s = [] {
    const char* env = std::getenv("SCOPE_TEST_SEED");
    return env ? std::strtoull(env, nullptr, 10) : static_cast<uint64_t>(std::random_device{}());
  }();
  return s;
}

inline void fail(const char* file, int line, const std::string& msg) {
  auto& r = Registry::get();
  ++r.failures;
  if (r.failures_reported++ < 30) std::fprintf(stderr, "  FAILED %s:%d: %s\n", file, line, msg.c_str());
}

// |a - b| <= atol + rtol * |b|, NaN never close.
inline bool close(double a, double b, double rtol, double atol) {
  return std::isfinite(a) == std::isfinite(b) && std::fabs(a - b) <= atol + rtol * std::fabs(b);
}

}  // namespace scope_test

#define SCOPE_CAT2(a, b) a##b
#define SCOPE_CAT(a, b) SCOPE_CAT2(a, b)
#define TEST(name)                                                                      \
  static void name();                                                                   \
  static scope_test::Register SCOPE_CAT(register_, name)(#name, name);                  \
  static void name()

#define CHECK(cond, ...)                                                                \
  do {                                                                                  \
    ++scope_test::Registry::get().checks;                                               \
    if (!(cond)) {                                                                      \
      std::ostringstream os_;                                                           \
      os_ << #cond << " " << __VA_ARGS__;                                               \
      scope_test::fail(__FILE__, __LINE__, os_.str());                                  \
    }                                                                                   \
  } while (0)

#define CHECK_CLOSE(actual, expected, rtol, atol, ...)                                  \
  do {                                                                                  \
    const double a_ = (actual), e_ = (expected);                                        \
    ++scope_test::Registry::get().checks;                                               \
    if (!scope_test::close(a_, e_, (rtol), (atol))) {                                   \
      std::ostringstream os_;                                                           \
      os_.precision(10);                                                                \
      os_ << #actual << " = " << a_ << " vs expected " << e_ << " (rtol " << (rtol)     \
          << ", atol " << (atol) << ") " << __VA_ARGS__;                                \
      scope_test::fail(__FILE__, __LINE__, os_.str());                                  \
    }                                                                                   \
  } while (0)

namespace scope_test {
// Runs every registered test (or those whose name contains argv[1]); 0 if all checks passed.
inline int run_all(int argc, char** argv) {
  auto& r = Registry::get();
  std::printf("SCOPE_TEST_SEED=%llu\n", static_cast<unsigned long long>(seed()));
  int ran = 0;
  for (auto& t : r.tests) {
    if (argc > 1 && t.first.find(argv[1]) == std::string::npos) continue;
    const int64_t before = r.failures;
    t.second();
    ++ran;
    std::printf("%s %s\n", r.failures == before ? "[ ok ]" : "[FAIL]", t.first.c_str());
  }
  std::printf("%d tests, %lld checks, %lld failures\n", ran, static_cast<long long>(r.checks),
              static_cast<long long>(r.failures));
  return (r.failures == 0 && ran > 0) ? 0 : 1;
}
}  // namespace scope_test

#define SCOPE_TEST_MAIN() \
  int main(int argc, char** argv) { return scope_test::run_all(argc, argv); }

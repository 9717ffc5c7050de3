/* check.h: a small unit-test harness.
 *
 * A test binary defines test functions `static void test_x(void)` and lists them in main:
 *     int main(void) { RUN(test_x); RUN(test_y); return check_done(); }
 * CHECK* record a failure with file/line and keep going inside the test; REQUIRE* also return from it.
 * SKIP("why") marks the binary as skipped (exit 77) when nothing failed.
 * Exit status: 0 all passed, 1 a check failed, 77 skipped.
 * Fixture paths: fixture_path("models/kjv-qwen3-21m") -> $STRATA_FIXTURES/models/... (default build/fixtures).
 */
#ifndef STRATA_CHECK_H
#define STRATA_CHECK_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int check_failures_;
static int check_tests_run_;
static int check_tests_failed_;
static int check_skipped_;
static const char *check_current_;

#define CHECK_FAIL_(...)                                                                               \
    do {                                                                                               \
        check_failures_++;                                                                             \
        fprintf(stderr, "  FAIL %s:%d in %s: ", __FILE__, __LINE__, check_current_);                  \
        fprintf(stderr, __VA_ARGS__);                                                                  \
        fprintf(stderr, "\n");                                                                         \
    } while (0)

#define CHECK(cond)                                                                                    \
    do {                                                                                               \
        if (!(cond)) CHECK_FAIL_("%s", #cond);                                                         \
    } while (0)
#define CHECK_MSG(cond, ...)                                                                           \
    do {                                                                                               \
        if (!(cond)) CHECK_FAIL_(__VA_ARGS__);                                                         \
    } while (0)
#define REQUIRE(cond)                                                                                  \
    do {                                                                                               \
        if (!(cond)) {                                                                                 \
            CHECK_FAIL_("%s", #cond);                                                                  \
            return;                                                                                    \
        }                                                                                              \
    } while (0)
#define REQUIRE_MSG(cond, ...)                                                                         \
    do {                                                                                               \
        if (!(cond)) {                                                                                 \
            CHECK_FAIL_(__VA_ARGS__);                                                                  \
            return;                                                                                    \
        }                                                                                              \
    } while (0)
#define CHECK_EQ_INT(a, b)                                                                             \
    do {                                                                                               \
        long long a_ = (long long)(a), b_ = (long long)(b);                                            \
        if (a_ != b_) CHECK_FAIL_("%s == %s (%lld vs %lld)", #a, #b, a_, b_);                          \
    } while (0)
#define CHECK_NEAR(a, b, tol)                                                                          \
    do {                                                                                               \
        double a_ = (double)(a), b_ = (double)(b);                                                     \
        if (!(fabs(a_ - b_) <= (tol))) CHECK_FAIL_("%s ~ %s (%.9g vs %.9g, tol %g)", #a, #b, a_, b_, (double)(tol)); \
    } while (0)
#define CHECK_STR(a, b)                                                                                \
    do {                                                                                               \
        const char *a_ = (a), *b_ = (b);                                                               \
        if (!a_ || !b_ || strcmp(a_, b_) != 0) CHECK_FAIL_("%s == %s (\"%s\" vs \"%s\")", #a, #b, a_ ? a_ : "(null)", b_ ? b_ : "(null)"); \
    } while (0)

#define SKIP(...)                                                                                      \
    do {                                                                                               \
        fprintf(stderr, "  SKIP %s: ", check_current_);                                               \
        fprintf(stderr, __VA_ARGS__);                                                                  \
        fprintf(stderr, "\n");                                                                         \
        check_skipped_++;                                                                              \
        return;                                                                                        \
    } while (0)

#define RUN(fn)                                                                                        \
    do {                                                                                               \
        int before_ = check_failures_;                                                                 \
        check_current_ = #fn;                                                                          \
        check_tests_run_++;                                                                            \
        fn();                                                                                          \
        if (check_failures_ != before_) {                                                              \
            check_tests_failed_++;                                                                     \
            fprintf(stderr, "FAIL %s\n", #fn);                                                         \
        } else if (getenv("CHECK_VERBOSE")) {                                                          \
            fprintf(stderr, "ok   %s\n", #fn);                                                         \
        }                                                                                              \
    } while (0)

static inline int check_done(void)
{
    fprintf(stderr, "%d tests, %d failed, %d skipped\n", check_tests_run_, check_tests_failed_, check_skipped_);
    if (check_failures_) return 1;
    if (check_skipped_ && check_skipped_ == check_tests_run_) return 77;
    return 0;
}

static inline const char *fixture_path(const char *rel)
{
    static char buf[8][1024];
    static int slot;
    const char *root = getenv("STRATA_FIXTURES");
    if (!root || !*root) root = "build/fixtures";
    char *b = buf[slot++ & 7];
    snprintf(b, sizeof(buf[0]), "%s/%s", root, rel);
    return b;
}

#endif

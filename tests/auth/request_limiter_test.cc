// Unit tests of the per-tenant request limiter (token bucket + in-flight bound) with a fake clock.
#include "server/auth/request_limiter.h"

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/common/retry_hint.h"

namespace deltaserve {
namespace auth {
namespace {

using ::testing::HasSubstr;

// A clock that moves only when told to.
class FakeClock {
 public:
  absl::Time Now() const {
    absl::MutexLock lock(&mu_);
    return now_;
  }
  void Advance(absl::Duration d) {
    absl::MutexLock lock(&mu_);
    now_ += d;
  }
  std::function<absl::Time()> AsFunction() {
    return [this] { return Now(); };
  }

 private:
  mutable absl::Mutex mu_;
  absl::Time now_ ABSL_GUARDED_BY(mu_) = absl::FromUnixSeconds(1'800'000'000);
};

TenantQuota Quota(double rps, double burst, int64_t max_concurrent = 0) {
  TenantQuota quota;
  quota.requests_per_second = rps;
  quota.burst = burst;
  quota.max_concurrent_requests = max_concurrent;
  return quota;
}

class RequestLimiterTest : public ::testing::Test {
 protected:
  RequestLimiter::Options Opts() {
    RequestLimiter::Options options;
    options.now = clock_.AsFunction();
    return options;
  }
  FakeClock clock_;
};

TEST_F(RequestLimiterTest, AdmitsTheBurstThenRefusesWithTheTimeToTheNextToken) {
  RequestLimiter limiter(Opts());
  const TenantQuota quota = Quota(/*rps=*/50, /*burst=*/100);
  for (int i = 0; i < 100; ++i) {
    ASSERT_TRUE(limiter.Admit("acme", quota).ok()) << i;
  }
  absl::StatusOr<RequestLimiter::Admission> refused = limiter.Admit("acme", quota);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(refused.status().message(),
              HasSubstr("tenant \"acme\" is over its request rate of 50/s (burst 100); retry in 20 ms"));
  std::optional<absl::Duration> hint = GetRetryAfter(refused.status());
  ASSERT_TRUE(hint.has_value());
  EXPECT_EQ(*hint, absl::Milliseconds(20));
}

TEST_F(RequestLimiterTest, RetryHintCountsTheTokenAlreadyRefilled) {
  RequestLimiter limiter(Opts());
  const TenantQuota quota = Quota(/*rps=*/10, /*burst=*/1);
  ASSERT_TRUE(limiter.Admit("acme", quota).ok());
  clock_.Advance(absl::Milliseconds(30));  // 0.3 of a token back; 70 ms to go
  absl::StatusOr<RequestLimiter::Admission> refused = limiter.Admit("acme", quota);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(GetRetryAfter(refused.status()), absl::Milliseconds(70));
}

TEST_F(RequestLimiterTest, RetryHintRoundsUpToWholeMilliseconds) {
  RequestLimiter limiter(Opts());
  const TenantQuota quota = Quota(/*rps=*/3, /*burst=*/0);  // capacity max(1, 3) = 3
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(limiter.Admit("acme", quota).ok());
  absl::StatusOr<RequestLimiter::Admission> refused = limiter.Admit("acme", quota);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(GetRetryAfter(refused.status()), absl::Milliseconds(334));  // 333.33 ms
  EXPECT_THAT(refused.status().message(), HasSubstr("3/s (burst 3)"));
}

TEST_F(RequestLimiterTest, FormatsFractionalRatesReadably) {
  RequestLimiter limiter(Opts());
  const TenantQuota quota = Quota(/*rps=*/0.5, /*burst=*/0);  // capacity max(1, 0.5) = 1
  ASSERT_TRUE(limiter.Admit("acme", quota).ok());
  absl::StatusOr<RequestLimiter::Admission> refused = limiter.Admit("acme", quota);
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(refused.status().message(), HasSubstr("request rate of 0.5/s (burst 1); retry in 2s"));
  EXPECT_EQ(GetRetryAfter(refused.status()), absl::Seconds(2));
}

TEST_F(RequestLimiterTest, RefillsOverTime) {
  RequestLimiter limiter(Opts());
  const TenantQuota quota = Quota(/*rps=*/50, /*burst=*/100);
  for (int i = 0; i < 100; ++i) ASSERT_TRUE(limiter.Admit("acme", quota).ok());
  ASSERT_FALSE(limiter.Admit("acme", quota).ok());

  clock_.Advance(absl::Milliseconds(20));  // exactly one token
  EXPECT_TRUE(limiter.Admit("acme", quota).ok());
  EXPECT_FALSE(limiter.Admit("acme", quota).ok());

  clock_.Advance(absl::Milliseconds(100));  // five tokens
  for (int i = 0; i < 5; ++i) EXPECT_TRUE(limiter.Admit("acme", quota).ok()) << i;
  EXPECT_FALSE(limiter.Admit("acme", quota).ok());

  clock_.Advance(absl::Hours(1));  // refills to the burst, not beyond
  for (int i = 0; i < 100; ++i) ASSERT_TRUE(limiter.Admit("acme", quota).ok()) << i;
  EXPECT_FALSE(limiter.Admit("acme", quota).ok());
}

TEST_F(RequestLimiterTest, ZeroRateMeansUnlimited) {
  RequestLimiter limiter(Opts());
  const TenantQuota quota = Quota(/*rps=*/0, /*burst=*/0);
  for (int i = 0; i < 10000; ++i) ASSERT_TRUE(limiter.Admit("acme", quota).ok()) << i;
}

TEST_F(RequestLimiterTest, ZeroRateStillBoundsCallsInFlight) {
  RequestLimiter limiter(Opts());
  const TenantQuota quota = Quota(/*rps=*/0, /*burst=*/0, /*max_concurrent=*/2);
  absl::StatusOr<RequestLimiter::Admission> a = limiter.Admit("acme", quota);
  absl::StatusOr<RequestLimiter::Admission> b = limiter.Admit("acme", quota);
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(limiter.InFlight("acme"), 2);
  EXPECT_EQ(limiter.Admit("acme", quota).status().code(), absl::StatusCode::kResourceExhausted);
}

TEST_F(RequestLimiterTest, ConcurrencyLimitRefusesAndFreesTheSlotWhenTheAdmissionIsDestroyed) {
  RequestLimiter::Options options = Opts();
  options.concurrency_retry_after = absl::Milliseconds(250);
  RequestLimiter limiter(options);
  const TenantQuota quota = Quota(/*rps=*/1000, /*burst=*/1000, /*max_concurrent=*/3);
  std::vector<RequestLimiter::Admission> held;
  for (int i = 0; i < 3; ++i) {
    absl::StatusOr<RequestLimiter::Admission> admission = limiter.Admit("acme", quota);
    ASSERT_TRUE(admission.ok()) << admission.status();
    held.push_back(std::move(*admission));
  }
  EXPECT_EQ(limiter.InFlight("acme"), 3);

  absl::StatusOr<RequestLimiter::Admission> refused = limiter.Admit("acme", quota);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(refused.status().message(),
              HasSubstr("tenant \"acme\" has 3 requests in flight, its limit; retry when one finishes"));
  EXPECT_EQ(GetRetryAfter(refused.status()), absl::Milliseconds(250));
  EXPECT_EQ(limiter.InFlight("acme"), 3);

  held.pop_back();
  EXPECT_EQ(limiter.InFlight("acme"), 2);
  EXPECT_TRUE(limiter.Admit("acme", quota).ok());  // admitted, and released at once
  held.clear();
  EXPECT_EQ(limiter.InFlight("acme"), 0);
}

TEST_F(RequestLimiterTest, ConcurrencyRefusalTakesNoToken) {
  RequestLimiter limiter(Opts());
  const TenantQuota quota = Quota(/*rps=*/1, /*burst=*/2, /*max_concurrent=*/1);
  absl::StatusOr<RequestLimiter::Admission> first = limiter.Admit("acme", quota);
  ASSERT_TRUE(first.ok());
  for (int i = 0; i < 5; ++i) {
    EXPECT_THAT(limiter.Admit("acme", quota).status().message(), HasSubstr("in flight")) << i;
  }
  *first = RequestLimiter::Admission();  // releases
  // The second token is still there.
  EXPECT_TRUE(limiter.Admit("acme", quota).ok());
}

TEST_F(RequestLimiterTest, MovedAdmissionReleasesExactlyOnce) {
  RequestLimiter limiter(Opts());
  const TenantQuota quota = Quota(/*rps=*/0, /*burst=*/0, /*max_concurrent=*/2);
  absl::StatusOr<RequestLimiter::Admission> a = limiter.Admit("acme", quota);
  absl::StatusOr<RequestLimiter::Admission> b = limiter.Admit("acme", quota);
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(b.ok());
  {
    RequestLimiter::Admission moved(std::move(*a));  // a is now empty
    EXPECT_EQ(limiter.InFlight("acme"), 2);
    RequestLimiter::Admission assigned;
    assigned = std::move(moved);
    EXPECT_EQ(limiter.InFlight("acme"), 2);
    RequestLimiter::Admission& alias = assigned;
    assigned = std::move(alias);  // a self-move keeps the slot
    EXPECT_EQ(limiter.InFlight("acme"), 2);
  }
  EXPECT_EQ(limiter.InFlight("acme"), 1);
  // Assigning over a held admission releases the old slot and takes the new one.
  absl::StatusOr<RequestLimiter::Admission> c = limiter.Admit("acme", quota);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(limiter.InFlight("acme"), 2);
  *b = std::move(*c);
  EXPECT_EQ(limiter.InFlight("acme"), 1);
  a = absl::StatusOr<RequestLimiter::Admission>();  // destroying moved-from admissions releases nothing
  c = absl::StatusOr<RequestLimiter::Admission>();
  EXPECT_EQ(limiter.InFlight("acme"), 1);
  b = absl::StatusOr<RequestLimiter::Admission>();
  EXPECT_EQ(limiter.InFlight("acme"), 0);
}

TEST_F(RequestLimiterTest, TenantsAreIndependent) {
  RequestLimiter limiter(Opts());
  const TenantQuota quota = Quota(/*rps=*/1, /*burst=*/2, /*max_concurrent=*/5);
  ASSERT_TRUE(limiter.Admit("acme", quota).ok());
  ASSERT_TRUE(limiter.Admit("acme", quota).ok());
  EXPECT_FALSE(limiter.Admit("acme", quota).ok());
  absl::StatusOr<RequestLimiter::Admission> other = limiter.Admit("globex", quota);
  EXPECT_TRUE(other.ok());
  EXPECT_TRUE(limiter.Admit("globex", quota).ok());
  EXPECT_EQ(limiter.InFlight("globex"), 1);
  EXPECT_EQ(limiter.InFlight("acme"), 0);
  EXPECT_EQ(limiter.InFlight("nobody"), 0);
}

TEST_F(RequestLimiterTest, LoweredBurstClampsTheBucket) {
  RequestLimiter limiter(Opts());
  ASSERT_TRUE(limiter.Admit("acme", Quota(/*rps=*/1, /*burst=*/100)).ok());  // 99 tokens left
  const TenantQuota lowered = Quota(/*rps=*/1, /*burst=*/3);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(limiter.Admit("acme", lowered).ok()) << i;
  absl::StatusOr<RequestLimiter::Admission> refused = limiter.Admit("acme", lowered);
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(refused.status().message(), HasSubstr("(burst 3)"));
  EXPECT_EQ(GetRetryAfter(refused.status()), absl::Seconds(1));
  // The refill stops at the new burst.
  clock_.Advance(absl::Hours(1));
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(limiter.Admit("acme", lowered).ok()) << i;
  EXPECT_FALSE(limiter.Admit("acme", lowered).ok());
}

TEST_F(RequestLimiterTest, RateLimitAddedToAnUnlimitedTenantStartsWithAFullBucket) {
  RequestLimiter limiter(Opts());
  for (int i = 0; i < 50; ++i) ASSERT_TRUE(limiter.Admit("acme", Quota(0, 0)).ok());
  const TenantQuota limited = Quota(/*rps=*/1, /*burst=*/4);
  for (int i = 0; i < 4; ++i) EXPECT_TRUE(limiter.Admit("acme", limited).ok()) << i;
  EXPECT_FALSE(limiter.Admit("acme", limited).ok());
}

TEST_F(RequestLimiterTest, DoesNotForgetATenantWhoseBucketIsNotFull) {
  RequestLimiter::Options options = Opts();
  options.forget_after = absl::Minutes(10);
  RequestLimiter limiter(options);
  const TenantQuota slow = Quota(/*rps=*/0.001, /*burst=*/1);  // one token per 1000 s
  ASSERT_TRUE(limiter.Admit("acme", slow).ok());
  clock_.Advance(absl::Minutes(15));
  ASSERT_TRUE(limiter.Admit("globex", slow).ok());  // runs the sweep
  absl::StatusOr<RequestLimiter::Admission> refused = limiter.Admit("acme", slow);
  ASSERT_FALSE(refused.ok());  // still empty-ish: 100 s to go
  EXPECT_EQ(GetRetryAfter(refused.status()), absl::Seconds(100));
}

TEST_F(RequestLimiterTest, DoesNotForgetATenantWithCallsInFlight) {
  RequestLimiter limiter(Opts());
  const TenantQuota quota = Quota(/*rps=*/0, /*burst=*/0, /*max_concurrent=*/1);
  absl::StatusOr<RequestLimiter::Admission> held = limiter.Admit("acme", quota);
  ASSERT_TRUE(held.ok());
  clock_.Advance(absl::Hours(2));
  ASSERT_TRUE(limiter.Admit("globex", quota).ok());  // runs the sweep
  EXPECT_EQ(limiter.InFlight("acme"), 1);
  EXPECT_FALSE(limiter.Admit("acme", quota).ok());
  held = absl::StatusOr<RequestLimiter::Admission>();
  EXPECT_EQ(limiter.InFlight("acme"), 0);
}

TEST_F(RequestLimiterTest, ForgottenTenantComesBackWithAFullBucket) {
  RequestLimiter limiter(Opts());
  const TenantQuota quota = Quota(/*rps=*/10, /*burst=*/5);
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(limiter.Admit("acme", quota).ok());
  clock_.Advance(absl::Hours(1));
  ASSERT_TRUE(limiter.Admit("globex", quota).ok());  // sweeps acme away
  for (int i = 0; i < 5; ++i) EXPECT_TRUE(limiter.Admit("acme", quota).ok()) << i;
  EXPECT_FALSE(limiter.Admit("acme", quota).ok());
  EXPECT_EQ(limiter.InFlight("acme"), 0);
}

TEST_F(RequestLimiterTest, ConcurrentAdmissionsNeverExceedTheLimit) {
  RequestLimiter limiter(RequestLimiter::Options{});  // the real clock; no timing assertions
  constexpr int kLimit = 4;
  constexpr int kThreads = 8;
  constexpr int kIterations = 2000;
  const TenantQuota quota = Quota(/*rps=*/0, /*burst=*/0, /*max_concurrent=*/kLimit);
  std::atomic<int> inside{0};
  std::atomic<int> max_inside{0};
  std::atomic<int> admitted{0};
  std::atomic<int> refused_other{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      const std::string tenant = "acme";
      for (int i = 0; i < kIterations; ++i) {
        absl::StatusOr<RequestLimiter::Admission> admission = limiter.Admit(tenant, quota);
        if (!admission.ok()) {
          if (admission.status().code() != absl::StatusCode::kResourceExhausted) ++refused_other;
          continue;
        }
        const int now_inside = ++inside;
        int seen = max_inside.load();
        while (now_inside > seen && !max_inside.compare_exchange_weak(seen, now_inside)) {
        }
        if (limiter.InFlight(tenant) > kLimit) ++refused_other;
        std::this_thread::yield();
        --inside;  // before the admission releases its slot
        ++admitted;
        if (i % 3 == 0) {
          RequestLimiter::Admission moved = std::move(*admission);  // released by the move target
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_LE(max_inside.load(), kLimit);
  EXPECT_GT(admitted.load(), 0);
  EXPECT_EQ(refused_other.load(), 0);
  EXPECT_EQ(limiter.InFlight("acme"), 0);
}

}  // namespace
}  // namespace auth
}  // namespace deltaserve

// RequestLimiter: per-tenant admission of calls — a token bucket on the request rate and a bound on the calls in
// flight (TenantQuota::requests_per_second, burst, max_concurrent_requests). Refusals are RESOURCE_EXHAUSTED with
// a retry hint (server/common/retry_hint.h: the time until the bucket holds a token again; for concurrency, a
// short fixed delay) and a message naming the limit.
//
// Owns one bucket and one in-flight count per tenant seen (tenants idle for `forget_after` are dropped, so the
// map stays small). Thread-safe. The clock is injectable for tests.
#ifndef DELTASERVE_SERVER_AUTH_REQUEST_LIMITER_H_
#define DELTASERVE_SERVER_AUTH_REQUEST_LIMITER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/auth/tenants.h"

namespace deltaserve {
namespace auth {

class RequestLimiter {
 public:
  struct Options {
    // The clock; nullptr = absl::Now.
    std::function<absl::Time()> now = nullptr;
    // The retry hint when the concurrency bound refuses a call.
    absl::Duration concurrency_retry_after = absl::Milliseconds(100);
    // A tenant with nothing in flight and a full bucket for this long is forgotten.
    absl::Duration forget_after = absl::Minutes(10);
  };

  // One admitted call: holds its in-flight slot until destroyed. Movable.
  class Admission {
   public:
    Admission() = default;
    Admission(Admission&& other) noexcept;
    Admission& operator=(Admission&& other) noexcept;
    ~Admission();

   private:
    friend class RequestLimiter;
    Admission(RequestLimiter* limiter, std::string tenant) : limiter_(limiter), tenant_(std::move(tenant)) {}
    RequestLimiter* limiter_ = nullptr;
    std::string tenant_;
  };

  explicit RequestLimiter(Options options);

  // Admits one call of `tenant` under `quota` (a call that is refused takes no token and no slot). Errors:
  // RESOURCE_EXHAUSTED "tenant \"acme\" is over its request rate of 50/s (burst 100); retry in 20 ms" or
  // "... has 8 requests in flight, its limit; retry when one finishes", each with a retry hint.
  absl::StatusOr<Admission> Admit(const std::string& tenant, const TenantQuota& quota);

  // Calls of `tenant` in flight now (for tests and metrics).
  int64_t InFlight(const std::string& tenant) const;

 private:
  struct State {
    double tokens = 0;
    absl::Time refilled;
    int64_t in_flight = 0;
    bool initialized = false;
    // The bucket's size and refill rate at the last Admit (0 = no rate limit), for refills and the idle sweep.
    double capacity = 1;
    double rate = 0;
  };
  void Release(const std::string& tenant);
  // Drops the tenants idle (nothing in flight, a full bucket) for options_.forget_after.
  void SweepLocked(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Time Now() const;

  const Options options_;
  mutable absl::Mutex mu_;
  std::map<std::string, State> states_ ABSL_GUARDED_BY(mu_);
  absl::Time last_sweep_ ABSL_GUARDED_BY(mu_);
};

}  // namespace auth
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_AUTH_REQUEST_LIMITER_H_

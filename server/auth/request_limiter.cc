#include "server/auth/request_limiter.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "server/common/retry_hint.h"

namespace deltaserve {
namespace auth {
namespace {

// The forgotten-tenant sweep runs at most this often (inside Admit).
constexpr absl::Duration kSweepInterval = absl::Minutes(1);
// Tolerance for floating-point refills: a bucket this close to one token holds one.
constexpr double kTokenEpsilon = 1e-9;

// "50", "0.5", "2.25": whole numbers without a fraction, others with up to 6 significant digits.
std::string FormatNumber(double value) {
  if (std::isfinite(value) && std::abs(value) < 1e15 && value == std::floor(value)) {
    return absl::StrCat(static_cast<int64_t>(value));
  }
  return absl::StrFormat("%.6g", value);
}

// "20 ms" below a second, absl's form ("1.5s", "1h") above.
std::string FormatDelay(absl::Duration delay) {
  if (delay < absl::Seconds(1)) return absl::StrCat(absl::ToInt64Milliseconds(delay), " ms");
  return absl::FormatDuration(delay);
}

}  // namespace

RequestLimiter::Admission::Admission(Admission&& other) noexcept
    : limiter_(std::exchange(other.limiter_, nullptr)), tenant_(std::move(other.tenant_)) {}

RequestLimiter::Admission& RequestLimiter::Admission::operator=(Admission&& other) noexcept {
  if (this != &other) {
    if (limiter_ != nullptr) limiter_->Release(tenant_);
    limiter_ = std::exchange(other.limiter_, nullptr);
    tenant_ = std::move(other.tenant_);
  }
  return *this;
}

RequestLimiter::Admission::~Admission() {
  if (limiter_ != nullptr) limiter_->Release(tenant_);
}

RequestLimiter::RequestLimiter(Options options) : options_(std::move(options)) {
  absl::MutexLock lock(&mu_);
  last_sweep_ = Now();
}

absl::Time RequestLimiter::Now() const { return options_.now ? options_.now() : absl::Now(); }

absl::StatusOr<RequestLimiter::Admission> RequestLimiter::Admit(const std::string& tenant,
                                                                const TenantQuota& quota) {
  const absl::Time now = Now();
  const double rate = std::max(0.0, quota.requests_per_second);  // NaN -> 0 too
  const double capacity = quota.burst > 0 ? quota.burst : std::max(1.0, rate);
  {
    absl::MutexLock lock(&mu_);
    if (now - last_sweep_ >= kSweepInterval) SweepLocked(now);

    State& state = states_[tenant];
    if (!state.initialized || state.rate <= 0) {
      // A new tenant, or one that had no rate limit until now: a full bucket.
      state.tokens = capacity;
      state.refilled = now;
      state.initialized = true;
    } else if (now > state.refilled) {
      // Refill under the quota in force since the last call, then fit the bucket to the current one (a reload
      // may have lowered the burst).
      state.tokens =
          std::min(state.capacity, state.tokens + state.rate * absl::ToDoubleSeconds(now - state.refilled));
    }
    state.tokens = std::min(state.tokens, capacity);
    state.refilled = std::max(state.refilled, now);
    state.capacity = capacity;
    state.rate = rate;

    if (quota.max_concurrent_requests > 0 && state.in_flight >= quota.max_concurrent_requests) {
      absl::Status status = absl::ResourceExhaustedError(
          absl::StrCat("tenant \"", tenant, "\" has ", state.in_flight,
                       " requests in flight, its limit; retry when one finishes"));
      SetRetryAfter(status, options_.concurrency_retry_after);
      return status;
    }
    if (rate > 0) {
      if (state.tokens < 1 - kTokenEpsilon) {
        // The exact wait for one token, rounded up to whole milliseconds (the tolerance keeps 20.0000001 ms at 20).
        const double wait_ms = std::min(1e15, (1 - state.tokens) / rate * 1000);
        const absl::Duration wait =
            absl::Milliseconds(std::max<int64_t>(1, static_cast<int64_t>(std::ceil(wait_ms - 1e-6))));
        absl::Status status = absl::ResourceExhaustedError(
            absl::StrCat("tenant \"", tenant, "\" is over its request rate of ", FormatNumber(rate), "/s (burst ",
                         FormatNumber(capacity), "); retry in ", FormatDelay(wait)));
        SetRetryAfter(status, wait);
        return status;
      }
      state.tokens = std::max(0.0, state.tokens - 1);
    }
    ++state.in_flight;
  }
  // Built outside the lock: an Admission releases through mu_.
  return Admission(this, tenant);
}

int64_t RequestLimiter::InFlight(const std::string& tenant) const {
  absl::MutexLock lock(&mu_);
  auto it = states_.find(tenant);
  return it == states_.end() ? 0 : it->second.in_flight;
}

void RequestLimiter::Release(const std::string& tenant) {
  absl::MutexLock lock(&mu_);
  auto it = states_.find(tenant);
  // An in-flight tenant is never swept, so the entry is there; the checks only guard against misuse.
  if (it != states_.end() && it->second.in_flight > 0) --it->second.in_flight;
}

void RequestLimiter::SweepLocked(absl::Time now) {
  last_sweep_ = now;
  for (auto it = states_.begin(); it != states_.end();) {
    const State& state = it->second;
    // When the bucket became (or becomes) full; forgetting a tenant then loses nothing: it comes back full.
    absl::Time full_since = state.refilled;
    if (state.rate > 0 && state.tokens < state.capacity) {
      full_since += absl::Seconds((state.capacity - state.tokens) / state.rate);
    }
    if (state.in_flight == 0 && now - full_since >= options_.forget_after) {
      it = states_.erase(it);
    } else {
      ++it;
    }
  }
}

}  // namespace auth
}  // namespace deltaserve

// TieredCache (the delta cache's logic) with a fake loader: LRU order, pinned values never evicted, the budgets,
// single flight under N threads, failed loads not cached, the host tier sparing the store, and what the observer
// is told.
#include "server/deltas/delta_cache.h"

#include <atomic>
#include <map>
#include <random>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace deltaserve {
namespace deltas {
namespace {

using ::testing::UnorderedElementsAre;

struct FakePack {
  std::string key;
  int64_t bytes = 0;
  std::string loaded_from;  // "store" or "host"
};
struct FakeCopy {
  std::string key;
  int64_t bytes = 0;
};
using Cache = TieredCache<FakePack, FakeCopy>;

// Sizes come from `sizes` (default 10 bytes on the device, 4 in host memory); loads can be made to fail or to
// block until released; every call is counted.
class FakeLoader : public Cache::Loader {
 public:
  absl::StatusOr<std::shared_ptr<const FakePack>> LoadFromStore(const std::string& key) override {
    absl::Status failure;
    absl::Notification* gate = nullptr;
    {
      absl::MutexLock lock(&mu_);
      ++store_calls_[key];
      failure = failure_;
      auto g = gates_.find(key);
      if (g != gates_.end()) gate = g->second;
    }
    if (gate != nullptr) gate->WaitForNotification();
    if (!failure.ok()) return failure;
    return std::make_shared<const FakePack>(FakePack{key, DeviceSize(key), "store"});
  }
  absl::StatusOr<std::shared_ptr<const FakePack>> LoadFromHost(const std::string& key, const FakeCopy& copy) override {
    absl::MutexLock lock(&mu_);
    ++host_calls_[key];
    EXPECT_EQ(copy.key, key);
    return std::make_shared<const FakePack>(FakePack{key, DeviceSize(key), "host"});
  }
  std::shared_ptr<const FakeCopy> MakeHostCopy(const FakePack& pack) override {
    return std::make_shared<const FakeCopy>(FakeCopy{pack.key, HostSize(pack.key)});
  }
  int64_t DeviceBytes(const FakePack& pack) const override { return pack.bytes; }
  int64_t HostBytes(const FakeCopy& copy) const override { return copy.bytes; }

  void SetSize(const std::string& key, int64_t device, int64_t host) {
    absl::MutexLock lock(&mu_);
    sizes_[key] = {device, host};
  }
  void Fail(absl::Status status) {
    absl::MutexLock lock(&mu_);
    failure_ = std::move(status);
  }
  // Store loads of `key` block until `gate` is notified (nullptr = no longer).
  void Gate(const std::string& key, absl::Notification* gate) {
    absl::MutexLock lock(&mu_);
    if (gate == nullptr) {
      gates_.erase(key);
    } else {
      gates_[key] = gate;
    }
  }
  int store_calls(const std::string& key) const {
    absl::MutexLock lock(&mu_);
    auto it = store_calls_.find(key);
    return it == store_calls_.end() ? 0 : it->second;
  }
  int host_calls(const std::string& key) const {
    absl::MutexLock lock(&mu_);
    auto it = host_calls_.find(key);
    return it == host_calls_.end() ? 0 : it->second;
  }

 private:
  int64_t DeviceSize(const std::string& key) {
    absl::MutexLock lock(&sizes_mu_);
    return SizeLocked(key).first;
  }
  int64_t HostSize(const std::string& key) {
    absl::MutexLock lock(&sizes_mu_);
    return SizeLocked(key).second;
  }
  std::pair<int64_t, int64_t> SizeLocked(const std::string& key) {
    auto it = sizes_.find(key);
    return it == sizes_.end() ? std::make_pair(int64_t{10}, int64_t{4}) : it->second;
  }

  mutable absl::Mutex mu_;
  std::map<std::string, int> store_calls_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int> host_calls_ ABSL_GUARDED_BY(mu_);
  absl::Status failure_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, absl::Notification*> gates_ ABSL_GUARDED_BY(mu_);
  // Read by MakeHostCopy under the cache's lock: a lock of its own, never held while calling the cache.
  absl::Mutex sizes_mu_;
  std::map<std::string, std::pair<int64_t, int64_t>> sizes_;  // written before the cache runs
};

class CountingObserver : public DeltaCacheObserver {
 public:
  void OnCacheLookup(CacheTier tier) override { ++lookups[static_cast<int>(tier)]; }
  void OnCacheLoad(CacheTier source, bool ok, absl::Duration) override {
    ++(ok ? loads_ok : loads_failed)[static_cast<int>(source)];
  }
  void OnCacheEviction(CacheTier tier) override { ++evictions[static_cast<int>(tier)]; }
  void OnCacheResidency(CacheTier tier, int64_t bytes, int64_t entries) override {
    resident_bytes[static_cast<int>(tier)] = bytes;
    resident_entries[static_cast<int>(tier)] = entries;
  }
  std::atomic<int> lookups[kNumCacheTiers] = {}, loads_ok[kNumCacheTiers] = {}, loads_failed[kNumCacheTiers] = {},
                   evictions[kNumCacheTiers] = {};
  std::atomic<int64_t> resident_bytes[kNumCacheTiers] = {}, resident_entries[kNumCacheTiers] = {};
};

Cache::Options Budget(int64_t device, int64_t host = 1000) {
  Cache::Options o;
  o.device_bytes = device;
  o.host_bytes = host;
  return o;
}

// Get(key), EXPECTing success; the value is dropped at once (unpinned).
void Touch(Cache& cache, const std::string& key) {
  auto r = cache.Get(key);
  EXPECT_TRUE(r.ok()) << key << ": " << r.status();
}

std::vector<std::string> DeviceKeys(const Cache& cache, const std::vector<std::string>& keys) {
  std::vector<std::string> out;
  for (const std::string& k : keys) {
    if (cache.Where(k) == CacheTier::kDevice) out.push_back(k);
  }
  return out;
}

TEST(DeltaCacheTest, AHitReturnsTheLoadedValueWithoutLoadingAgain) {
  FakeLoader loader;
  Cache cache(&loader, Budget(100));
  auto first = cache.Get("a");
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(first->tier, CacheTier::kStore);
  EXPECT_FALSE(first->waited);
  auto second = cache.Get("a");
  ASSERT_TRUE(second.ok());
  EXPECT_EQ(second->tier, CacheTier::kDevice);
  EXPECT_EQ(second->value, first->value);
  EXPECT_EQ(second->load_time, absl::ZeroDuration());
  EXPECT_EQ(loader.store_calls("a"), 1);
  const CacheStats s = cache.stats();
  EXPECT_EQ(s.lookups[0], 1);
  EXPECT_EQ(s.lookups[2], 1);
  EXPECT_EQ(s.loads_ok[2], 1);
  EXPECT_EQ(s.device_bytes, 10);
  EXPECT_EQ(s.device_entries, 1);
  EXPECT_EQ(s.pinned_entries, 1);  // `first` and `second` hold it
}

TEST(DeltaCacheTest, EvictsLeastRecentlyUsedUnpinnedPack) {
  FakeLoader loader;
  Cache cache(&loader, Budget(30));
  for (const char* k : {"a", "b", "c"}) Touch(cache, k);
  Touch(cache, "a");  // b is now the least recently used
  Touch(cache, "d");
  EXPECT_THAT(DeviceKeys(cache, {"a", "b", "c", "d"}), UnorderedElementsAre("a", "c", "d"));
  EXPECT_EQ(cache.Where("b"), CacheTier::kHost);
  Touch(cache, "e");  // then c
  EXPECT_THAT(DeviceKeys(cache, {"a", "b", "c", "d", "e"}), UnorderedElementsAre("a", "d", "e"));
  EXPECT_EQ(cache.stats().evictions[0], 2);
  EXPECT_EQ(cache.stats().device_bytes, 30);
}

TEST(DeltaCacheTest, NeverEvictsAPinnedPackAndEvictsItOnceUnpinned) {
  FakeLoader loader;
  Cache cache(&loader, Budget(20));
  auto a = cache.Get("a");  // held: pinned
  ASSERT_TRUE(a.ok());
  Touch(cache, "b");
  Touch(cache, "c");  // over budget: b goes, a (older, but pinned) stays
  EXPECT_THAT(DeviceKeys(cache, {"a", "b", "c"}), UnorderedElementsAre("a", "c"));
  auto c = cache.Get("c");
  auto d = cache.Get("d");  // a, c, d all pinned: tier 1 goes over budget rather than evict any
  ASSERT_TRUE(c.ok() && d.ok());
  EXPECT_THAT(DeviceKeys(cache, {"a", "b", "c", "d"}), UnorderedElementsAre("a", "c", "d"));
  CacheStats s = cache.stats();
  EXPECT_EQ(s.device_bytes, 30);
  EXPECT_EQ(s.pinned_entries, 3);
  a = absl::InternalError("released");
  c = absl::InternalError("released");
  cache.Trim();  // a is the least recently used unpinned value: out it goes, and tier 1 is within budget
  EXPECT_THAT(DeviceKeys(cache, {"a", "b", "c", "d"}), UnorderedElementsAre("c", "d"));
  EXPECT_EQ(cache.stats().device_bytes, 20);
  // A copy of the pointer pins as well as the Get result does.
  const std::shared_ptr<const FakePack> held = d->value;
  d = absl::InternalError("released");
  Touch(cache, "e");
  Touch(cache, "f");
  EXPECT_THAT(DeviceKeys(cache, {"c", "d", "e", "f"}), UnorderedElementsAre("d", "f"));
}

TEST(DeltaCacheTest, AValueLargerThanTheBudgetServesItsCallerAndLeavesWhenUnpinned) {
  FakeLoader loader;
  loader.SetSize("big", 500, 50);
  Cache cache(&loader, Budget(100));
  Touch(cache, "small");
  {
    auto big = cache.Get("big");
    ASSERT_TRUE(big.ok());
    EXPECT_EQ(big->value->bytes, 500);
    EXPECT_EQ(cache.Where("small"), CacheTier::kHost);  // evicted to make room (in vain)
    EXPECT_EQ(cache.Where("big"), CacheTier::kDevice);
  }
  Touch(cache, "small");  // the next lookup evicts the unpinned big value
  EXPECT_EQ(cache.Where("big"), CacheTier::kHost);
  EXPECT_LE(cache.stats().device_bytes, 100);
}

TEST(DeltaCacheTest, StaysWithinBothBudgetsOverRandomTraffic) {
  FakeLoader loader;
  std::mt19937 rng(7);
  for (int i = 0; i < 40; ++i) {
    loader.SetSize("k" + std::to_string(i), 1 + static_cast<int64_t>(rng() % 30), 1 + static_cast<int64_t>(rng() % 10));
  }
  Cache cache(&loader, Budget(100, 40));
  for (int step = 0; step < 2000; ++step) {
    const std::string key = "k" + std::to_string(rng() % 40);
    auto r = cache.Get(key);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->value->key, key);
    const CacheStats s = cache.stats();
    // Only the value just returned is pinned: tier 1 exceeds its budget by at most that value.
    EXPECT_LE(s.device_bytes, 100 + r->value->bytes);
    EXPECT_LE(s.host_bytes, 40);
  }
  cache.Trim();
  EXPECT_LE(cache.stats().device_bytes, 100);
}

TEST(DeltaCacheTest, ConcurrentMissesOnOneKeyCauseOneLoad) {
  FakeLoader loader;
  Cache cache(&loader, Budget(100));
  absl::Notification release;
  loader.Gate("a", &release);
  constexpr int kThreads = 16;
  std::vector<absl::StatusOr<Cache::Result>> results(kThreads, absl::UnknownError("not run"));
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) threads.emplace_back([&, i] { results[i] = cache.Get("a"); });
  // Every thread is either the loader (blocked in the gate) or waiting for its load.
  while (cache.stats().waits < kThreads - 1) absl::SleepFor(absl::Milliseconds(1));
  EXPECT_EQ(cache.stats().loads_in_flight, 1);
  release.Notify();
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(loader.store_calls("a"), 1);
  int waited = 0;
  for (const auto& r : results) {
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->value, results[0]->value);
    EXPECT_EQ(r->tier, CacheTier::kStore);
    waited += r->waited ? 1 : 0;
  }
  EXPECT_EQ(waited, kThreads - 1);
  EXPECT_EQ(cache.stats().lookups[2], kThreads);
  EXPECT_EQ(cache.stats().loads_ok[2], 1);
}

TEST(DeltaCacheTest, AFailedLoadFailsEveryWaiterAlikeAndIsNotCached) {
  FakeLoader loader;
  Cache cache(&loader, Budget(100));
  absl::Notification release;
  loader.Gate("a", &release);
  loader.Fail(absl::UnavailableError("the store is down"));
  constexpr int kThreads = 8;
  std::vector<absl::Status> statuses(kThreads);
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) threads.emplace_back([&, i] { statuses[i] = cache.Get("a").status(); });
  while (cache.stats().waits < kThreads - 1) absl::SleepFor(absl::Milliseconds(1));
  release.Notify();
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(loader.store_calls("a"), 1);
  for (const absl::Status& s : statuses) EXPECT_EQ(s, absl::UnavailableError("the store is down"));
  EXPECT_EQ(cache.Where("a"), std::nullopt);
  EXPECT_EQ(cache.stats().loads_failed[2], 1);
  EXPECT_EQ(cache.stats().loads_in_flight, 0);
  // The next lookup tries again.
  loader.Gate("a", nullptr);
  loader.Fail(absl::OkStatus());
  auto r = cache.Get("a");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->tier, CacheTier::kStore);
  EXPECT_EQ(loader.store_calls("a"), 2);
}

TEST(DeltaCacheTest, ALoadDoesNotBlockOtherKeys) {
  FakeLoader loader;
  Cache cache(&loader, Budget(100));
  Touch(cache, "hot");
  absl::Notification release;
  loader.Gate("slow", &release);
  std::thread slow([&] { Touch(cache, "slow"); });
  while (cache.stats().loads_in_flight < 1) absl::SleepFor(absl::Milliseconds(1));
  // While "slow" is stuck in its load: a hit and another key's load both complete.
  auto hot = cache.Get("hot");
  ASSERT_TRUE(hot.ok());
  EXPECT_EQ(hot->tier, CacheTier::kDevice);
  auto other = cache.Get("other");
  ASSERT_TRUE(other.ok());
  EXPECT_EQ(other->tier, CacheTier::kStore);
  EXPECT_EQ(cache.stats().loads_in_flight, 1);
  release.Notify();
  slow.join();
}

TEST(DeltaCacheTest, AHostTierHitSkipsTheStore) {
  FakeLoader loader;
  Cache cache(&loader, Budget(10, 100));  // one value in tier 1
  Touch(cache, "a");
  Touch(cache, "b");  // a's copy goes to tier 2
  EXPECT_EQ(cache.Where("a"), CacheTier::kHost);
  EXPECT_EQ(cache.stats().host_bytes, 4);
  auto a = cache.Get("a");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->tier, CacheTier::kHost);
  EXPECT_EQ(a->value->loaded_from, "host");
  EXPECT_EQ(loader.store_calls("a"), 1);
  EXPECT_EQ(loader.host_calls("a"), 1);
  // Tiers are exclusive: a left tier 2 as it entered tier 1; b took its place there.
  EXPECT_EQ(cache.Where("a"), CacheTier::kDevice);
  EXPECT_EQ(cache.Where("b"), CacheTier::kHost);
  const CacheStats s = cache.stats();
  EXPECT_EQ(s.host_entries, 1);
  EXPECT_EQ(s.host_bytes, 4);
  EXPECT_EQ(s.lookups[1], 1);
  EXPECT_EQ(s.loads_ok[1], 1);
}

TEST(DeltaCacheTest, TheHostTierDropsItsLeastRecentlyUsedCopiesBeyondItsBudget) {
  FakeLoader loader;
  loader.SetSize("huge", 10, 1000);
  Cache cache(&loader, Budget(10, 8));  // two copies of 4 bytes in tier 2
  for (const char* k : {"a", "b", "c", "huge", "d"}) Touch(cache, k);
  // Evicted in order a, b, c, huge: a was dropped for c; huge never fits.
  EXPECT_EQ(cache.Where("a"), std::nullopt);
  EXPECT_EQ(cache.Where("b"), CacheTier::kHost);
  EXPECT_EQ(cache.Where("c"), CacheTier::kHost);
  EXPECT_EQ(cache.Where("huge"), std::nullopt);
  EXPECT_EQ(cache.stats().evictions[1], 1);
  Touch(cache, "a");
  EXPECT_EQ(loader.store_calls("a"), 2);
}

TEST(DeltaCacheTest, AZeroHostBudgetDisablesTheHostTier) {
  FakeLoader loader;
  Cache cache(&loader, Budget(10, 0));
  Touch(cache, "a");
  Touch(cache, "b");
  EXPECT_EQ(cache.Where("a"), std::nullopt);
  Touch(cache, "a");
  EXPECT_EQ(loader.store_calls("a"), 2);
  EXPECT_EQ(cache.stats().host_entries, 0);
}

TEST(DeltaCacheTest, OfferAddsAValueOnlyWhenItFitsWithoutEvicting) {
  FakeLoader loader;
  Cache cache(&loader, Budget(25));
  Touch(cache, "a");
  EXPECT_TRUE(cache.Offer("p", std::make_shared<const FakePack>(FakePack{"p", 10, "push"})));
  EXPECT_FALSE(cache.Offer("q", std::make_shared<const FakePack>(FakePack{"q", 10, "push"})));  // 30 > 25
  EXPECT_FALSE(cache.Offer("a", std::make_shared<const FakePack>(FakePack{"a", 1, "push"})));   // already there
  EXPECT_THAT(DeviceKeys(cache, {"a", "p", "q"}), UnorderedElementsAre("a", "p"));
  auto p = cache.Get("p");
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->tier, CacheTier::kDevice);
  EXPECT_EQ(p->value->loaded_from, "push");
  EXPECT_EQ(loader.store_calls("p"), 0);
}

TEST(DeltaCacheTest, TellsTheObserverWhatHappens) {
  FakeLoader loader;
  CountingObserver observer;
  Cache::Options options = Budget(10, 100);
  options.observer = &observer;
  Cache cache(&loader, options);
  Touch(cache, "a");  // store load
  Touch(cache, "a");  // hit
  Touch(cache, "b");  // store load, a evicted to host
  Touch(cache, "a");  // host load, b evicted to host
  loader.Fail(absl::NotFoundError("gone"));
  EXPECT_FALSE(cache.Get("c").ok());
  EXPECT_EQ(observer.lookups[0], 1);
  EXPECT_EQ(observer.lookups[1], 1);
  EXPECT_EQ(observer.lookups[2], 2);
  EXPECT_EQ(observer.loads_ok[2], 2);
  EXPECT_EQ(observer.loads_ok[1], 1);
  EXPECT_EQ(observer.loads_failed[2], 1);
  EXPECT_EQ(observer.evictions[0], 2);
  EXPECT_EQ(observer.resident_bytes[0], 10);
  EXPECT_EQ(observer.resident_entries[0], 1);
  EXPECT_EQ(observer.resident_bytes[1], 4);
  EXPECT_EQ(observer.resident_entries[1], 1);
}

TEST(DeltaCacheTest, ManyThreadsOverFewKeysGetTheRightValuesAndOneLoadPerResidency) {
  FakeLoader loader;
  Cache cache(&loader, Budget(50, 0));  // 5 of 12 keys resident; no host tier: every reload is a store load
  constexpr int kThreads = 8;
  std::atomic<int> wrong{0}, failed{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int i = 0; i < 500; ++i) {
        const std::string key = "k" + std::to_string(rng() % 12);
        auto r = cache.Get(key);
        if (!r.ok()) {
          ++failed;
        } else if (r->value->key != key) {
          ++wrong;
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(failed, 0);
  EXPECT_EQ(wrong, 0);
  const CacheStats s = cache.stats();
  int loads = 0;
  for (int i = 0; i < 12; ++i) loads += loader.store_calls("k" + std::to_string(i));
  // Each store load came from exactly one miss that did not wait, and every eviction was of a loaded value.
  EXPECT_EQ(loads, s.loads_ok[2]);
  EXPECT_EQ(s.lookups[0] + s.lookups[2], kThreads * 500);
  EXPECT_EQ(s.evictions[0], s.loads_ok[2] - s.device_entries);
  EXPECT_EQ(s.pinned_entries, 0);
  cache.Trim();
  EXPECT_LE(cache.stats().device_bytes, 50);
}

}  // namespace
}  // namespace deltas
}  // namespace deltaserve

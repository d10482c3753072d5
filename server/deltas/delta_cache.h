// TieredCache: the two-tier cache of loaded delta packs (DeltaManager's DeltaCache), written as a template over
// the cached value so that its logic is tested with fakes (tests/server/delta_cache_test.cc).
//
//   tier 1, "device": loaded values (packs bound to the model, tensors on its device), by key (a pack's digest),
//     under a byte budget (Options::device_bytes, Loader::DeviceBytes). Least recently used UNPINNED values go
//     first. A value is pinned while anyone besides the cache holds its shared_ptr (use_count() > 1): a request
//     keeps the pack of its rows until they have run, so a batch never loses a pack under it. Pinned values may
//     push tier 1 over its budget for a while; they are evicted on the first Get, Offer or Trim after they unpin
//     (while tier 1 is over budget, every Get tries).
//   tier 2, "host": host copies (Loader::MakeHostCopy) of values evicted from tier 1, under their own byte budget
//     (Options::host_bytes, Loader::HostBytes), least recently used first out. A miss in tier 1 that hits tier 2
//     rebuilds the value from the copy (Loader::LoadFromHost: for packs, binding the kept contents to the model
//     without reading or parsing the store's bytes). Tiers are exclusive: a key is in tier 1 or in tier 2, not both.
//   tier 3, "store": everything else (Loader::LoadFromStore).
// A miss loads on the caller's thread, outside the cache's lock: other keys' lookups (hits and loads) go on
// meanwhile. Single flight: concurrent misses on one key cause one load; the others wait for it and get its
// result. A failed load fails every waiter with the same status and caches nothing (the next Get tries again).
//
// Owns its entries (and the loads' bookkeeping); does not own the loader or the observer. Thread-safe.
#ifndef DELTASERVE_SERVER_DELTAS_DELTA_CACHE_H_
#define DELTASERVE_SERVER_DELTAS_DELTA_CACHE_H_

#include <array>
#include <cstdint>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace deltaserve {
namespace deltas {

// Where a lookup's value came from.
enum class CacheTier {
  kDevice = 0,  // tier 1: already loaded (a hit)
  kHost = 1,    // tier 2: rebuilt from its host copy
  kStore = 2,   // read from the store
};
inline constexpr int kNumCacheTiers = 3;
// "device", "host", "store" (metric label values and the Prefetch RPC's names).
const char* CacheTierName(CacheTier tier);

// Told what the cache does, for metrics. Called under the cache's lock: implementations must be quick and must
// not call back into the cache. Thread-safe implementations only (the cache is used from many threads).
class DeltaCacheObserver {
 public:
  virtual ~DeltaCacheObserver() = default;
  // A Get answered: kDevice for a hit; kHost / kStore for a miss answered by a load from there (the caller's own
  // load, or one it waited for). Not called for failed lookups (OnCacheLoad counts failed loads).
  virtual void OnCacheLookup(CacheTier served_from) = 0;
  // A load (kHost or kStore) finished, successfully or not, after `duration`.
  virtual void OnCacheLoad(CacheTier source, bool ok, absl::Duration duration) = 0;
  // One entry left `tier` to make room: kDevice (its host copy moves to tier 2 when it fits there) or kHost
  // (dropped).
  virtual void OnCacheEviction(CacheTier tier) = 0;
  // What tier kDevice or kHost holds after a change: bytes (by the tier's own measure) and entries.
  virtual void OnCacheResidency(CacheTier tier, int64_t bytes, int64_t entries) = 0;
};

// A snapshot of the cache (TieredCache::stats()).
struct CacheStats {
  int64_t device_bytes = 0;
  int64_t device_entries = 0;
  int64_t pinned_entries = 0;  // tier-1 entries in use now (not evictable)
  int64_t host_bytes = 0;
  int64_t host_entries = 0;
  int64_t loads_in_flight = 0;
  // Successful lookups by CacheTier they were served from (index = static_cast<int>(tier)).
  std::array<int64_t, kNumCacheTiers> lookups{};
  // Loads by source (kHost, kStore), successful and failed.
  std::array<int64_t, kNumCacheTiers> loads_ok{};
  std::array<int64_t, kNumCacheTiers> loads_failed{};
  // Evictions from kDevice and kHost.
  std::array<int64_t, kNumCacheTiers> evictions{};
  // Lookups that waited for a load another caller had started (single flight).
  int64_t waits = 0;
};

template <typename Value, typename HostCopy>
class TieredCache {
 public:
  // Makes, sizes and rebuilds values. Called outside the cache's lock except where noted; must be thread-safe.
  class Loader {
   public:
    virtual ~Loader() = default;
    // The value of `key` from the store. The error fails every caller waiting for this key.
    virtual absl::StatusOr<std::shared_ptr<const Value>> LoadFromStore(const std::string& key) = 0;
    // The value of `key` rebuilt from its host copy.
    virtual absl::StatusOr<std::shared_ptr<const Value>> LoadFromHost(const std::string& key,
                                                                      const HostCopy& copy) = 0;
    // The host copy of a value leaving tier 1, or nullptr to keep none. Called under the cache's lock: no I/O.
    virtual std::shared_ptr<const HostCopy> MakeHostCopy(const Value& value) = 0;
    // Sizes for the budgets. Called under the cache's lock.
    virtual int64_t DeviceBytes(const Value& value) const = 0;
    virtual int64_t HostBytes(const HostCopy& copy) const = 0;
  };

  struct Options {
    // Tier 1's budget in bytes (Loader::DeviceBytes); pinned values may exceed it (see the class comment).
    int64_t device_bytes = int64_t{1} << 30;
    // Tier 2's budget in bytes (Loader::HostBytes); 0 disables tier 2.
    int64_t host_bytes = int64_t{1} << 30;
    // Told about lookups, loads, evictions and residency; nullptr = nobody. Must outlive the cache.
    DeltaCacheObserver* observer = nullptr;
  };

  // A Get's answer.
  struct Result {
    std::shared_ptr<const Value> value;  // never null
    CacheTier tier = CacheTier::kDevice;  // where it came from
    bool waited = false;                  // it waited for a load another caller started
    absl::Duration load_time;             // that load's duration (zero for a hit)
  };

  // REQUIRES: `loader` outlives the cache.
  TieredCache(Loader* loader, const Options& options) : loader_(loader), options_(options) {}
  TieredCache(const TieredCache&) = delete;
  TieredCache& operator=(const TieredCache&) = delete;

  // The value of `key`: from tier 1, else loaded (from tier 2, else the store) into tier 1. Blocks while the key
  // loads (this caller's load or another's), never for other keys' loads. Errors: the loader's.
  absl::StatusOr<Result> Get(const std::string& key) {
    std::vector<std::shared_ptr<const Value>> victims;  // freed after the lock is released
    std::shared_ptr<Flight> flight;
    std::shared_ptr<const HostCopy> host_copy;
    {
      absl::MutexLock lock(&mu_);
      EvictLocked(&victims);  // values unpinned since the last call
      auto it = device_.find(key);
      if (it != device_.end()) {
        device_lru_.splice(device_lru_.begin(), device_lru_, it->second.lru);
        CountLookupLocked(CacheTier::kDevice);
        return Result{it->second.value, CacheTier::kDevice, false, absl::ZeroDuration()};
      }
      auto running = flights_.find(key);
      if (running != flights_.end()) {
        flight = running->second;
        ++stats_.waits;
        mu_.Await(absl::Condition(&flight->done));
        if (!flight->result.ok()) return flight->result.status();
        CountLookupLocked(flight->source);
        return Result{*flight->result, flight->source, true, flight->load_time};
      }
      flight = std::make_shared<Flight>();
      auto copy = host_.find(key);
      if (copy != host_.end()) {
        flight->source = CacheTier::kHost;
        host_copy = copy->second.copy;
      }
      flights_.emplace(key, flight);
    }
    victims.clear();

    const absl::Time start = absl::Now();
    absl::StatusOr<std::shared_ptr<const Value>> loaded =
        host_copy != nullptr ? loader_->LoadFromHost(key, *host_copy) : loader_->LoadFromStore(key);
    if (loaded.ok() && *loaded == nullptr) loaded = absl::InternalError(absl::StrCat("loading ", key, " gave nothing"));
    const absl::Duration took = absl::Now() - start;
    host_copy.reset();

    absl::MutexLock lock(&mu_);
    flights_.erase(key);
    flight->result = loaded;
    flight->load_time = took;
    flight->done = true;
    const int source = static_cast<int>(flight->source);
    ++(loaded.ok() ? stats_.loads_ok : stats_.loads_failed)[source];
    if (options_.observer != nullptr) options_.observer->OnCacheLoad(flight->source, loaded.ok(), took);
    if (!loaded.ok()) return loaded.status();
    EraseHostLocked(key);  // tiers are exclusive
    InsertDeviceLocked(key, *loaded);
    EvictLocked(&victims);
    CountLookupLocked(flight->source);
    return Result{*std::move(loaded), flight->source, false, took};
  }

  // Adds an already-loaded value to tier 1 when it fits beside the values there without evicting any (a pushed
  // pack, likely to be used soon). False when it does not fit, or the key is already in tier 1 or loading.
  bool Offer(const std::string& key, std::shared_ptr<const Value> value) {
    std::vector<std::shared_ptr<const Value>> victims;
    absl::MutexLock lock(&mu_);
    EvictLocked(&victims);
    if (value == nullptr || device_.count(key) != 0 || flights_.count(key) != 0) return false;
    if (device_used_ + loader_->DeviceBytes(*value) > options_.device_bytes) return false;
    EraseHostLocked(key);
    InsertDeviceLocked(key, std::move(value));
    return true;
  }

  // Evicts unpinned tier-1 values while tier 1 is over its budget.
  void Trim() {
    std::vector<std::shared_ptr<const Value>> victims;
    absl::MutexLock lock(&mu_);
    EvictLocked(&victims);
  }

  // The tier holding `key` now (kDevice or kHost), or nullopt.
  std::optional<CacheTier> Where(const std::string& key) const {
    absl::MutexLock lock(&mu_);
    if (device_.count(key) != 0) return CacheTier::kDevice;
    if (host_.count(key) != 0) return CacheTier::kHost;
    return std::nullopt;
  }

  // Entries in tier 1 now.
  int64_t device_entries() const {
    absl::MutexLock lock(&mu_);
    return static_cast<int64_t>(device_.size());
  }

  CacheStats stats() const {
    absl::MutexLock lock(&mu_);
    CacheStats s = stats_;
    s.device_bytes = device_used_;
    s.device_entries = static_cast<int64_t>(device_.size());
    for (const auto& [key, entry] : device_) s.pinned_entries += entry.value.use_count() > 1 ? 1 : 0;
    s.host_bytes = host_used_;
    s.host_entries = static_cast<int64_t>(host_.size());
    s.loads_in_flight = static_cast<int64_t>(flights_.size());
    return s;
  }

  const Options& options() const { return options_; }

 private:
  struct DeviceEntry {
    std::shared_ptr<const Value> value;
    int64_t bytes = 0;
    std::list<std::string>::iterator lru;
  };
  struct HostEntry {
    std::shared_ptr<const HostCopy> copy;
    int64_t bytes = 0;
    std::list<std::string>::iterator lru;
  };
  // One load in progress; waiters hold it until they have read the result. Fields are guarded by mu_.
  struct Flight {
    bool done = false;
    CacheTier source = CacheTier::kStore;
    absl::StatusOr<std::shared_ptr<const Value>> result = absl::UnknownError("not loaded yet");
    absl::Duration load_time;
  };

  void CountLookupLocked(CacheTier tier) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    ++stats_.lookups[static_cast<int>(tier)];
    if (options_.observer != nullptr) options_.observer->OnCacheLookup(tier);
  }

  void ReportResidencyLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (options_.observer == nullptr) return;
    options_.observer->OnCacheResidency(CacheTier::kDevice, device_used_, static_cast<int64_t>(device_.size()));
    options_.observer->OnCacheResidency(CacheTier::kHost, host_used_, static_cast<int64_t>(host_.size()));
  }

  void InsertDeviceLocked(const std::string& key, std::shared_ptr<const Value> value)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const int64_t bytes = loader_->DeviceBytes(*value);
    device_lru_.push_front(key);
    device_[key] = DeviceEntry{std::move(value), bytes, device_lru_.begin()};
    device_used_ += bytes;
    ReportResidencyLocked();
  }

  void EraseHostLocked(const std::string& key) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto it = host_.find(key);
    if (it == host_.end()) return;
    host_used_ -= it->second.bytes;
    host_lru_.erase(it->second.lru);
    host_.erase(it);
  }

  // Keeps `copy` in tier 2 as the most recent entry, dropping the least recent ones beyond the budget. A copy
  // larger than the whole budget is not kept.
  void InsertHostLocked(const std::string& key, std::shared_ptr<const HostCopy> copy)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    EraseHostLocked(key);
    const int64_t bytes = loader_->HostBytes(*copy);
    if (bytes > options_.host_bytes) return;
    host_lru_.push_front(key);
    host_[key] = HostEntry{std::move(copy), bytes, host_lru_.begin()};
    host_used_ += bytes;
    while (host_used_ > options_.host_bytes) {
      auto victim = host_.find(host_lru_.back());
      host_used_ -= victim->second.bytes;
      host_.erase(victim);
      host_lru_.pop_back();
      ++stats_.evictions[static_cast<int>(CacheTier::kHost)];
      if (options_.observer != nullptr) options_.observer->OnCacheEviction(CacheTier::kHost);
    }
  }

  // While tier 1 is over budget, moves its least recently used unpinned values out (their host copies into
  // tier 2); the values themselves go to `victims`, to be freed once the lock is released.
  void EvictLocked(std::vector<std::shared_ptr<const Value>>* victims) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (device_used_ <= options_.device_bytes) return;
    bool changed = false;
    for (auto it = device_lru_.end(); it != device_lru_.begin() && device_used_ > options_.device_bytes;) {
      --it;
      auto entry = device_.find(*it);
      // Only the cache holds an unpinned value, and only under mu_ can anyone get a new reference to it: a count
      // of 1 read here cannot grow before the entry is gone.
      if (entry->second.value.use_count() > 1) continue;
      if (options_.host_bytes > 0) {
        if (std::shared_ptr<const HostCopy> copy = loader_->MakeHostCopy(*entry->second.value)) {
          InsertHostLocked(*it, std::move(copy));
        }
      }
      device_used_ -= entry->second.bytes;
      victims->push_back(std::move(entry->second.value));
      device_.erase(entry);
      it = device_lru_.erase(it);
      ++stats_.evictions[static_cast<int>(CacheTier::kDevice)];
      if (options_.observer != nullptr) options_.observer->OnCacheEviction(CacheTier::kDevice);
      changed = true;
    }
    if (changed) ReportResidencyLocked();
  }

  Loader* const loader_;
  const Options options_;

  mutable absl::Mutex mu_;
  // Tier 1 by key, and its keys from most (front) to least recently used.
  std::unordered_map<std::string, DeviceEntry> device_ ABSL_GUARDED_BY(mu_);
  std::list<std::string> device_lru_ ABSL_GUARDED_BY(mu_);
  int64_t device_used_ ABSL_GUARDED_BY(mu_) = 0;
  // Tier 2, likewise.
  std::unordered_map<std::string, HostEntry> host_ ABSL_GUARDED_BY(mu_);
  std::list<std::string> host_lru_ ABSL_GUARDED_BY(mu_);
  int64_t host_used_ ABSL_GUARDED_BY(mu_) = 0;
  // Loads in progress by key.
  std::unordered_map<std::string, std::shared_ptr<Flight>> flights_ ABSL_GUARDED_BY(mu_);
  // Counters (the sizes are filled in by stats()).
  CacheStats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace deltas
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_DELTAS_DELTA_CACHE_H_

// RefTable: the reference half of a DeltaStore as a plain in-memory state machine, shared by every store
// implementation: tenants -> tasks -> versions and labels, validation, quota checks and paging.
//
// Every mutation is a RefOp. A store first asks the table to Plan a mutation (validates it against the current
// state and the quotas and returns the op to apply, without changing anything), makes it durable its own way
// (the filesystem store appends it to its journal; the OCI store writes a manifest or tag), then Apply()s it.
// Replaying the same ops in the same order rebuilds the same table, which is how the filesystem store recovers.
//
// Thread-compatible: the owning store serializes access (one absl::Mutex around Plan + persist + Apply).
#ifndef DELTASERVE_DELTA_STORE_REF_TABLE_H_
#define DELTASERVE_DELTA_STORE_REF_TABLE_H_

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "delta_store/store.h"

namespace deltaserve {
namespace store {

struct RefOp {
  // kReserveVersions raises a task's next version number to `version` (never lowers it), so that numbers of
  // deleted versions stay unused across Snapshot(); it creates no version, and the task stays invisible until one
  // is added.
  enum class Kind { kAddVersion, kSetLabel, kDeleteLabel, kDeleteVersion, kReserveVersions };
  Kind kind = Kind::kAddVersion;
  std::string tenant;
  std::string task;
  // kAddVersion: the new number (at least the task's next version); kSetLabel / kDeleteVersion: the target;
  // kReserveVersions: the task's next version number.
  int64_t version = 0;
  std::string digest;   // kAddVersion
  int64_t size = 0;     // kAddVersion: the blob's size
  std::string label;    // kSetLabel / kDeleteLabel
  absl::Time time;      // when the op was planned
};

// One line of JSON (no newline), and back: {"op":"add_version"|"set_label"|"delete_label"|"delete_version"|
// "reserve_versions","tenant":..,"task":..,"version":..,"digest":..,"size":..,"label":..,"time_us":..} with only
// the fields the kind uses; times are unix microseconds. DecodeRefOp: INVALID_ARGUMENT for anything malformed
// (names are checked by RefTable::Apply, not here).
std::string EncodeRefOp(const RefOp& op);
absl::StatusOr<RefOp> DecodeRefOp(absl::string_view line);

// The quotas a store enforces. Copyable; the store keeps its own copy.
struct QuotaOptions {
  // Applies to tenants without an entry in `per_tenant`.
  Quota default_quota;
  // Per-tenant replacements of default_quota (the whole Quota, not field by field). Empty = none.
  std::map<std::string, Quota> per_tenant;
  // Consulted first on every check (the server answers from the tenants file, which can change at runtime): a
  // returned Quota's non-zero fields override default_quota / per_tenant's field by field; nullopt, or an empty
  // function, = only the static settings above. Called with the store's lock held: must be thread-safe and
  // quick, and must not call back into the store. Empty by default.
  std::function<std::optional<Quota>(const std::string& tenant)> lookup;

  // The tenant's quota now: per_tenant's entry (else default_quota), with lookup's non-zero fields over it.
  // A value: lookup may answer differently on the next call.
  Quota For(const std::string& tenant) const;
};

class RefTable {
 public:
  // The op that adds the next version of tenant/task for blob (digest, size). When a version of the task already
  // points at `digest`, returns no op and sets *existing to it. Errors as DeltaStore::AddVersion (except NOT_FOUND
  // for a missing blob, which the store checks).
  absl::StatusOr<std::optional<RefOp>> PlanAddVersion(const std::string& tenant, const std::string& task,
                                                      const std::string& digest, int64_t size, absl::Time now,
                                                      const QuotaOptions& quotas, VersionInfo* existing) const;
  absl::StatusOr<RefOp> PlanSetLabel(const std::string& tenant, const std::string& task, const std::string& label,
                                     int64_t version, absl::Time now) const;
  absl::StatusOr<RefOp> PlanDeleteLabel(const std::string& tenant, const std::string& task,
                                        const std::string& label, absl::Time now) const;
  absl::StatusOr<RefOp> PlanDeleteVersion(const std::string& tenant, const std::string& task, int64_t version,
                                          absl::Time now) const;

  // Applies an op (validated again: replaying a journal must not trust it). INVALID_ARGUMENT / NOT_FOUND /
  // FAILED_PRECONDITION when it does not fit the current state; the table is unchanged then.
  absl::Status Apply(const RefOp& op);

  // As DeltaStore::Resolve, for refs with a tenant and task. A digest-only ref: the first version (in
  // (tenant, task, version) order) pointing at it, or NOT_FOUND; the store answers blob-only refs itself.
  absl::StatusOr<VersionInfo> Resolve(const Ref& ref) const;
  absl::StatusOr<ListPage> List(const ListOptions& options) const;
  TenantUsage Usage(const std::string& tenant) const;
  // True when any version points at `digest`.
  bool IsReferenced(const std::string& digest) const;
  // Every referenced digest.
  std::set<std::string> ReferencedDigests() const;

  // The ops that rebuild this table from empty, task by task: AddVersion for every live version, ReserveVersions
  // when the next version number is above the highest live one (deleted numbers stay unused, also for a task
  // whose versions were all deleted), then SetLabel for its user labels.
  std::vector<RefOp> Snapshot() const;

 private:
  struct Version {
    std::string digest;
    int64_t size = 0;
    absl::Time created;
  };
  // A task without versions is invisible (Resolve: NOT_FOUND, List skips it); it is kept for next_version.
  struct Task {
    std::map<int64_t, Version> versions;
    std::map<std::string, int64_t> labels;  // user labels; "latest" is derived
    int64_t next_version = 1;
  };
  // (tenant, task) -> Task
  std::map<std::pair<std::string, std::string>, Task> tasks_;

  VersionInfo Info(const std::string& tenant, const std::string& task, const Task& t, int64_t version) const;
};

}  // namespace store
}  // namespace deltaserve

#endif  // DELTASERVE_DELTA_STORE_REF_TABLE_H_

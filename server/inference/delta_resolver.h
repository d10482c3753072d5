// DeltaResolver: finds the delta pack a request names (tenant + TaskSelector). The serving path asks it once per
// request and keeps the returned shared_ptr for as long as the request's rows run, so a pack in use is never
// freed under a batch (the handle pins it).
//
// DirectoryDeltaResolver: this release's resolver. At start it loads every pack file of a directory, validated
// against the served model:
//   <dir>/<task>.dpack            a task of the default tenant ("")
//   <dir>/<tenant>/<task>.dpack   a task of tenant <tenant>
// `task` resolves by name within the request's tenant; `digest` ("sha256:<hex>") resolves any loaded pack of
// that tenant by content. Versions and labels need the delta store of a later release (FAILED_PRECONDITION).
// Immutable after Create(): thread-safe.
#ifndef DELTASERVE_SERVER_INFERENCE_DELTA_RESOLVER_H_
#define DELTASERVE_SERVER_INFERENCE_DELTA_RESOLVER_H_

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "server/delta/delta_pack.h"
#include "server/model/model.h"

namespace deltaserve {
namespace inference {

// A request's task selector (the public API's TaskRef). Empty = the base model.
struct TaskSelector {
  std::string task;
  int64_t version = 0;  // 0 = unset
  std::string label;
  std::string digest;
  bool empty() const { return task.empty() && version == 0 && label.empty() && digest.empty(); }
};

class DeltaResolver {
 public:
  virtual ~DeltaResolver() = default;
  // The pack `selector` names for `tenant`. NOT_FOUND (naming the task and tenant) when there is none;
  // INVALID_ARGUMENT for a malformed selector; FAILED_PRECONDITION for selectors this resolver cannot serve.
  // REQUIRES: !selector.empty().
  virtual absl::StatusOr<std::shared_ptr<const delta::DeltaPack>> Resolve(const std::string& tenant,
                                                                          const TaskSelector& selector) const = 0;
  // How many packs it can serve.
  virtual int num_packs() const = 0;
};

class DirectoryDeltaResolver : public DeltaResolver {
 public:
  struct Options {
    // Limits every pack must respect.
    delta::PackLimits limits;
    // File name suffix of pack files.
    std::string suffix = ".dpack";
  };

  struct LoadReport {
    int loaded = 0;
    // Files that could not be loaded, with the reason (they are skipped; the server still starts).
    std::vector<std::pair<std::string, std::string>> failed;
  };

  // Loads every pack under `dir` for `model`. NOT_FOUND when `dir` is not a directory.
  static absl::StatusOr<std::unique_ptr<DirectoryDeltaResolver>> Create(const std::string& dir,
                                                                         const model::Model& model,
                                                                         const Options& options,
                                                                         LoadReport* report);

  absl::StatusOr<std::shared_ptr<const delta::DeltaPack>> Resolve(const std::string& tenant,
                                                                  const TaskSelector& selector) const override;
  int num_packs() const override { return static_cast<int>(by_name_.size()); }

 private:
  DirectoryDeltaResolver() = default;
  // (tenant, task) -> pack
  std::map<std::pair<std::string, std::string>, std::shared_ptr<const delta::DeltaPack>> by_name_;
  // (tenant, digest) -> pack
  std::map<std::pair<std::string, std::string>, std::shared_ptr<const delta::DeltaPack>> by_digest_;
};

// True when `name` is a valid tenant or task name: 1-64 characters of [a-z0-9._-], starting with a letter or
// digit (names become file names and, later, store keys).
bool IsValidName(const std::string& name);

}  // namespace inference
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_INFERENCE_DELTA_RESOLVER_H_

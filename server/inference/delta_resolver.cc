#include "server/inference/delta_resolver.h"

#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/common/file_util.h"
#include "server/common/logging.h"
#include "server/common/sha256.h"

namespace deltaserve {
namespace inference {
namespace {

bool IsDir(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::vector<std::string> ListDir(const std::string& dir) {
  std::vector<std::string> names;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (dirent* e = ::readdir(d)) {
      const std::string name = e->d_name;
      if (name != "." && name != "..") names.push_back(name);
    }
    ::closedir(d);
  }
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace

bool IsValidName(const std::string& name) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name) {
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-')) return false;
  }
  return name[0] != '.' && name[0] != '_' && name[0] != '-';
}

absl::StatusOr<std::unique_ptr<DirectoryDeltaResolver>> DirectoryDeltaResolver::Create(const std::string& dir,
                                                                                       const model::Model& model,
                                                                                       const Options& options,
                                                                                       LoadReport* report) {
  if (!IsDir(dir)) return absl::NotFoundError(absl::StrCat("delta directory ", dir, " does not exist"));
  std::unique_ptr<DirectoryDeltaResolver> resolver(new DirectoryDeltaResolver());
  LoadReport local;
  LoadReport& r = report != nullptr ? *report : local;
  auto load = [&](const std::string& tenant, const std::string& path, const std::string& file) {
    const std::string task = file.substr(0, file.size() - options.suffix.size());
    if (!IsValidName(task)) {
      r.failed.emplace_back(path, "the file name is not a valid task name ([a-z0-9._-], at most 64)");
      return;
    }
    absl::StatusOr<std::string> bytes = ReadFileToString(path);
    if (bytes.ok() && static_cast<int64_t>(bytes->size()) > options.limits.max_bytes) {
      bytes = absl::InvalidArgumentError(absl::StrCat("larger than the ", options.limits.max_bytes, " byte limit"));
    }
    absl::StatusOr<std::shared_ptr<const delta::DeltaPack>> pack =
        bytes.ok() ? delta::DeltaPack::Load(*bytes, model, options.limits)
                   : absl::StatusOr<std::shared_ptr<const delta::DeltaPack>>(bytes.status());
    if (!pack.ok()) {
      r.failed.emplace_back(path, pack.status().ToString());
      return;
    }
    resolver->by_name_[{tenant, task}] = *pack;
    resolver->by_digest_[{tenant, (*pack)->digest()}] = *pack;
    ++r.loaded;
  };
  for (const std::string& name : ListDir(dir)) {
    const std::string path = dir + "/" + name;
    if (IsDir(path)) {
      if (!IsValidName(name)) {
        r.failed.emplace_back(path, "the directory name is not a valid tenant name");
        continue;
      }
      for (const std::string& file : ListDir(path)) {
        if (absl::EndsWith(file, options.suffix)) load(name, path + "/" + file, file);
      }
    } else if (absl::EndsWith(name, options.suffix)) {
      load("", path, name);
    }
  }
  for (const auto& [path, why] : r.failed) DS_LOG(ERROR) << "skipping delta pack " << path << ": " << why;
  return resolver;
}

absl::StatusOr<std::shared_ptr<const delta::DeltaPack>> DirectoryDeltaResolver::Resolve(
    const std::string& tenant, const TaskSelector& selector) const {
  if (selector.version != 0 || !selector.label.empty()) {
    return absl::FailedPreconditionError(
        "task versions and labels need the delta store; this server serves packs from --delta_dir by task name or "
        "by digest");
  }
  if (!selector.digest.empty()) {
    if (!IsSha256Digest(selector.digest)) {
      return absl::InvalidArgumentError(
          absl::StrCat("digest \"", selector.digest, "\" is not sha256:<64 lowercase hex digits>"));
    }
    auto it = by_digest_.find({tenant, selector.digest});
    if (it == by_digest_.end() || (!selector.task.empty() && by_name_.count({tenant, selector.task}) &&
                                   by_name_.at({tenant, selector.task}) != it->second)) {
      return absl::NotFoundError(absl::StrCat("no delta pack ", selector.digest,
                                              selector.task.empty() ? "" : absl::StrCat(" for task \"", selector.task, "\""),
                                              tenant.empty() ? "" : absl::StrCat(" of tenant \"", tenant, "\"")));
    }
    return it->second;
  }
  if (!IsValidName(selector.task)) {
    return absl::InvalidArgumentError(
        absl::StrCat("task name \"", selector.task, "\" is invalid: use 1-64 characters of [a-z0-9._-]"));
  }
  auto it = by_name_.find({tenant, selector.task});
  if (it == by_name_.end()) {
    return absl::NotFoundError(absl::StrCat("no task \"", selector.task, "\"",
                                            tenant.empty() ? "" : absl::StrCat(" for tenant \"", tenant, "\""),
                                            " on this server"));
  }
  return it->second;
}

}  // namespace inference
}  // namespace deltaserve

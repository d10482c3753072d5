#include "server/deltas/delta_manager.h"

#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/common/file_util.h"
#include "server/common/logging.h"
#include "server/common/sha256.h"
#include "server/common/status_macros.h"

namespace deltaserve {
namespace deltas {
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

void SummarizeManifest(const delta::PackManifest& manifest, PackSummary* out) {
  out->name = manifest.name;
  out->backbone_fingerprint = manifest.backbone_fingerprint;
  out->backbone_family = manifest.backbone_family;
  auto it = manifest.provenance.find("description");
  if (it != manifest.provenance.end() && it->is_string()) out->description = it->get<std::string>();
}

}  // namespace

PackSummary Summarize(const delta::PackContents& contents) {
  PackSummary out;
  SummarizeManifest(contents.manifest, &out);
  for (const delta::MethodSpec& m : contents.methods) out.methods.push_back(delta::MethodKindName(m.kind));
  if (contents.head.has_value()) {
    const nlohmann::json& config = contents.head->config;
    out.head_kind = config.value("type", std::string());
    auto labels = config.find("labels");
    if (labels != config.end() && labels->is_array()) {
      for (const nlohmann::json& l : *labels) {
        if (l.is_string()) out.head_labels.push_back(l.get<std::string>());
      }
    }
  }
  return out;
}

PackSummary Summarize(const delta::DeltaPack& pack) {
  PackSummary out;
  SummarizeManifest(pack.manifest(), &out);
  for (const auto& m : pack.methods()) out.methods.push_back(delta::MethodKindName(m->kind()));
  if (const delta::Head* head = pack.head()) {
    out.head_kind = head->type() == delta::Head::Type::kClassification ? "classification" : "regression";
    out.head_labels = head->labels();
  }
  return out;
}

// Loads packs for the cache: from the store (read, verified by the store when it verifies reads, parsed, bound
// to the model, its identity checked) or from a host copy (bound to the model only).
class DeltaManager::PackLoader : public DeltaCache::Loader {
 public:
  PackLoader(store::DeltaStore* store, const model::Model* model, const delta::PackLimits& limits)
      : store_(store), model_(model), limits_(limits) {}

  absl::StatusOr<std::shared_ptr<const delta::DeltaPack>> LoadFromStore(const std::string& digest) override {
    DS_ASSIGN_OR_RETURN(const std::string bytes, store::ReadBlob(*store_, digest));
    DS_ASSIGN_OR_RETURN(std::shared_ptr<const delta::DeltaPack> pack, delta::DeltaPack::Load(bytes, *model_, limits_));
    if (pack->digest() != digest) {
      return absl::DataLossError(absl::StrCat("stored pack ", digest, " loads as ", pack->digest(),
                                              ": the store holds a pack in non-canonical form"));
    }
    return pack;
  }

  absl::StatusOr<std::shared_ptr<const delta::DeltaPack>> LoadFromHost(const std::string& digest,
                                                                       const HostPack& copy) override {
    DS_ASSIGN_OR_RETURN(std::shared_ptr<const delta::DeltaPack> pack,
                        delta::DeltaPack::FromContents(copy.contents, *model_, limits_));
    if (pack->digest() != digest) {
      return absl::InternalError(absl::StrCat("the host copy of pack ", digest, " binds as ", pack->digest()));
    }
    return pack;
  }

  std::shared_ptr<const HostPack> MakeHostCopy(const delta::DeltaPack& pack) override {
    // Tensor handles are shared, not copied: the pack's specs already hold their CPU tensors.
    auto copy = std::make_shared<HostPack>();
    copy->contents.manifest = pack.manifest();
    for (const auto& method : pack.methods()) copy->contents.methods.push_back(method->spec());
    if (pack.head() != nullptr) copy->contents.head = pack.head()->spec();
    copy->serialized_bytes = pack.serialized_bytes();
    return copy;
  }

  int64_t DeviceBytes(const delta::DeltaPack& pack) const override { return pack.bytes(); }
  int64_t HostBytes(const HostPack& copy) const override { return copy.serialized_bytes; }

 private:
  store::DeltaStore* const store_;
  const model::Model* const model_;
  const delta::PackLimits limits_;
};

namespace {

DeltaCache::Options CacheOptions(const DeltaManager::Options& options) {
  DeltaCache::Options out;
  out.device_bytes = options.cache_bytes;
  out.host_bytes = options.host_cache_bytes;
  out.observer = options.cache_observer;
  return out;
}

}  // namespace

DeltaManager::DeltaManager(store::DeltaStore* store, const model::Model* model, const Options& options)
    : store_(store),
      model_(model),
      options_(options),
      loader_(std::make_unique<PackLoader>(store, model, options.limits)),
      cache_(std::make_unique<DeltaCache>(loader_.get(), CacheOptions(options))) {}

DeltaManager::~DeltaManager() = default;

absl::StatusOr<std::string> DeltaManager::EffectiveTenant(const std::string& tenant) const {
  if (tenant.empty()) return options_.default_tenant;
  DS_RETURN_IF_ERROR(store::CheckName("tenant", tenant));
  return tenant;
}

absl::StatusOr<PushResult> DeltaManager::Push(const PushRequest& request, absl::string_view bytes) {
  DS_ASSIGN_OR_RETURN(const std::string tenant, EffectiveTenant(request.tenant));
  DS_RETURN_IF_ERROR(store::CheckName("task", request.task));
  for (const std::string& label : request.labels) {
    if (!store::IsValidLabel(label) || label == store::kLatestLabel) {
      return absl::InvalidArgumentError(absl::StrCat(
          "label \"", label, "\" cannot be set: use 1-64 characters of [a-z0-9._-], not all digits, not \"",
          store::kLatestLabel, "\" (the server keeps that one)"));
    }
  }
  if (!request.expected_digest.empty() && !IsSha256Digest(request.expected_digest)) {
    return absl::InvalidArgumentError(absl::StrCat("expected digest \"", request.expected_digest,
                                                   "\" is not sha256:<64 lowercase hex digits>"));
  }
  if (static_cast<int64_t>(bytes.size()) > options_.limits.max_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat("the pack is ", bytes.size(),
                                                     " bytes, over this server's limit of ",
                                                     options_.limits.max_bytes, " bytes"));
  }
  PushResult result;
  result.uploaded_digest = Sha256Digest(bytes);
  if (!request.expected_digest.empty() && request.expected_digest != result.uploaded_digest) {
    return absl::DataLossError(absl::StrCat("the upload hashes to ", result.uploaded_digest, ", not the expected ",
                                            request.expected_digest, ": it was damaged in transit; push it again"));
  }
  std::string canonical;
  DS_ASSIGN_OR_RETURN(std::shared_ptr<const delta::DeltaPack> pack,
                      delta::DeltaPack::Load(bytes, *model_, options_.limits, &canonical));
  result.pack = Summarize(*pack);
  DS_RETURN_IF_ERROR(store::PutBlob(*store_, canonical, pack->digest()).status());
  // Whether the task already had this pack: AddVersion is idempotent, so compare the version's age instead of
  // racing on a separate lookup.
  absl::StatusOr<store::VersionInfo> before = store_->Resolve(store::Ref{tenant, request.task, 0, "", pack->digest()});
  DS_ASSIGN_OR_RETURN(result.version, store_->AddVersion(tenant, request.task, pack->digest()));
  result.created = !before.ok();
  for (const std::string& label : request.labels) {
    DS_RETURN_IF_ERROR(store_->SetLabel(tenant, request.task, label, result.version.version));
  }
  if (!request.labels.empty()) {
    DS_ASSIGN_OR_RETURN(result.version,
                        store_->Resolve(store::Ref{tenant, request.task, result.version.version, "", ""}));
  }
  // The pack is bound already: keep it for the requests that will likely follow, when tier 1 has room for it
  // without evicting anything (a burst of pushes does not flush the packs in use).
  cache_->Offer(pack->digest(), pack);
  return result;
}

absl::StatusOr<store::Ref> DeltaManager::ParseTextRef(const std::string& tenant, const std::string& text) const {
  DS_ASSIGN_OR_RETURN(const std::string effective, EffectiveTenant(tenant));
  DS_ASSIGN_OR_RETURN(store::Ref ref, store::ParseRef(text, effective));
  if (ref.tenant.empty()) ref.tenant = effective;  // a digest alone: scoped to the caller's tenant
  if (!tenant.empty() && ref.tenant != tenant) {
    // On the name alone (whether that tenant or task exists is never looked up): docs/SECURITY.md.
    return absl::PermissionDeniedError(absl::StrCat("reference \"", text, "\" names tenant \"", ref.tenant,
                                                    "\" but the request acts for tenant \"", tenant,
                                                    "\": a request may use only its own tenant's packs"));
  }
  return ref;
}

absl::StatusOr<PackDescription> DeltaManager::Get(const std::string& tenant, const std::string& ref_text) {
  DS_ASSIGN_OR_RETURN(const store::Ref ref, ParseTextRef(tenant, ref_text));
  PackDescription out;
  DS_ASSIGN_OR_RETURN(out.version, store_->Resolve(ref));
  DS_ASSIGN_OR_RETURN(const std::string bytes, store::ReadBlob(*store_, out.version.digest));
  DS_ASSIGN_OR_RETURN(const delta::PackContents contents, delta::ParsePack(bytes, options_.limits));
  out.pack = Summarize(contents);
  return out;
}

absl::StatusOr<std::pair<store::VersionInfo, std::unique_ptr<store::BlobReader>>> DeltaManager::OpenPull(
    const std::string& tenant, const std::string& ref_text) {
  DS_ASSIGN_OR_RETURN(const store::Ref ref, ParseTextRef(tenant, ref_text));
  DS_ASSIGN_OR_RETURN(store::VersionInfo version, store_->Resolve(ref));
  DS_ASSIGN_OR_RETURN(std::unique_ptr<store::BlobReader> reader, store_->OpenBlob(version.digest));
  return std::make_pair(std::move(version), std::move(reader));
}

absl::StatusOr<store::ListPage> DeltaManager::ListAllTenants(int page_size, const std::string& page_token) {
  store::ListOptions options;  // tenant "" = every tenant
  options.page_size = page_size;
  options.page_token = page_token;
  return store_->List(options);
}

absl::StatusOr<store::ListPage> DeltaManager::List(const std::string& tenant, const std::string& task,
                                                   int page_size, const std::string& page_token) {
  store::ListOptions options;
  DS_ASSIGN_OR_RETURN(options.tenant, EffectiveTenant(tenant));
  if (!task.empty()) DS_RETURN_IF_ERROR(store::CheckName("task", task));
  options.task = task;
  options.page_size = page_size;
  options.page_token = page_token;
  return store_->List(options);
}

absl::StatusOr<store::VersionInfo> DeltaManager::SetLabel(const std::string& tenant, const std::string& task,
                                                          const std::string& label, int64_t version) {
  DS_ASSIGN_OR_RETURN(const std::string effective, EffectiveTenant(tenant));
  DS_RETURN_IF_ERROR(store_->SetLabel(effective, task, label, version));
  return store_->Resolve(store::Ref{effective, task, version, "", ""});
}

absl::Status DeltaManager::DeleteLabel(const std::string& tenant, const std::string& task,
                                       const std::string& label) {
  DS_ASSIGN_OR_RETURN(const std::string effective, EffectiveTenant(tenant));
  return store_->DeleteLabel(effective, task, label);
}

absl::Status DeltaManager::DeleteVersion(const std::string& tenant, const std::string& task, int64_t version) {
  DS_ASSIGN_OR_RETURN(const std::string effective, EffectiveTenant(tenant));
  return store_->DeleteVersion(effective, task, version);
}

absl::StatusOr<ImportReport> DeltaManager::ImportDirectory(const std::string& dir, const std::string& suffix) {
  if (!IsDir(dir)) return absl::NotFoundError(absl::StrCat("delta directory ", dir, " does not exist"));
  ImportReport report;
  auto import = [&](const std::string& tenant, const std::string& path, const std::string& file) {
    PushRequest request;
    request.tenant = tenant;
    request.task = file.substr(0, file.size() - suffix.size());
    absl::StatusOr<std::string> bytes = ReadFileToString(path);
    absl::Status status = bytes.status();
    if (bytes.ok() && static_cast<int64_t>(bytes->size()) > options_.limits.max_bytes) {
      status = absl::InvalidArgumentError(absl::StrCat("larger than the ", options_.limits.max_bytes, " byte limit"));
    }
    if (status.ok()) status = Push(request, *bytes).status();
    if (status.ok()) {
      ++report.imported;
    } else {
      report.failed.emplace_back(path, status.ToString());
    }
  };
  for (const std::string& name : ListDir(dir)) {
    const std::string path = dir + "/" + name;
    if (IsDir(path)) {
      if (!store::IsValidName(name)) {
        report.failed.emplace_back(path, "the directory name is not a valid tenant name ([a-z0-9._-], at most 64)");
        continue;
      }
      for (const std::string& file : ListDir(path)) {
        if (absl::EndsWith(file, suffix)) import(name, path + "/" + file, file);
      }
    } else if (absl::EndsWith(name, suffix)) {
      import("", path, name);
    }
  }
  for (const auto& [path, why] : report.failed) DS_LOG(ERROR) << "skipping delta pack " << path << ": " << why;
  return report;
}

absl::StatusOr<store::Ref> DeltaManager::ToStoreRef(const std::string& tenant,
                                                    const inference::TaskSelector& selector) const {
  const bool text_form = absl::StrContains(selector.task, '/') || absl::StrContains(selector.task, '@') ||
                         absl::StrContains(selector.task, ':');
  if (text_form) {
    if (selector.version != 0 || !selector.label.empty() || !selector.digest.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "task \"", selector.task,
          "\" is a full reference (it names a version, label or digest itself): leave version, label and digest "
          "unset, or give the bare task name"));
    }
    return ParseTextRef(tenant, selector.task);
  }
  store::Ref ref;
  DS_ASSIGN_OR_RETURN(ref.tenant, EffectiveTenant(tenant));
  ref.task = selector.task;
  if (!ref.task.empty()) DS_RETURN_IF_ERROR(store::CheckName("task", ref.task));
  if (selector.version < 0) return absl::InvalidArgumentError("task version must be >= 1");
  ref.version = selector.version;
  ref.label = selector.label;
  if (!ref.label.empty() && !store::IsValidLabel(ref.label)) {
    return absl::InvalidArgumentError(
        absl::StrCat("label \"", ref.label, "\" is invalid: use 1-64 characters of [a-z0-9._-], not all digits"));
  }
  ref.digest = selector.digest;
  if (!ref.digest.empty() && !IsSha256Digest(ref.digest)) {
    return absl::InvalidArgumentError(
        absl::StrCat("digest \"", ref.digest, "\" is not sha256:<64 lowercase hex digits>"));
  }
  if (ref.task.empty() && ref.digest.empty()) {
    return absl::InvalidArgumentError("a task reference needs a task name or a digest");
  }
  return ref;
}

absl::StatusOr<std::shared_ptr<const delta::DeltaPack>> DeltaManager::Resolve(
    const std::string& tenant, const inference::TaskSelector& selector) const {
  DS_ASSIGN_OR_RETURN(const store::Ref ref, ToStoreRef(tenant, selector));
  DS_ASSIGN_OR_RETURN(const store::VersionInfo version, store_->Resolve(ref));
  DS_ASSIGN_OR_RETURN(DeltaCache::Result loaded, cache_->Get(version.digest));
  return std::move(loaded.value);
}

absl::StatusOr<std::vector<PrefetchResult>> DeltaManager::Prefetch(
    const std::string& tenant, const std::vector<inference::TaskSelector>& selectors) {
  if (selectors.empty()) return absl::InvalidArgumentError("prefetch needs at least one task reference");
  if (selectors.size() > static_cast<size_t>(kMaxPrefetchTasks)) {
    return absl::InvalidArgumentError(absl::StrCat("prefetch takes at most ", kMaxPrefetchTasks,
                                                   " task references per call, not ", selectors.size()));
  }
  std::vector<store::Ref> refs;
  for (size_t i = 0; i < selectors.size(); ++i) {
    absl::StatusOr<store::Ref> ref = ToStoreRef(tenant, selectors[i]);
    if (!ref.ok()) {
      return absl::Status(ref.status().code(), absl::StrCat("task reference ", i + 1, " of ", selectors.size(), ": ",
                                                            ref.status().message()));
    }
    refs.push_back(*std::move(ref));
  }
  std::vector<PrefetchResult> results;
  for (const store::Ref& ref : refs) {
    PrefetchResult r;
    DS_ASSIGN_OR_RETURN(r.version, store_->Resolve(ref));
    DS_ASSIGN_OR_RETURN(const DeltaCache::Result loaded, cache_->Get(r.version.digest));
    r.source = loaded.tier;
    r.device_bytes = loaded.value->bytes();
    r.serialized_bytes = loaded.value->serialized_bytes();
    r.load_time = loaded.load_time;
    results.push_back(std::move(r));
  }
  cache_->Trim();  // the last pack is unpinned now: settle tier 1 within its budget before reporting
  for (PrefetchResult& r : results) r.resident = cache_->Where(r.version.digest) == CacheTier::kDevice;
  return results;
}

CacheStats DeltaManager::cache_stats() const { return cache_->stats(); }

int DeltaManager::num_packs() const { return static_cast<int>(cache_->device_entries()); }

}  // namespace deltas
}  // namespace deltaserve

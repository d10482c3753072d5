#include "server/delta/delta_pack.h"

#include <ATen/ops/isfinite.h>

#include <algorithm>
#include <array>
#include <map>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/common/sha256.h"
#include "server/common/status_macros.h"
#include "server/common/torch_status.h"
#include "server/model/safetensors.h"

namespace deltaserve {
namespace delta {
namespace {

constexpr char kManifestKey[] = "deltaserve.manifest";
constexpr char kHeadOwner[] = "head";

absl::Status PackError(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("delta pack: ", what));
}

// The manifest fields every pack needs, whichever way it is made.
absl::Status CheckManifest(const PackManifest& manifest) {
  if (manifest.format_version != kPackFormatVersion) {
    return PackError(absl::StrCat("unsupported pack format version ", manifest.format_version, " (this server reads ",
                                  kPackFormatVersion, ")"));
  }
  if (manifest.backbone_fingerprint.empty()) return PackError("the manifest has no backbone fingerprint");
  if (!manifest.provenance.is_object()) {
    return PackError(absl::StrCat("\"provenance\" must be a JSON object, got ", manifest.provenance.type_name()));
  }
  return absl::OkStatus();
}

// A tensor a pack can hold: named without '/', defined, float32, on the CPU.
absl::Status CheckTensorForWrite(absl::string_view owner, const std::string& name, const at::Tensor& t) {
  if (name.empty()) return PackError(absl::StrCat(owner, ": a tensor has an empty name"));
  if (name.find('/') != std::string::npos) {
    return PackError(absl::StrCat(owner, ": tensor name \"", name, "\" contains '/'"));
  }
  if (!t.defined()) return PackError(absl::StrCat(owner, ": tensor \"", name, "\" is undefined"));
  if (t.scalar_type() != at::kFloat) {
    return PackError(absl::StrCat(owner, ": tensor \"", name, "\" is ", c10::toString(t.scalar_type()),
                                  "; packs hold float32 tensors only"));
  }
  if (!t.device().is_cpu()) {
    return PackError(absl::StrCat(owner, ": tensor \"", name, "\" is on ", t.device().str(),
                                  "; packs are written from CPU tensors"));
  }
  return absl::OkStatus();
}

// Methods of `contents` in MethodKind order; INVALID_ARGUMENT for two of one kind.
absl::StatusOr<std::vector<const MethodSpec*>> MethodsInKindOrder(const std::vector<MethodSpec>& methods) {
  std::vector<const MethodSpec*> out;
  std::array<bool, kNumMethodKinds> seen{};
  for (const MethodSpec& m : methods) {
    const int k = static_cast<int>(m.kind);
    if (k < 0 || k >= kNumMethodKinds) return PackError(absl::StrCat("unknown method kind ", k));
    if (seen[k]) {
      return PackError(absl::StrCat("method \"", MethodKindName(m.kind), "\" appears twice (one of each kind)"));
    }
    seen[k] = true;
    out.push_back(&m);
  }
  std::sort(out.begin(), out.end(), [](const MethodSpec* a, const MethodSpec* b) { return a->kind < b->kind; });
  return out;
}

// Canonical serialization; `manifest_text` receives the manifest JSON.
absl::StatusOr<std::string> Serialize(const PackContents& contents, std::string* manifest_text) {
  DS_RETURN_IF_ERROR(CheckManifest(contents.manifest));
  DS_ASSIGN_OR_RETURN(std::vector<const MethodSpec*> methods, MethodsInKindOrder(contents.methods));

  nlohmann::json manifest = nlohmann::json::object();
  manifest["format_version"] = kPackFormatVersion;
  manifest["name"] = contents.manifest.name;
  manifest["backbone"] = {{"family", contents.manifest.backbone_family},
                          {"fingerprint", contents.manifest.backbone_fingerprint}};
  manifest["provenance"] = contents.manifest.provenance;
  manifest["methods"] = nlohmann::json::array();
  std::map<std::string, at::Tensor> tensors;
  for (const MethodSpec* m : methods) {
    const char* kind = MethodKindName(m->kind);
    if (!m->config.is_object()) {
      return PackError(absl::StrCat(kind, ": config must be a JSON object, got ", m->config.type_name()));
    }
    manifest["methods"].push_back({{"method", kind}, {"config", m->config}});
    for (const auto& [name, t] : m->tensors) {
      DS_RETURN_IF_ERROR(CheckTensorForWrite(kind, name, t));
      tensors[absl::StrCat(kind, "/", name)] = t;
    }
  }
  if (contents.head.has_value()) {
    if (!contents.head->config.is_object()) {
      return PackError(absl::StrCat("head: config must be a JSON object, got ", contents.head->config.type_name()));
    }
    manifest["head"] = {{"config", contents.head->config}};
    for (const auto& [name, t] : contents.head->tensors) {
      DS_RETURN_IF_ERROR(CheckTensorForWrite(kHeadOwner, name, t));
      tensors[absl::StrCat(kHeadOwner, "/", name)] = t;
    }
  }
  try {
    *manifest_text = manifest.dump();  // compact, keys sorted (nlohmann::json objects are std::maps)
  } catch (const nlohmann::json::exception& e) {
    // Invalid UTF-8 in a string of the manifest.
    return PackError(absl::StrCat("cannot write the manifest: ", e.what()));
  }
  return model::SerializeSafetensors(tensors, {{kManifestKey, *manifest_text}});
}

// Reads manifest[key] as a string into `out`; absent (or null) keeps `out` unless `required`.
absl::Status ReadString(const nlohmann::json& object, const char* key, const std::string& where, bool required,
                        std::string* out) {
  auto it = object.find(key);
  if (it == object.end() || it->is_null()) {
    if (required) return PackError(absl::StrCat(where, " has no \"", key, "\""));
    return absl::OkStatus();
  }
  if (!it->is_string()) {
    return PackError(absl::StrCat(where, " \"", key, "\" must be a string, got ", it->dump()));
  }
  *out = it->get<std::string>();
  return absl::OkStatus();
}

absl::Status CheckKeys(const nlohmann::json& object, const std::string& where, const std::vector<std::string>& known) {
  for (auto it = object.begin(); it != object.end(); ++it) {
    if (std::find(known.begin(), known.end(), it.key()) == known.end()) {
      return PackError(
          absl::StrCat(where, " has an unknown key \"", it.key(), "\" (known: ", absl::StrJoin(known, ", "), ")"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::string> SerializePack(const PackContents& contents) {
  std::string manifest_text;
  return Serialize(contents, &manifest_text);
}

absl::StatusOr<PackContents> ParsePack(absl::string_view bytes, const PackLimits& limits) {
  if (static_cast<int64_t>(bytes.size()) > limits.max_bytes) {
    return PackError(absl::StrCat("pack is ", bytes.size(), " bytes, over the limit of ", limits.max_bytes));
  }
  DS_ASSIGN_OR_RETURN(
      std::unique_ptr<model::SafetensorsFile> file,
      model::SafetensorsFile::FromBuffer(std::string(bytes), model::SafetensorsFile::Options(), "delta pack"));

  // The manifest.
  auto meta = file->metadata().find(kManifestKey);
  if (meta == file->metadata().end()) {
    return PackError(absl::StrCat("not a delta pack: the safetensors metadata has no \"", kManifestKey, "\""));
  }
  const std::string& text = meta->second;
  if (static_cast<int64_t>(text.size()) > limits.max_manifest_bytes) {
    return PackError(
        absl::StrCat("manifest is ", text.size(), " bytes, over the limit of ", limits.max_manifest_bytes));
  }
  nlohmann::json manifest = nlohmann::json::parse(text, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (manifest.is_discarded()) return PackError("the manifest is not valid JSON");
  if (!manifest.is_object()) {
    return PackError(absl::StrCat("the manifest is a JSON ", manifest.type_name(), ", not an object"));
  }

  PackContents contents;
  // The version first: a newer pack may have keys this reader does not know.
  auto version = manifest.find("format_version");
  if (version == manifest.end()) return PackError("the manifest has no \"format_version\"");
  if (!version->is_number_integer()) {
    return PackError(absl::StrCat("\"format_version\" must be an integer, got ", version->dump()));
  }
  if (!version->is_number_unsigned() || version->get<uint64_t>() != static_cast<uint64_t>(kPackFormatVersion)) {
    return PackError(absl::StrCat("unsupported pack format version ", version->dump(), " (this server reads ",
                                  kPackFormatVersion, ")"));
  }
  contents.manifest.format_version = kPackFormatVersion;
  DS_RETURN_IF_ERROR(
      CheckKeys(manifest, "the manifest", {"format_version", "name", "backbone", "provenance", "methods", "head"}));
  DS_RETURN_IF_ERROR(ReadString(manifest, "name", "the manifest", /*required=*/false, &contents.manifest.name));

  auto backbone = manifest.find("backbone");
  if (backbone == manifest.end() || !backbone->is_object()) {
    return PackError("the manifest has no backbone fingerprint (\"backbone\": {\"fingerprint\": ...})");
  }
  DS_RETURN_IF_ERROR(CheckKeys(*backbone, "\"backbone\"", {"family", "fingerprint"}));
  DS_RETURN_IF_ERROR(
      ReadString(*backbone, "family", "\"backbone\"", /*required=*/false, &contents.manifest.backbone_family));
  DS_RETURN_IF_ERROR(ReadString(*backbone, "fingerprint", "\"backbone\"", /*required=*/false,
                                &contents.manifest.backbone_fingerprint));
  if (contents.manifest.backbone_fingerprint.empty()) return PackError("the manifest has no backbone fingerprint");

  auto provenance = manifest.find("provenance");
  if (provenance != manifest.end() && !provenance->is_null()) {
    if (!provenance->is_object()) {
      return PackError(absl::StrCat("\"provenance\" must be a JSON object, got ", provenance->type_name()));
    }
    contents.manifest.provenance = *provenance;
  }

  // Methods.
  auto methods = manifest.find("methods");
  if (methods == manifest.end() || !methods->is_array()) {
    return PackError("the manifest has no \"methods\" list");
  }
  if (static_cast<int64_t>(methods->size()) > limits.max_methods) {
    return PackError(
        absl::StrCat("the pack has ", methods->size(), " methods, over the limit of ", limits.max_methods));
  }
  std::map<std::string, MethodSpec*> owners;  // tensor-name prefix -> spec
  contents.methods.reserve(methods->size());
  for (size_t i = 0; i < methods->size(); ++i) {
    const nlohmann::json& m = (*methods)[i];
    const std::string where = absl::StrCat("\"methods\"[", i, "]");
    if (!m.is_object()) return PackError(absl::StrCat(where, " is a JSON ", m.type_name(), ", not an object"));
    DS_RETURN_IF_ERROR(CheckKeys(m, where, {"method", "config"}));
    std::string name;
    DS_RETURN_IF_ERROR(ReadString(m, "method", where, /*required=*/true, &name));
    absl::StatusOr<MethodKind> kind = ParseMethodKind(name);
    if (!kind.ok()) return PackError(kind.status().message());
    if (owners.count(name)) return PackError(absl::StrCat("method \"", name, "\" appears twice (one of each kind)"));
    MethodSpec spec;
    spec.kind = *kind;
    auto config = m.find("config");
    if (config != m.end() && !config->is_null()) {
      if (!config->is_object()) {
        return PackError(absl::StrCat(name, ": config must be a JSON object, got ", config->type_name()));
      }
      spec.config = *config;
    }
    contents.methods.push_back(std::move(spec));
    owners[name] = &contents.methods.back();  // reserved above: pointers stay valid
  }

  // Head.
  auto head = manifest.find("head");
  if (head != manifest.end() && !head->is_null()) {
    if (!head->is_object()) return PackError(absl::StrCat("\"head\" is a JSON ", head->type_name(), ", not an object"));
    DS_RETURN_IF_ERROR(CheckKeys(*head, "\"head\"", {"config"}));
    HeadSpec spec;
    auto config = head->find("config");
    if (config == head->end() || !config->is_object()) return PackError("\"head\" has no \"config\" object");
    spec.config = *config;
    contents.head = std::move(spec);
  }

  // Tensors: "<method>/<name>" or "head/<name>", float32, finite.
  for (const std::string& full : file->names()) {
    const size_t slash = full.find('/');
    const std::string owner = slash == std::string::npos ? "" : full.substr(0, slash);
    const std::string name = slash == std::string::npos ? "" : full.substr(slash + 1);
    std::map<std::string, at::Tensor>* target = nullptr;
    if (owner == kHeadOwner && contents.head.has_value()) {
      target = &contents.head->tensors;
    } else if (auto it = owners.find(owner); it != owners.end()) {
      target = &it->second->tensors;
    }
    if (target == nullptr || name.empty() || name.find('/') != std::string::npos) {
      return PackError(absl::StrCat("tensor \"", full, "\" belongs to no method or head of the pack"));
    }
    DS_ASSIGN_OR_RETURN(model::SafetensorsEntry entry, file->entry(full));
    if (entry.dtype != model::SafetensorsDtype::kF32) {
      return PackError(absl::StrCat("tensor \"", full, "\" is not F32; packs hold float32 tensors only"));
    }
    DS_ASSIGN_OR_RETURN(at::Tensor t, file->Load(full, at::kFloat));
    DS_ASSIGN_OR_RETURN(bool finite,
                        TorchCall([&] { return at::isfinite(t).all().item<bool>(); }, "delta pack: finite check"));
    if (!finite) return PackError(absl::StrCat("tensor \"", full, "\" holds NaN or Inf values"));
    (*target)[name] = std::move(t);
  }
  return contents;
}

absl::StatusOr<std::shared_ptr<const DeltaPack>> DeltaPack::Load(absl::string_view bytes, const model::Model& model,
                                                                 const PackLimits& limits,
                                                                 std::string* canonical_bytes) {
  DS_ASSIGN_OR_RETURN(PackContents contents, ParsePack(bytes, limits));
  return FromContents(std::move(contents), model, limits, canonical_bytes);
}

absl::StatusOr<std::shared_ptr<const DeltaPack>> DeltaPack::FromContents(PackContents contents,
                                                                         const model::Model& model,
                                                                         const PackLimits& limits,
                                                                         std::string* canonical_bytes) {
  DS_RETURN_IF_ERROR(CheckManifest(contents.manifest));
  const model::ModelInfo& info = model.info();
  if (contents.manifest.backbone_fingerprint != info.fingerprint) {
    return absl::FailedPreconditionError(absl::StrCat(
        "pack was trained on backbone ", contents.manifest.backbone_fingerprint, ", this server runs ",
        info.fingerprint, " (pack \"", contents.manifest.name, "\" of family \"", contents.manifest.backbone_family,
        "\"; server model \"", info.name, "\" of family \"", info.family, "\")"));
  }
  if (static_cast<int64_t>(contents.methods.size()) > limits.max_methods) {
    return PackError(
        absl::StrCat("the pack has ", contents.methods.size(), " methods, over the limit of ", limits.max_methods));
  }
  DS_RETURN_IF_ERROR(MethodsInKindOrder(contents.methods).status());
  std::stable_sort(contents.methods.begin(), contents.methods.end(),
                   [](const MethodSpec& a, const MethodSpec& b) { return a.kind < b.kind; });

  std::shared_ptr<DeltaPack> pack(new DeltaPack());
  PackContents canonical;
  canonical.manifest = contents.manifest;
  for (MethodSpec& spec : contents.methods) {
    DS_ASSIGN_OR_RETURN(std::unique_ptr<Method> method, CreateMethod(std::move(spec), model, limits.methods));
    canonical.methods.push_back(method->spec());
    pack->bytes_ += method->bytes();
    if (method->kind() == MethodKind::kPrompt) {
      pack->added_tokens_ = method->spec().config.value("num_virtual_tokens", int64_t{0});
    }
    pack->methods_.push_back(std::move(method));
  }
  if (contents.head.has_value()) {
    DS_ASSIGN_OR_RETURN(pack->head_, Head::Create(std::move(*contents.head), model));
    canonical.head = pack->head_->spec();
    pack->bytes_ += pack->head_->bytes();
  }

  // The identity: the canonical bytes of the canonical specs (resolved targets, defaults filled), whatever form
  // the input had.
  std::string manifest_text;
  DS_ASSIGN_OR_RETURN(std::string bytes, Serialize(canonical, &manifest_text));
  if (static_cast<int64_t>(manifest_text.size()) > limits.max_manifest_bytes) {
    return PackError(absl::StrCat("canonical manifest is ", manifest_text.size(), " bytes, over the limit of ",
                                  limits.max_manifest_bytes));
  }
  if (static_cast<int64_t>(bytes.size()) > limits.max_bytes) {
    return PackError(absl::StrCat("canonical pack is ", bytes.size(), " bytes, over the limit of ", limits.max_bytes));
  }
  pack->digest_ = Sha256Digest(bytes);
  pack->serialized_bytes_ = static_cast<int64_t>(bytes.size());
  pack->manifest_ = std::move(canonical.manifest);
  if (canonical_bytes != nullptr) *canonical_bytes = std::move(bytes);
  return std::shared_ptr<const DeltaPack>(std::move(pack));
}

const Method* DeltaPack::method(MethodKind kind) const {
  for (const auto& m : methods_) {
    if (m->kind() == kind) return m.get();
  }
  return nullptr;
}

}  // namespace delta
}  // namespace deltaserve

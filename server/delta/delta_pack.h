// DeltaPack: one task's delta — one or more methods and an optional head — as one self-describing artifact
// (docs/DELTA_PACK.md).
//
// On disk a pack is a safetensors file: the tensors under "<method>/<tensor name>" and "head/<tensor name>", and
// the manifest (format version, methods with their hyper-parameters and resolved targets, head labels, the
// backbone fingerprint, provenance) as canonical JSON in the "__metadata__" entry "deltaserve.manifest".
// Canonical bytes: SerializePack() of the same contents always gives the same bytes (sorted JSON keys, sorted
// tensor names, float32 little-endian, aligned data), so sha256 of those bytes is the pack's identity.
//
// A DeltaPack object is a pack validated against one model and placed on its device: immutable, thread-safe,
// shared (std::shared_ptr) by every batch that runs it.
#ifndef DELTASERVE_SERVER_DELTA_DELTA_PACK_H_
#define DELTASERVE_SERVER_DELTA_DELTA_PACK_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"
#include "server/delta/head.h"
#include "server/delta/method.h"
#include "server/model/model.h"

namespace deltaserve {
namespace delta {

inline constexpr int kPackFormatVersion = 1;

struct PackManifest {
  int format_version = kPackFormatVersion;
  // A human name for the pack (informational; tasks are named by the store), e.g. "sst2-lora".
  std::string name;
  // The backbone the pack was trained on: family and "sha256:<hex>" fingerprint (ModelInfo::fingerprint).
  std::string backbone_family;
  std::string backbone_fingerprint;
  // Free-form JSON object: who or what made the pack (trainer, dataset, metrics, PEFT import, ...).
  nlohmann::json provenance = nlohmann::json::object();
};

// What a pack holds, before it is bound to a model.
struct PackContents {
  PackManifest manifest;
  std::vector<MethodSpec> methods;  // at most one of each kind
  std::optional<HeadSpec> head;
};

struct PackLimits {
  // Largest serialized pack, in bytes.
  int64_t max_bytes = 512ll << 20;
  // Most methods in one pack (one of each kind).
  int max_methods = kNumMethodKinds;
  // Largest JSON manifest, in bytes.
  int64_t max_manifest_bytes = 1 << 20;
  // Per-method limits.
  MethodLimits methods;
};

// The canonical bytes of `contents`. INVALID_ARGUMENT for two methods of one kind, a tensor name with '/', or a
// tensor that is not a float32 CPU tensor.
absl::StatusOr<std::string> SerializePack(const PackContents& contents);

// Parses a pack's bytes (structure only; no model needed). INVALID_ARGUMENT naming the problem for anything
// malformed: not safetensors, no or bad manifest, unknown format version or method, tensors that belong to no
// method, non-float32 tensors, over `limits`.
absl::StatusOr<PackContents> ParsePack(absl::string_view bytes, const PackLimits& limits);

class DeltaPack {
 public:
  // Parses `bytes` and binds every method and the head to `model` (CreateMethod / Head::Create). The pack's
  // backbone fingerprint must equal the model's: otherwise FAILED_PRECONDITION naming both fingerprints.
  // When `canonical_bytes` is non-null it receives the pack's canonical bytes (what the store keeps: their
  // sha256 is digest()), which differ from `bytes` when those were not in canonical form.
  static absl::StatusOr<std::shared_ptr<const DeltaPack>> Load(absl::string_view bytes, const model::Model& model,
                                                                const PackLimits& limits,
                                                                std::string* canonical_bytes = nullptr);
  // Binds already-parsed contents (e.g. from a PEFT import or a trainer) to `model`; same checks as Load.
  static absl::StatusOr<std::shared_ptr<const DeltaPack>> FromContents(PackContents contents,
                                                                        const model::Model& model,
                                                                        const PackLimits& limits,
                                                                        std::string* canonical_bytes = nullptr);

  // "sha256:<hex>" of the canonical bytes.
  const std::string& digest() const { return digest_; }
  const PackManifest& manifest() const { return manifest_; }
  // Methods in MethodKind order.
  const std::vector<std::unique_ptr<Method>>& methods() const { return methods_; }
  // The method of `kind`, or nullptr.
  const Method* method(MethodKind kind) const;
  // The head, or nullptr.
  const Head* head() const { return head_.get(); }
  // Bytes the pack's tensors take on the device.
  int64_t bytes() const { return bytes_; }
  // The canonical bytes' length.
  int64_t serialized_bytes() const { return serialized_bytes_; }
  // Positions the pack adds to every row's sequence (prompt tuning's soft tokens); 0 for most packs. The batch
  // planner counts them, so that rows with prompts are not padded together with rows without.
  int64_t added_tokens() const { return added_tokens_; }

 private:
  DeltaPack() = default;
  std::string digest_;
  PackManifest manifest_;
  std::vector<std::unique_ptr<Method>> methods_;
  std::unique_ptr<Head> head_;
  int64_t bytes_ = 0;
  int64_t serialized_bytes_ = 0;
  int64_t added_tokens_ = 0;
};

}  // namespace delta
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_DELTA_DELTA_PACK_H_

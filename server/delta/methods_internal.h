// The per-kind entry points behind CreateMethod / MakeMethodBatch (method.cc dispatches on the kind), and helpers
// the method implementations share. Internal to the delta library.
#ifndef DELTASERVE_SERVER_DELTA_METHODS_INTERNAL_H_
#define DELTASERVE_SERVER_DELTA_METHODS_INTERNAL_H_

#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/delta/method.h"

namespace deltaserve {
namespace delta {

#define DS_DECLARE_DELTA_METHOD(Name)                                                                          \
  absl::StatusOr<std::unique_ptr<Method>> Create##Name(MethodSpec spec, const model::Model& model,            \
                                                       const MethodLimits& limits);                             \
  absl::StatusOr<std::unique_ptr<MethodBatch>> Make##Name##Batch(const std::vector<const Method*>& rows,        \
                                                                  const model::Model& model);

DS_DECLARE_DELTA_METHOD(Lora)             // lora.cc
DS_DECLARE_DELTA_METHOD(BitFit)           // bitfit.cc
DS_DECLARE_DELTA_METHOD(LnTuning)         // ln_tuning.cc
DS_DECLARE_DELTA_METHOD(ParallelAdapter)  // adapter.cc
DS_DECLARE_DELTA_METHOD(Ia3)              // ia3.cc
DS_DECLARE_DELTA_METHOD(Prefix)           // prefix.cc
DS_DECLARE_DELTA_METHOD(Prompt)           // prompt.cc
DS_DECLARE_DELTA_METHOD(Adapter)          // adapter.cc

#undef DS_DECLARE_DELTA_METHOD

// Reads spec.tensors[name]: NOT present / not float32 / not contiguous-able / shape != `shape` / NaN or Inf are
// INVALID_ARGUMENT naming the method kind and the tensor. Marks `name` as used in `used`.
absl::StatusOr<at::Tensor> RequireTensor(const MethodSpec& spec, const std::string& name,
                                         const std::vector<int64_t>& shape, std::set<std::string>* used);

// INVALID_ARGUMENT naming the first tensor of `spec` that is not in `used` ("unexpected tensor ...").
absl::Status CheckNoUnexpectedTensors(const MethodSpec& spec, const std::set<std::string>& used);

// The tensor as the model computes with it: on the model's device, in its compute dtype.
absl::StatusOr<at::Tensor> ToModelDevice(const at::Tensor& t, const model::Model& model);

// config["targets"] as a list of strings, or `defaults` when absent. INVALID_ARGUMENT when present but not a
// non-empty list of strings.
absl::StatusOr<std::vector<std::string>> TargetPatterns(const MethodSpec& spec,
                                                        const std::vector<std::string>& defaults);

// config[key] as a positive integer <= max; `fallback` when absent (fallback < 0: required).
absl::StatusOr<int64_t> ConfigPositiveInt(const MethodSpec& spec, const char* key, int64_t max, int64_t fallback);
// config[key] as a finite number; `fallback` when absent.
absl::StatusOr<double> ConfigNumber(const MethodSpec& spec, const char* key, double fallback);
// config[key] as a string; `fallback` when absent.
absl::StatusOr<std::string> ConfigString(const MethodSpec& spec, const char* key, const std::string& fallback);

// INVALID_ARGUMENT when spec.config is neither null (no settings) nor an object, or holds a key not in `known`
// (the message lists the known keys).
absl::Status CheckConfigKeys(const MethodSpec& spec, const std::vector<std::string>& known);

// ResolveTargets with the method's kind in the message, a clearer one when a pattern only names modules of
// another kind (e.g. LoRA on a layer norm), and INVALID_ARGUMENT when the targets match nothing. `what` describes
// `kinds` ("linear modules").
absl::StatusOr<std::vector<const model::ModuleInfo*>> ResolveMethodTargets(
    const MethodSpec& spec, const std::vector<std::string>& patterns, const model::Model& model,
    const std::vector<model::ModuleKind>& kinds, const char* what);

// The sorted, de-duplicated names of `modules` (a canonical spec's "targets").
std::vector<std::string> SortedNames(const std::vector<const model::ModuleInfo*>& modules);

// What ties a method to a model: the weights' fingerprint, the compute dtype and the device. A method works with
// any Model whose key equals the one it was created for (e.g. the same weights loaded twice).
std::string ModelKey(const model::Model& model);

// `v` as a 1-D int64 tensor on `device` (row or entry indices for index_select / index_add / index_copy).
at::Tensor IndexTensor(const std::vector<int64_t>& v, const c10::Device& device);

// Checks that a hook's tensor has `rows` rows (a mismatch is a caller bug: it throws, and the model's forward
// turns the throw into an INTERNAL status). `kind` names the method in the message.
void CheckRows(const at::Tensor& t, int64_t rows, const model::ModuleInfo& module, const char* kind);

// True when nothing but `t` can observe its values (tensor and storage referenced once, e.g. a fresh linear
// output) and it is contiguous: then updating it in place equals assigning a new tensor, without allocating one.
// A slice of a fused projection shares its storage, so it is never exclusive.
bool Exclusive(const at::Tensor& t);

// `v` ([B, n] or [1, n]) viewed so that it broadcasts against `like` ([B, ..., n]).
at::Tensor BroadcastRows(const at::Tensor& v, const at::Tensor& like);

// The number of rows and, for each distinct method among `rows`, the row indices that carry it (in first-seen
// order): the grouping that grouped (segmented) application iterates over.
struct RowGroup {
  const Method* method = nullptr;
  std::vector<int64_t> rows;
};
std::vector<RowGroup> GroupRows(const std::vector<const Method*>& rows);

}  // namespace delta
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_DELTA_METHODS_INTERNAL_H_

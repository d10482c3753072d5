#include "server/delta/method.h"

#include "absl/strings/str_cat.h"
#include "server/delta/methods_internal.h"

namespace deltaserve {
namespace delta {
namespace {
constexpr const char* kNames[kNumMethodKinds] = {"lora",   "bitfit", "ln_tuning", "parallel_adapter",
                                                 "ia3",    "prefix", "prompt",    "adapter"};
}  // namespace

const char* MethodKindName(MethodKind kind) { return kNames[static_cast<int>(kind)]; }

absl::StatusOr<MethodKind> ParseMethodKind(absl::string_view name) {
  for (int i = 0; i < kNumMethodKinds; ++i) {
    if (name == kNames[i]) return static_cast<MethodKind>(i);
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown delta method \"", name,
      "\" (known: lora, bitfit, ln_tuning, parallel_adapter, ia3, prefix, prompt, adapter)"));
}

absl::StatusOr<std::unique_ptr<Method>> CreateMethod(MethodSpec spec, const model::Model& model,
                                                     const MethodLimits& limits) {
  switch (spec.kind) {
    case MethodKind::kLora: return CreateLora(std::move(spec), model, limits);
    case MethodKind::kBitFit: return CreateBitFit(std::move(spec), model, limits);
    case MethodKind::kLnTuning: return CreateLnTuning(std::move(spec), model, limits);
    case MethodKind::kParallelAdapter: return CreateParallelAdapter(std::move(spec), model, limits);
    case MethodKind::kIa3: return CreateIa3(std::move(spec), model, limits);
    case MethodKind::kPrefix: return CreatePrefix(std::move(spec), model, limits);
    case MethodKind::kPrompt: return CreatePrompt(std::move(spec), model, limits);
    case MethodKind::kAdapter: return CreateAdapter(std::move(spec), model, limits);
  }
  return absl::InvalidArgumentError("unknown delta method kind");
}

absl::StatusOr<std::unique_ptr<MethodBatch>> MakeMethodBatch(MethodKind kind, std::vector<const Method*> rows,
                                                             const model::Model& model) {
  switch (kind) {
    case MethodKind::kLora: return MakeLoraBatch(rows, model);
    case MethodKind::kBitFit: return MakeBitFitBatch(rows, model);
    case MethodKind::kLnTuning: return MakeLnTuningBatch(rows, model);
    case MethodKind::kParallelAdapter: return MakeParallelAdapterBatch(rows, model);
    case MethodKind::kIa3: return MakeIa3Batch(rows, model);
    case MethodKind::kPrefix: return MakePrefixBatch(rows, model);
    case MethodKind::kPrompt: return MakePromptBatch(rows, model);
    case MethodKind::kAdapter: return MakeAdapterBatch(rows, model);
  }
  return absl::InvalidArgumentError("unknown delta method kind");
}

}  // namespace delta
}  // namespace deltaserve

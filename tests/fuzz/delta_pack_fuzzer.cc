// Fuzz target: the delta pack loader (server/delta/delta_pack.h) with the default limits, as PushDelta and the
// store's pulls reach it.
//
// Reaches: ParsePack (safetensors, manifest JSON, format version, method and head configs, tensor grouping and
// dtypes, limits), then, for a pack that parses, the binding to a model (DeltaPack::FromContents: every method's
// CreateMethod validation of config, targets and tensor shapes / values against a tiny BERT, and Head::Create).
// The pack's fingerprint is replaced by the tiny BERT's first, so that mutated packs get past the fingerprint check
// (DeltaPack::Load of the bytes as given is run too). Invariants: errors are INVALID_ARGUMENT (or
// FAILED_PRECONDITION for the fingerprint); the canonical bytes of a bound pack parse and bind again to the same
// digest.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "server/delta/delta_pack.h"
#include "tests/fuzz/fuzz_util.h"
#include "tests/fuzz/tiny_model.h"

namespace deltaserve {
namespace {

using delta::DeltaPack;
using delta::PackContents;

bool IsInputError(const absl::Status& status) {
  return status.code() == absl::StatusCode::kInvalidArgument ||
         status.code() == absl::StatusCode::kFailedPrecondition;
}

void FuzzOne(absl::string_view input) {
  const model::Model& model = fuzz::TinyBert();
  const delta::PackLimits limits;

  absl::StatusOr<std::shared_ptr<const DeltaPack>> as_given = DeltaPack::Load(input, model, limits);
  if (!as_given.ok()) FUZZ_CHECK(IsInputError(as_given.status()));

  absl::StatusOr<PackContents> contents = delta::ParsePack(input, limits);
  if (!contents.ok()) {
    FUZZ_CHECK(contents.status().code() == absl::StatusCode::kInvalidArgument);
    return;
  }
  contents->manifest.backbone_fingerprint = model.info().fingerprint;
  std::string canonical;
  absl::StatusOr<std::shared_ptr<const DeltaPack>> pack =
      DeltaPack::FromContents(*std::move(contents), model, limits, &canonical);
  if (!pack.ok()) {
    FUZZ_CHECK(IsInputError(pack.status()));
    return;
  }
  // The canonical form is a fixed point.
  std::string canonical_again;
  absl::StatusOr<std::shared_ptr<const DeltaPack>> again = DeltaPack::Load(canonical, model, limits, &canonical_again);
  FUZZ_CHECK(again.ok());
  FUZZ_CHECK((*again)->digest() == (*pack)->digest());
  FUZZ_CHECK(canonical_again == canonical);
}

}  // namespace
}  // namespace deltaserve

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  deltaserve::fuzz::TinyBert();  // built before the first input: its allocations are not that input's leaks
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  deltaserve::FuzzOne(deltaserve::fuzz::AsView(data, size));
  return 0;
}

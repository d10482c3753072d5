// Fuzz target: task references and names (delta_store/store.h ParseRef, FormatRef, IsValidName, IsValidLabel,
// CheckName), which every inference, store and tuning request carries.
//
// Input layout: byte 0 picks the default tenant ("" when even, "acme" when odd), the rest is the text.
// Invariants: ParseRef errors are INVALID_ARGUMENT; a parsed ref names a valid tenant and task (or only a digest),
// has at most one selector, and FormatRef / ParseRef round-trip it; a valid label is a valid name; CheckName
// agrees with IsValidName.
#include <cstddef>
#include <cstdint>
#include <string>

#include "delta_store/store.h"
#include "server/common/sha256.h"
#include "tests/fuzz/fuzz_util.h"

namespace deltaserve {
namespace {

void FuzzOne(absl::string_view input) {
  absl::string_view default_tenant;
  if (!input.empty()) {
    default_tenant = (input[0] & 1) != 0 ? "acme" : "";
    input.remove_prefix(1);
  }
  const bool valid_name = store::IsValidName(input);
  FUZZ_CHECK(store::CheckName("task", input).ok() == valid_name);
  if (store::IsValidLabel(input)) FUZZ_CHECK(valid_name);

  absl::StatusOr<store::Ref> ref = store::ParseRef(input, default_tenant);
  if (!ref.ok()) {
    FUZZ_CHECK(ref.status().code() == absl::StatusCode::kInvalidArgument);
    return;
  }
  const int selectors = (ref->version > 0) + !ref->label.empty() + !ref->digest.empty();
  FUZZ_CHECK(selectors <= 1);
  FUZZ_CHECK(ref->version >= 0);
  if (!ref->digest.empty()) FUZZ_CHECK(IsSha256Digest(ref->digest));
  if (!ref->label.empty()) FUZZ_CHECK(store::IsValidLabel(ref->label));
  if (ref->tenant.empty() && ref->task.empty()) {
    FUZZ_CHECK(!ref->digest.empty());
  } else {
    FUZZ_CHECK(store::IsValidName(ref->tenant));
    FUZZ_CHECK(store::IsValidName(ref->task));
  }

  const std::string text = store::FormatRef(*ref);
  absl::StatusOr<store::Ref> again = store::ParseRef(text, "");
  FUZZ_CHECK(again.ok());
  FUZZ_CHECK(again->tenant == ref->tenant && again->task == ref->task && again->version == ref->version &&
             again->label == ref->label && again->digest == ref->digest);
  FUZZ_CHECK(store::FormatRef(*again) == text);
}

}  // namespace
}  // namespace deltaserve

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  deltaserve::FuzzOne(deltaserve::fuzz::AsView(data, size));
  return 0;
}

// Names and textual references (store.h).
#include <cstdint>
#include <string>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "delta_store/store.h"
#include "server/common/sha256.h"

namespace deltaserve {
namespace store {
namespace {

constexpr size_t kMaxNameLength = 64;
constexpr char kNameRule[] =
    "names are 1-64 characters of lowercase letters, digits, '.', '_' and '-', starting with a letter or digit";

// `text` quoted for an error message: escaped, and cut short when long.
std::string Quote(absl::string_view text) {
  constexpr size_t kMaxShown = 80;
  std::string shown = absl::CHexEscape(text.substr(0, kMaxShown));
  return absl::StrCat("\"", shown, text.size() > kMaxShown ? "...\"" : "\"");
}

bool IsNameChar(char c) { return absl::ascii_islower(c) || absl::ascii_isdigit(c) || c == '.' || c == '_' || c == '-'; }

}  // namespace

bool IsValidName(absl::string_view name) {
  if (name.empty() || name.size() > kMaxNameLength) return false;
  if (!absl::ascii_islower(name[0]) && !absl::ascii_isdigit(name[0])) return false;
  for (char c : name) {
    if (!IsNameChar(c)) return false;
  }
  return true;
}

bool IsValidLabel(absl::string_view label) {
  if (!IsValidName(label)) return false;
  for (char c : label) {
    if (!absl::ascii_isdigit(c)) return true;
  }
  return false;  // all digits: it would read as a version number
}

absl::Status CheckName(absl::string_view what, absl::string_view name) {
  if (IsValidName(name)) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(what, " ", Quote(name), " is not a valid name: ", kNameRule));
}

absl::StatusOr<Ref> ParseRef(absl::string_view text, absl::string_view default_tenant) {
  auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat(
        "reference ", Quote(text), " ", why,
        "; write sha256:<hex>, task, tenant/task, tenant/task@<version>, tenant/task:<label> or "
        "tenant/task@sha256:<hex>"));
  };
  Ref ref;
  if (absl::StartsWith(text, "sha256:")) {
    if (!IsSha256Digest(text)) return bad("is not a valid digest (sha256: and 64 lowercase hex digits)");
    ref.digest = std::string(text);
    return ref;
  }

  // Split off the selector: the first '@' or ':' (names contain neither).
  absl::string_view name = text;
  absl::string_view selector;
  char kind = 0;
  size_t pos = text.find_first_of("@:");
  if (pos != absl::string_view::npos) {
    kind = text[pos];
    name = text.substr(0, pos);
    selector = text.substr(pos + 1);
  }
  size_t slash = name.find('/');
  if (slash == absl::string_view::npos) {
    if (default_tenant.empty()) return bad("names no tenant and there is no default tenant");
    ref.tenant = std::string(default_tenant);
    ref.task = std::string(name);
  } else {
    ref.tenant = std::string(name.substr(0, slash));
    ref.task = std::string(name.substr(slash + 1));
  }
  if (!IsValidName(ref.tenant)) return bad(absl::StrCat("has an invalid tenant ", Quote(ref.tenant), ": ", kNameRule));
  if (!IsValidName(ref.task)) return bad(absl::StrCat("has an invalid task ", Quote(ref.task), ": ", kNameRule));

  if (kind == '@') {
    if (absl::StartsWith(selector, "sha256:")) {
      if (!IsSha256Digest(selector)) return bad("has an invalid digest (sha256: and 64 lowercase hex digits)");
      ref.digest = std::string(selector);
    } else {
      bool all_digits = !selector.empty();
      for (char c : selector) all_digits = all_digits && absl::ascii_isdigit(c);
      int64_t version = 0;
      if (!all_digits || !absl::SimpleAtoi(selector, &version) || version <= 0) {
        return bad("has an invalid version (a number from 1)");
      }
      ref.version = version;
    }
  } else if (kind == ':') {
    if (!IsValidLabel(selector)) {
      return bad(absl::StrCat("has an invalid label ", Quote(selector), ": ", kNameRule, ", not all digits"));
    }
    ref.label = std::string(selector);
  }
  return ref;
}

std::string FormatRef(const Ref& ref) {
  if (ref.tenant.empty() && ref.task.empty()) return ref.digest;
  std::string text = absl::StrCat(ref.tenant, "/", ref.task);
  if (ref.version > 0) return absl::StrCat(text, "@", ref.version);
  if (!ref.digest.empty()) return absl::StrCat(text, "@", ref.digest);
  if (!ref.label.empty()) return absl::StrCat(text, ":", ref.label);
  return text;
}

}  // namespace store
}  // namespace deltaserve

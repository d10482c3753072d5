#include "server/delta/module_patterns.h"

#include <algorithm>
#include <cstdint>
#include <regex>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace deltaserve {
namespace delta {
namespace {

constexpr absl::string_view kRegexPrefix = "re:";

bool IsRegex(absl::string_view pattern) { return absl::StartsWith(pattern, kRegexPrefix); }

// Compiles the regex part of a "re:" pattern. Returns an error message in `*error` when malformed.
bool CompileRegex(absl::string_view pattern, std::regex* out, std::string* error) {
  try {
    *out = std::regex(std::string(pattern.substr(kRegexPrefix.size())), std::regex::ECMAScript);
    return true;
  } catch (const std::regex_error& e) {
    if (error != nullptr) *error = e.what();
    return false;
  } catch (const std::exception& e) {
    if (error != nullptr) *error = e.what();
    return false;
  }
}

bool RegexFullMatch(const std::regex& re, absl::string_view name) {
  try {
    return std::regex_match(name.begin(), name.end(), re);
  } catch (const std::exception&) {  // e.g. error_complexity / error_stack on pathological patterns
    return false;
  }
}

bool LiteralMatches(absl::string_view pattern, absl::string_view name) {
  if (pattern.empty()) return false;
  if (pattern == name) return true;
  return name.size() > pattern.size() && absl::EndsWith(name, pattern) && name[name.size() - pattern.size() - 1] == '.';
}

bool KindIn(model::ModuleKind kind, const std::vector<model::ModuleKind>& kinds) {
  return std::find(kinds.begin(), kinds.end(), kind) != kinds.end();
}

size_t EditDistance(absl::string_view a, absl::string_view b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t sub = prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, sub});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

// The last `k` dotted components of `name` (all of it when it has no more than k).
absl::string_view LastComponents(absl::string_view name, size_t k) {
  size_t start = name.size();
  for (size_t seen = 0; seen < k; ++seen) {
    const size_t dot = start == 0 ? absl::string_view::npos : name.rfind('.', start - 1);
    if (dot == absl::string_view::npos) return name;
    start = dot;
  }
  return name.substr(start + 1);
}

std::string KindsString(const std::vector<model::ModuleKind>& kinds) {
  return absl::StrJoin(kinds, "/",
                       [](std::string* out, model::ModuleKind k) { absl::StrAppend(out, model::ModuleKindName(k)); });
}

}  // namespace

bool PatternMatches(absl::string_view pattern, absl::string_view name) {
  if (IsRegex(pattern)) {
    std::regex re;
    if (!CompileRegex(pattern, &re, nullptr)) return false;
    return RegexFullMatch(re, name);
  }
  return LiteralMatches(pattern, name);
}

absl::Status ValidatePattern(absl::string_view pattern) {
  if (pattern.empty()) return absl::InvalidArgumentError("empty module pattern");
  if (IsRegex(pattern)) {
    if (pattern.size() == kRegexPrefix.size()) {
      return absl::InvalidArgumentError("module pattern \"re:\" has an empty regular expression");
    }
    std::regex re;
    std::string error;
    if (!CompileRegex(pattern, &re, &error)) {
      return absl::InvalidArgumentError(
          absl::StrCat("module pattern \"", pattern, "\" is not a valid regular expression: ", error));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<const model::ModuleInfo*>> ResolveTargets(const std::vector<std::string>& patterns,
                                                                     const model::Model& model,
                                                                     const std::vector<model::ModuleKind>& kinds) {
  const std::vector<model::ModuleInfo>& modules = model.modules();
  std::vector<bool> selected(modules.size(), false);
  for (const std::string& pattern : patterns) {
    if (absl::Status s = ValidatePattern(pattern); !s.ok()) return s;
    std::regex re;
    const bool regex = IsRegex(pattern);
    if (regex && !CompileRegex(pattern, &re, nullptr)) {
      return absl::InvalidArgumentError(absl::StrCat("module pattern \"", pattern, "\" is not valid"));
    }
    bool any = false;
    for (size_t i = 0; i < modules.size(); ++i) {
      if (!KindIn(modules[i].kind, kinds)) continue;
      const bool match = regex ? RegexFullMatch(re, modules[i].name) : LiteralMatches(pattern, modules[i].name);
      if (match) {
        selected[i] = true;
        any = true;
      }
    }
    if (!any) {
      const std::vector<std::string> closest = ClosestModuleNames(pattern, model, kinds, 5);
      std::string msg = absl::StrCat("module pattern \"", pattern, "\" matches no ", KindsString(kinds),
                                     " module of model ", model.info().name);
      if (closest.empty()) {
        absl::StrAppend(&msg, " (the model has no module of these kinds)");
      } else {
        absl::StrAppend(&msg, "; closest: ", absl::StrJoin(closest, ", "));
      }
      return absl::InvalidArgumentError(msg);
    }
  }
  std::vector<const model::ModuleInfo*> out;
  for (size_t i = 0; i < modules.size(); ++i) {
    if (selected[i]) out.push_back(&modules[i]);
  }
  return out;
}

std::vector<std::string> ClosestModuleNames(absl::string_view name, const model::Model& model,
                                            const std::vector<model::ModuleKind>& kinds, int n) {
  if (IsRegex(name)) name.remove_prefix(kRegexPrefix.size());
  // A pattern of k dotted components is compared with the full name and with the name's last k components (the
  // dotted suffix it would match), so that a short typo ("querry") finds the modules it was meant to suffix.
  const size_t components = static_cast<size_t>(std::count(name.begin(), name.end(), '.')) + 1;
  std::vector<std::pair<size_t, size_t>> scored;  // (distance, module index)
  const std::vector<model::ModuleInfo>& modules = model.modules();
  for (size_t i = 0; i < modules.size(); ++i) {
    if (!KindIn(modules[i].kind, kinds)) continue;
    const absl::string_view full = modules[i].name;
    size_t distance = EditDistance(name, full);
    const absl::string_view suffix = LastComponents(full, components);
    if (suffix.size() < full.size()) distance = std::min(distance, EditDistance(name, suffix));
    scored.emplace_back(distance, i);
  }
  std::stable_sort(scored.begin(), scored.end());
  std::vector<std::string> out;
  for (size_t i = 0; i < scored.size() && static_cast<int>(i) < n; ++i) {
    out.push_back(modules[scored[i].second].name);
  }
  return out;
}

}  // namespace delta
}  // namespace deltaserve

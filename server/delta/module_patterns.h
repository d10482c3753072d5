// Target patterns: how a delta names the modules it changes (like OpenDelta's `modified_modules` and PEFT's
// `target_modules`).
//
// A pattern matches a module name when it
//   - equals the name ("encoder.layer.0.attention.self.query"),
//   - is a dotted suffix of it ("query", "attention.self.query", "output.dense"), or
//   - starts with "re:" and the rest fully matches the name as an ECMAScript regular expression
//     ("re:encoder\.layer\.[0-5]\..*\.query").
// Stateless functions: thread-safe.
#ifndef DELTASERVE_SERVER_DELTA_MODULE_PATTERNS_H_
#define DELTASERVE_SERVER_DELTA_MODULE_PATTERNS_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/model/model.h"

namespace deltaserve {
namespace delta {

// True when `pattern` matches `name`. A malformed "re:" pattern matches nothing (ValidatePattern reports it).
bool PatternMatches(absl::string_view pattern, absl::string_view name);

// INVALID_ARGUMENT for an empty pattern or a "re:" pattern that is not a valid regular expression.
absl::Status ValidatePattern(absl::string_view pattern);

// The modules of `model` of one of `kinds` that any of `patterns` matches, in the model's module order.
// INVALID_ARGUMENT when a pattern is malformed, or when a pattern matches no module of those kinds: the message
// names the pattern, the kinds, and the (up to 5) closest module names of those kinds by edit distance.
absl::StatusOr<std::vector<const model::ModuleInfo*>> ResolveTargets(const std::vector<std::string>& patterns,
                                                                     const model::Model& model,
                                                                     const std::vector<model::ModuleKind>& kinds);

// Up to `n` module names of `model` (of `kinds`) closest to `name`, best first: each name scores the smaller edit
// distance of its full name and of its last k dotted parts (k = parts of `name`), so "querry" finds "...query".
std::vector<std::string> ClosestModuleNames(absl::string_view name, const model::Model& model,
                                            const std::vector<model::ModuleKind>& kinds, int n = 5);

}  // namespace delta
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_DELTA_MODULE_PATTERNS_H_

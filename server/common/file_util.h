// Small file helpers shared by the model loaders, tokenizers and converters.
//
// Stateless functions: thread-safe. No LibTorch dependency.
#ifndef DELTASERVE_SERVER_COMMON_FILE_UTIL_H_
#define DELTASERVE_SERVER_COMMON_FILE_UTIL_H_

#include <sys/types.h>

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"

namespace deltaserve {

// True when `path` names a regular file.
bool FileExists(const std::string& path);

// The whole file. NOT_FOUND "<path> is missing or unreadable", INVALID_ARGUMENT on a read error.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

// A file holding one JSON value, parsed without exceptions. Errors name the path: NOT_FOUND (missing),
// INVALID_ARGUMENT "<path> is not valid JSON".
absl::StatusOr<nlohmann::json> ReadJsonFile(const std::string& path);
// Same, and the value must be an object: INVALID_ARGUMENT "<path> is not a JSON object" otherwise.
absl::StatusOr<nlohmann::json> ReadJsonObject(const std::string& path);

// Writes `data` to a fresh "<path>.tmp.XXXXXX" with permissions `mode`, fsyncs it, renames it over `path` and
// fsyncs the directory, so readers (and a machine that loses power) see the old or the new file, never a partial
// one, and concurrent writers never share a temporary file. Errors name the path and the system error.
absl::Status WriteFileAtomically(const std::string& path, absl::string_view data, mode_t mode = 0644);

}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_COMMON_FILE_UTIL_H_

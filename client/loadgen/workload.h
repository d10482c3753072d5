// The load generator's workload: the texts requests carry and the names of the tasks it registers.
//
// Pure functions (LoadTexts reads one file); thread-safe.
#ifndef DELTASERVE_CLIENT_LOADGEN_WORKLOAD_H_
#define DELTASERVE_CLIENT_LOADGEN_WORKLOAD_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace deltaserve {
namespace loadgen {

// Sentences shipped with the load generator, for when no text file is given.
const std::vector<std::string>& BuiltinTexts();

// The first column of each line of a text or TSV file (GLUE's train.tsv: "sentence<TAB>label"; a header line
// "sentence" / "text" is skipped), at most `max_texts` non-empty ones. NOT_FOUND when the file cannot be read,
// INVALID_ARGUMENT when it holds no text.
absl::StatusOr<std::vector<std::string>> LoadTexts(const std::string& path, int64_t max_texts = 100000);

// Where the load generator's task `index` lives: with `num_tenants` == 0 every task belongs to the default tenant
// (""), else tasks are dealt round-robin to tenants "<prefix>tenant-0" ... "<prefix>tenant-<num_tenants-1>".
struct TaskName {
  std::string tenant;
  std::string task;
};
// Task names are "<prefix>task-<index, 5 digits>" ("lg-task-00042").
TaskName NameTask(const std::string& prefix, int64_t index, int num_tenants);

}  // namespace loadgen
}  // namespace deltaserve

#endif  // DELTASERVE_CLIENT_LOADGEN_WORKLOAD_H_

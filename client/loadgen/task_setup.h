// The load generator's setup phase: makes one delta pack per task (pack_gen.h) and pushes it to the server as
// the latest version of its task, several pushes at once. Re-running it with the same options adds nothing: the
// packs' bytes are the same, so the server answers "already stored".
//
// Thread-safe (stateless); PushLoadPacks blocks and owns its pusher threads for the call.
#ifndef DELTASERVE_CLIENT_LOADGEN_TASK_SETUP_H_
#define DELTASERVE_CLIENT_LOADGEN_TASK_SETUP_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/client.h"
#include "client/loadgen/pack_gen.h"
#include "server/model/model.h"

namespace deltaserve {
namespace loadgen {

struct SetupOptions {
  // Tasks to register: indices 0 .. num_tasks-1, named by NameTask(prefix, i, num_tenants).
  int64_t num_tasks = 100;
  // Task i gets recipes[i % recipes.size()]. REQUIRES: non-empty.
  std::vector<Recipe> recipes = MixedRecipes();
  // Prefix of task (and tenant) names.
  std::string prefix = "lg-";
  // Tenants the tasks are dealt to (0 = all in the default tenant).
  int num_tenants = 0;
  // Pushes in flight at once.
  int threads = 2;
  // Pack i's weights come from seed + i.
  uint64_t seed = 1;
  // Sizes of the generated methods.
  PackGenOptions packs;
  // Called after each push (from pusher threads, serialized): done, total.
  std::function<void(int64_t done, int64_t total)> progress;
};

struct SetupReport {
  int64_t created = 0;   // new versions stored
  int64_t existing = 0;  // packs the server already held as the task's version
  std::map<std::string, int64_t> tasks_by_recipe;  // "lora+bitfit" -> tasks
  int64_t pack_bytes = 0;                          // serialized bytes of all packs
  double seconds = 0;
};

// Pushes the packs of `options` through `client`; the first failed push ends the setup with its status (plus the
// task's name). REQUIRES: `model` is the model the server serves (same fingerprint).
absl::StatusOr<SetupReport> PushLoadPacks(client::DeltaserveClient& client, const model::Model& model,
                                          const SetupOptions& options);

}  // namespace loadgen
}  // namespace deltaserve

#endif  // DELTASERVE_CLIENT_LOADGEN_TASK_SETUP_H_

#include "client/loadgen/task_setup.h"

#include <algorithm>
#include <atomic>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "client/loadgen/workload.h"

namespace deltaserve {
namespace loadgen {

absl::StatusOr<SetupReport> PushLoadPacks(client::DeltaserveClient& client, const model::Model& model,
                                          const SetupOptions& options) {
  if (options.recipes.empty()) return absl::InvalidArgumentError("setup: no pack recipes");
  if (options.num_tasks < 0) return absl::InvalidArgumentError("setup: negative number of tasks");
  const absl::Time start = absl::Now();
  SetupReport report;
  for (int64_t i = 0; i < options.num_tasks; ++i) {
    ++report.tasks_by_recipe[RecipeName(options.recipes[static_cast<size_t>(i) % options.recipes.size()])];
  }
  std::atomic<int64_t> next{0};
  absl::Mutex mu;
  absl::Status first_error;  // guarded by mu
  int64_t done = 0;          // guarded by mu
  auto push_some = [&] {
    while (true) {
      const int64_t i = next.fetch_add(1);
      if (i >= options.num_tasks) return;
      {
        absl::MutexLock lock(&mu);
        if (!first_error.ok()) return;
      }
      const Recipe& recipe = options.recipes[static_cast<size_t>(i) % options.recipes.size()];
      const TaskName name = NameTask(options.prefix, i, options.num_tenants);
      absl::StatusOr<std::string> bytes =
          MakeLoadPack(model, recipe, options.seed + static_cast<uint64_t>(i),
                       absl::StrCat(options.prefix, RecipeName(recipe), "-", i), options.packs);
      absl::StatusOr<deltaserve::v1::PushDeltaResponse> pushed = absl::UnknownError("not pushed");
      if (bytes.ok()) {
        deltaserve::v1::PushDeltaHeader header;
        header.set_tenant(name.tenant);
        header.set_task(name.task);
        pushed = client.PushDelta(header, *bytes);
      } else {
        pushed = bytes.status();
      }
      absl::MutexLock lock(&mu);
      if (!pushed.ok()) {
        if (first_error.ok()) {
          first_error = absl::Status(pushed.status().code(),
                                     absl::StrCat("setup: pushing ", name.tenant.empty() ? "" : name.tenant + "/",
                                                  name.task, ": ", pushed.status().message()));
        }
        return;
      }
      report.pack_bytes += static_cast<int64_t>(bytes->size());
      (pushed->created() ? report.created : report.existing) += 1;
      ++done;
      if (options.progress) options.progress(done, options.num_tasks);
    }
  };
  std::vector<std::thread> threads;
  const int n = static_cast<int>(std::clamp<int64_t>(options.threads, 1, std::max<int64_t>(1, options.num_tasks)));
  for (int t = 0; t < n; ++t) threads.emplace_back(push_some);
  for (std::thread& t : threads) t.join();
  if (!first_error.ok()) return first_error;
  report.seconds = absl::ToDoubleSeconds(absl::Now() - start);
  return report;
}

}  // namespace loadgen
}  // namespace deltaserve

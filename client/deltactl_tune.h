// The `deltactl tune` subcommands (fine-tuning jobs), split from deltactl.cc. Their flags (--data, --method, ...)
// are defined in deltactl_tune.cc; the shared ones (--task, --label, --tenant, --json) are read by deltactl.cc
// and passed in a TuneContext.
#ifndef DELTASERVE_CLIENT_DELTACTL_TUNE_H_
#define DELTASERVE_CLIENT_DELTACTL_TUNE_H_

#include <functional>
#include <string>
#include <vector>

#include "client/client.h"
#include "nlohmann/json.hpp"

namespace deltaserve {
namespace client {

struct TuneContext {
  std::string tenant;
  std::string task;
  std::vector<std::string> labels;
  bool json = false;
  // Prints a JSON result (honours --pretty).
  std::function<void(const nlohmann::json&)> print;
};

// args: what follows "tune" on the command line. Returns the process exit code (0 ok, 1 error, 2 usage; `tune
// watch` and `tune submit --watch` return 1 unless the job succeeded).
int TuneCommand(DeltaserveClient& client, const TuneContext& ctx, const std::vector<std::string>& args);

}  // namespace client
}  // namespace deltaserve

#endif  // DELTASERVE_CLIENT_DELTACTL_TUNE_H_

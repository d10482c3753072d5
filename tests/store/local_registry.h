// LocalRegistry: a real OCI registry for tests: Debian's `docker-registry` serving 127.0.0.1 on a free port, with
// its storage in a fresh temporary directory and deletes enabled. The process is killed with the test process
// (PR_SET_PDEATHSIG) and stopped by the destructor. Not thread-safe.
#ifndef DELTASERVE_TESTS_STORE_LOCAL_REGISTRY_H_
#define DELTASERVE_TESTS_STORE_LOCAL_REGISTRY_H_

#include <sys/types.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace deltaserve {
namespace store {

class LocalRegistry {
 public:
  // The docker-registry binary on PATH, or "" when it is not installed.
  static std::string FindBinary();
  // What a test says when it skips for want of the binary.
  static constexpr char kSkipMessage[] =
      "docker-registry is not installed; install it (apt-get install docker-registry) to run the OCI registry "
      "store tests";

  // Starts a registry and waits until GET /v2/ answers. FAILED_PRECONDITION when the binary is missing;
  // UNAVAILABLE (with the registry's log) when it does not come up.
  static absl::StatusOr<std::unique_ptr<LocalRegistry>> Start();
  ~LocalRegistry();
  LocalRegistry(const LocalRegistry&) = delete;
  LocalRegistry& operator=(const LocalRegistry&) = delete;

  // "http://127.0.0.1:<port>".
  const std::string& url() const { return url_; }
  // Stops the process (SIGTERM, then waits); the storage stays.
  void Stop();
  // Starts it again on the same port and storage.
  absl::Status Restart();

 private:
  LocalRegistry(std::string dir, int port);
  absl::Status Launch();

  const std::string dir_;  // config.yml, data/, registry.log
  const int port_;
  const std::string url_;
  pid_t pid_ = -1;
};

}  // namespace store
}  // namespace deltaserve

#endif  // DELTASERVE_TESTS_STORE_LOCAL_REGISTRY_H_

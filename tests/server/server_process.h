// Test helpers that run real processes: a `deltaserve` server on free ports on 127.0.0.1, and any command with
// its output captured.
//
// ServerProcess owns the child process and its scratch directory; the destructor kills the child (SIGKILL) if it
// still runs, and the kernel kills it (PR_SET_PDEATHSIG) if the test dies first — so start a server from a thread
// that outlives it (the test's main thread). Not thread-safe: use one from one thread (the server itself is called from many).
#ifndef DELTASERVE_TESTS_SERVER_SERVER_PROCESS_H_
#define DELTASERVE_TESTS_SERVER_SERVER_PROCESS_H_

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/client.h"

namespace deltaserve {
namespace testing {

// Where things are: the source tree, the build tree, the binaries.
std::string SourceDir();
std::string BinaryDir();
std::string DeltaserveBinary();
std::string DeltactlBinary();
// The converted default model: $DS_USE_LITE_DIR, else <source>/models/use-lite; "" when absent.
std::string UseLiteModelDir();
// <source>/../shared/data when it exists, else "".
std::string SharedDataDir();
// A fresh temporary directory.
std::string MakeTempDir();

class ServerProcess {
 public:
  // Starts deltaserve with `args` (plus --listen / --metrics_listen on free ports and --port_file) and waits
  // until it serves (port file written and health SERVING) or `timeout` passes. The health check connects with
  // `client` (its target and timeout are set here): give it the TLS files when `args` turn TLS on.
  static absl::StatusOr<std::unique_ptr<ServerProcess>> Start(const std::vector<std::string>& args,
                                                              absl::Duration timeout = absl::Seconds(120),
                                                              client::DeltaserveClient::Options client = {});
  // Starts deltaserve with `args` (plus --port_file only) and returns at once, without waiting for it to serve:
  // for tests of what happens before it is ready. port() and friends stay 0.
  static absl::StatusOr<std::unique_ptr<ServerProcess>> Launch(const std::vector<std::string>& args);
  ~ServerProcess();

  int port() const { return port_; }
  int metrics_port() const { return metrics_port_; }
  // The --health_listen port (0 when the server has none).
  int health_port() const { return health_port_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  pid_t pid() const { return pid_; }
  // Sends `sig` and waits for the exit; returns the exit status (128 + signal when killed).
  int Stop(int sig, absl::Duration timeout = absl::Seconds(60));
  // Sends `sig` without waiting.
  void Signal(int sig);
  // Waits up to `timeout` for the process to exit by itself; its exit status, or -1 while it still runs.
  int WaitExit(absl::Duration timeout);
  // What the server wrote to stderr/stdout so far.
  std::string Log() const;

 private:
  ServerProcess() = default;
  pid_t pid_ = -1;
  int port_ = 0;
  int metrics_port_ = 0;
  int health_port_ = 0;
  std::string dir_;
};

struct CommandResult {
  int exit_code = -1;  // 128 + signal when killed
  std::string out;
  std::string err;
};
// Runs `argv` with `input` on stdin and waits up to `timeout`.
CommandResult RunCommand(const std::vector<std::string>& argv, const std::string& input = "",
                         absl::Duration timeout = absl::Seconds(120));

// A free TCP port on 127.0.0.1 (bound and released: another process may take it before the caller, rarely);
// -1 when none could be bound. For servers whose port must be known before they start.
int FreePort();

// A plain HTTP GET to 127.0.0.1:port; returns the whole response (status line, headers, body).
std::string HttpGet(int port, const std::string& path);

}  // namespace testing
}  // namespace deltaserve

#endif  // DELTASERVE_TESTS_SERVER_SERVER_PROCESS_H_

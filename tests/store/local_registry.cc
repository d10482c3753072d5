// LocalRegistry (local_registry.h): starts and stops a docker-registry process for tests.
#include "tests/store/local_registry.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "delta_store/registry_client.h"
#include "server/common/file_util.h"
#include "server/common/status_macros.h"

namespace deltaserve {
namespace store {
namespace {

// A port nothing listens on right now (the kernel's pick).
absl::StatusOr<int> FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return absl::UnavailableError("socket() failed");
  sockaddr_in addr = {};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  int port = -1;
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  close(fd);
  if (port < 0) return absl::UnavailableError("cannot find a free port on 127.0.0.1");
  return port;
}

}  // namespace

std::string LocalRegistry::FindBinary() {
  const char* path = getenv("PATH");
  std::vector<std::string> dirs = absl::StrSplit(path != nullptr ? path : "", ':', absl::SkipEmpty());
  for (const std::string& dir : dirs) {
    std::string candidate = absl::StrCat(dir, "/docker-registry");
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

absl::StatusOr<std::unique_ptr<LocalRegistry>> LocalRegistry::Start() {
  if (FindBinary().empty()) return absl::FailedPreconditionError(kSkipMessage);
  const char* tmp = getenv("TMPDIR");
  // A port can be taken between our probe and the registry's bind: try a few.
  absl::Status last;
  for (int attempt = 0; attempt < 3; ++attempt) {
    std::string dir = absl::StrCat(tmp != nullptr && tmp[0] != '\0' ? tmp : "/tmp", "/ds-registry.XXXXXX");
    if (mkdtemp(dir.data()) == nullptr) return absl::UnavailableError("cannot create a directory for the registry");
    DS_ASSIGN_OR_RETURN(int port, FreePort());
    std::unique_ptr<LocalRegistry> registry(new LocalRegistry(dir, port));
    last = registry->Launch();
    if (last.ok()) return registry;
  }
  return last;
}

LocalRegistry::LocalRegistry(std::string dir, int port)
    : dir_(std::move(dir)), port_(port), url_(absl::StrCat("http://127.0.0.1:", port)) {}

LocalRegistry::~LocalRegistry() {
  Stop();
  std::error_code ignored;
  std::filesystem::remove_all(dir_, ignored);
}

absl::Status LocalRegistry::Launch() {
  const std::string config = absl::StrCat(dir_, "/config.yml");
  DS_RETURN_IF_ERROR(WriteFileAtomically(config, absl::StrCat(R"(version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: )",
                                                              dir_, R"(/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:)",
                                                              port_, "\n")));
  const std::string binary = FindBinary();
  const std::string log = absl::StrCat(dir_, "/registry.log");
  const pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0) return absl::UnavailableError("fork failed");
  if (pid == 0) {  // only async-signal-safe calls until exec
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);
    int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    execl(binary.c_str(), binary.c_str(), "serve", config.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  pid_ = pid;

  RegistryClientOptions options;
  options.url = url_;
  options.connect_timeout = absl::Milliseconds(200);
  options.request_timeout = absl::Seconds(2);
  DS_ASSIGN_OR_RETURN(std::unique_ptr<RegistryClient> client, RegistryClient::Create(options));
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (absl::Now() < deadline) {
    if (client->Ping().ok()) return absl::OkStatus();
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      break;
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
  absl::StatusOr<std::string> text = ReadFileToString(log);
  return absl::UnavailableError(
      absl::StrCat("docker-registry did not come up on ", url_, "; its log:\n", text.ok() ? *text : "(none)"));
}

void LocalRegistry::Stop() {
  if (pid_ <= 0) return;
  kill(pid_, SIGTERM);
  int status = 0;
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (waitpid(pid_, &status, WNOHANG) == 0) {
    if (absl::Now() > deadline) {
      kill(pid_, SIGKILL);
      waitpid(pid_, &status, 0);
      break;
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  pid_ = -1;
}

absl::Status LocalRegistry::Restart() {
  Stop();
  return Launch();
}

}  // namespace store
}  // namespace deltaserve

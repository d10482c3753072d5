#include "tests/server/server_process.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/client.h"

namespace deltaserve {
namespace testing {
namespace {

std::string Env(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v ? std::string(v) : fallback;
}

bool Exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

int ExitCode(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

// Waits for `pid` up to `timeout`; returns the exit code, or -1 if it is still running.
int WaitFor(pid_t pid, absl::Duration timeout) {
  const absl::Time end = absl::Now() + timeout;
  while (true) {
    int status = 0;
    pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) return ExitCode(status);
    if (r < 0) return -1;
    if (absl::Now() >= end) return -1;
    absl::SleepFor(absl::Milliseconds(10));
  }
}

pid_t Spawn(const std::vector<std::string>& argv, int in_fd, int out_fd, int err_fd) {
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  const pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid == 0) {
    // The child dies with the test: a crashed or timed-out test binary leaves no server running. (The signal
    // fires when the forking *thread* exits: start servers from a thread that outlives them, as the tests do.)
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);  // the test died before prctl
    if (in_fd >= 0) ::dup2(in_fd, 0);
    ::dup2(out_fd, 1);
    ::dup2(err_fd, 2);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  return pid;
}

}  // namespace

std::string SourceDir() { return Env("DS_SOURCE_DIR", DS_SOURCE_DIR); }
std::string BinaryDir() { return Env("DS_BINARY_DIR", DS_BINARY_DIR); }
std::string DeltaserveBinary() { return BinaryDir() + "/server/deltaserve"; }
std::string DeltactlBinary() { return BinaryDir() + "/client/deltactl"; }

std::string UseLiteModelDir() {
  const std::string dir = Env("DS_USE_LITE_DIR", SourceDir() + "/models/use-lite");
  return Exists(dir + "/model.safetensors") ? dir : "";
}

std::string SharedDataDir() {
  const std::string dir = SourceDir() + "/../shared/data";
  return Exists(dir) ? dir : "";
}

std::string MakeTempDir() {
  std::string pattern = (std::getenv("TMPDIR") ? std::string(std::getenv("TMPDIR")) : "/tmp") + "/dstest.XXXXXX";
  char* dir = ::mkdtemp(pattern.data());
  return dir ? std::string(dir) : "";
}

absl::StatusOr<std::unique_ptr<ServerProcess>> ServerProcess::Launch(const std::vector<std::string>& args) {
  std::unique_ptr<ServerProcess> server(new ServerProcess());
  server->dir_ = MakeTempDir();
  std::vector<std::string> argv = {DeltaserveBinary(), "--port_file=" + server->dir_ + "/ports"};
  argv.insert(argv.end(), args.begin(), args.end());
  const int log_fd = ::open((server->dir_ + "/log").c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  server->pid_ = Spawn(argv, -1, log_fd, log_fd);
  ::close(log_fd);
  if (server->pid_ < 0) return absl::InternalError("fork failed");
  return server;
}

void ServerProcess::Signal(int sig) {
  if (pid_ > 0) ::kill(pid_, sig);
}

int ServerProcess::WaitExit(absl::Duration timeout) {
  if (pid_ <= 0) return -1;
  const int code = WaitFor(pid_, timeout);
  if (code != -1) pid_ = -1;
  return code;
}

absl::StatusOr<std::unique_ptr<ServerProcess>> ServerProcess::Start(const std::vector<std::string>& args,
                                                                    absl::Duration timeout,
                                                                    client::DeltaserveClient::Options options) {
  std::unique_ptr<ServerProcess> server(new ServerProcess());
  server->dir_ = MakeTempDir();
  const std::string port_file = server->dir_ + "/ports";
  std::vector<std::string> argv = {DeltaserveBinary(), "--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0",
                                   "--port_file=" + port_file};
  argv.insert(argv.end(), args.begin(), args.end());
  const int log_fd = ::open((server->dir_ + "/log").c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  server->pid_ = Spawn(argv, -1, log_fd, log_fd);
  ::close(log_fd);
  if (server->pid_ < 0) return absl::InternalError("fork failed");

  const absl::Time end = absl::Now() + timeout;
  while (true) {
    int status = 0;
    if (::waitpid(server->pid_, &status, WNOHANG) == server->pid_) {
      server->pid_ = -1;
      return absl::FailedPreconditionError(
          absl::StrCat("deltaserve exited with ", ExitCode(status), " before serving:\n", server->Log()));
    }
    std::ifstream in(port_file);
    if (in >> server->port_ >> server->metrics_port_) {
      if (!(in >> server->health_port_)) server->health_port_ = 0;
      break;
    }
    if (absl::Now() >= end) return absl::DeadlineExceededError("deltaserve did not start:\n" + server->Log());
    absl::SleepFor(absl::Milliseconds(20));
  }
  options.target = server->address();
  options.timeout = absl::Seconds(2);
  client::DeltaserveClient client(options);
  while (true) {
    auto health = client.Health();
    if (health.ok() && *health == "SERVING") break;
    if (absl::Now() >= end) return absl::DeadlineExceededError("deltaserve never became SERVING:\n" + server->Log());
    absl::SleepFor(absl::Milliseconds(20));
  }
  return server;
}

ServerProcess::~ServerProcess() {
  if (pid_ > 0) {
    ::kill(pid_, SIGKILL);
    WaitFor(pid_, absl::Seconds(10));
  }
}

int ServerProcess::Stop(int sig, absl::Duration timeout) {
  if (pid_ <= 0) return -1;
  ::kill(pid_, sig);
  const int code = WaitFor(pid_, timeout);
  if (code != -1) pid_ = -1;
  return code;
}

std::string ServerProcess::Log() const { return ReadFile(dir_ + "/log"); }

CommandResult RunCommand(const std::vector<std::string>& argv, const std::string& input, absl::Duration timeout) {
  const std::string dir = MakeTempDir();
  {
    std::ofstream(dir + "/in", std::ios::binary) << input;
  }
  const int in_fd = ::open((dir + "/in").c_str(), O_RDONLY | O_CLOEXEC);
  const int out_fd = ::open((dir + "/out").c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  const int err_fd = ::open((dir + "/err").c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  const pid_t pid = Spawn(argv, in_fd, out_fd, err_fd);
  ::close(in_fd);
  ::close(out_fd);
  ::close(err_fd);
  CommandResult result;
  result.exit_code = WaitFor(pid, timeout);
  if (result.exit_code == -1) {
    ::kill(pid, SIGKILL);
    WaitFor(pid, absl::Seconds(10));
  }
  result.out = ReadFile(dir + "/out");
  result.err = ReadFile(dir + "/err");
  return result;
}

int FreePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  int port = -1;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  ::close(fd);
  return port;
}

std::string HttpGet(int port, const std::string& path) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return "";
  }
  const std::string request = absl::StrCat("GET ", path, " HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
  ::send(fd, request.data(), request.size(), 0);
  std::string out;
  char buf[8192];
  ssize_t n;
  while ((n = ::recv(fd, buf, sizeof(buf), 0)) > 0) out.append(buf, static_cast<size_t>(n));
  ::close(fd);
  return out;
}

}  // namespace testing
}  // namespace deltaserve

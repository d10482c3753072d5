#include "tests/server/test_certs.h"

#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace deltaserve {
namespace testing {
namespace {

// Extensions for each kind of certificate; also the config `openssl req` reads (so the system's openssl.cnf,
// which may be absent or unusual, plays no part).
constexpr char kConfig[] = R"([req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
)";

std::string Quote(const std::string& s) { return absl::StrCat("'", s, "'"); }

// Runs `command` with stderr folded into stdout; INTERNAL with the command and its output when it fails.
absl::Status Run(const std::string& command) {
  std::FILE* pipe = ::popen(absl::StrCat(command, " 2>&1").c_str(), "r");
  if (pipe == nullptr) return absl::InternalError(absl::StrCat("cannot run: ", command));
  std::string output;
  char buf[512];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), pipe)) > 0) output.append(buf, n);
  const int status = ::pclose(pipe);
  if (status == -1 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    return absl::InternalError(absl::StrCat("command failed (status ", status, "): ", command, "\n", output));
  }
  return absl::OkStatus();
}

constexpr char kNewKey[] = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";

// A self-signed CA certificate and its key: <dir>/<name>.pem, <dir>/<name>.key.
absl::Status MakeCa(const std::string& dir, const std::string& name, const std::string& common_name) {
  return Run(absl::StrCat("openssl req -x509 -new ", kNewKey, " -sha256 -days 30 -subj ", Quote("/CN=" + common_name),
                          " -config ", Quote(dir + "/openssl.cnf"), " -extensions ca -keyout ",
                          Quote(dir + "/" + name + ".key"), " -out ", Quote(dir + "/" + name + ".pem")));
}

// A leaf certificate <dir>/<name>.pem (extensions section `section`) and key, signed by <dir>/<ca>.pem.
absl::Status MakeLeaf(const std::string& dir, const std::string& name, const std::string& common_name,
                      const std::string& section, const std::string& ca, int serial) {
  const std::string csr = dir + "/" + name + ".csr";
  if (absl::Status st = Run(absl::StrCat("openssl req -new ", kNewKey, " -subj ", Quote("/CN=" + common_name),
                                         " -config ", Quote(dir + "/openssl.cnf"), " -keyout ",
                                         Quote(dir + "/" + name + ".key"), " -out ", Quote(csr)));
      !st.ok()) {
    return st;
  }
  return Run(absl::StrCat("openssl x509 -req -sha256 -days 30 -in ", Quote(csr), " -CA ",
                          Quote(dir + "/" + ca + ".pem"), " -CAkey ", Quote(dir + "/" + ca + ".key"),
                          " -set_serial ", serial, " -extfile ", Quote(dir + "/openssl.cnf"), " -extensions ",
                          section, " -out ", Quote(dir + "/" + name + ".pem")));
}

}  // namespace

bool OpenSslCommandAvailable() { return Run("openssl version").ok(); }

absl::StatusOr<TestCerts> MakeTestCerts(const std::string& dir_arg) {
  if (absl::StrContains(dir_arg, "'")) {
    return absl::InvalidArgumentError(absl::StrCat("certificate directory '", dir_arg,
                                                   "' has a quote in its name; use a plain temporary directory"));
  }
  if (!OpenSslCommandAvailable()) {
    return absl::FailedPreconditionError("the openssl command is not installed; install openssl to make test certs");
  }
  std::error_code ec;
  std::filesystem::create_directories(dir_arg, ec);
  const std::string dir = std::filesystem::absolute(dir_arg, ec).string();
  {
    std::ofstream config(dir + "/openssl.cnf", std::ios::trunc);
    config << kConfig;
    if (!config) return absl::InternalError(absl::StrCat("cannot write ", dir, "/openssl.cnf"));
  }
  if (absl::Status st = MakeCa(dir, "ca", "deltaserve-test-ca"); !st.ok()) return st;
  if (absl::Status st = MakeCa(dir, "rogue-ca", "deltaserve-rogue-ca"); !st.ok()) return st;
  if (absl::Status st = MakeLeaf(dir, "server", "localhost", "server", "ca", 1001); !st.ok()) return st;
  if (absl::Status st = MakeLeaf(dir, "client", "acme-client", "client", "ca", 1002); !st.ok()) return st;
  if (absl::Status st = MakeLeaf(dir, "other-client", "other-client", "client", "ca", 1003); !st.ok()) return st;
  if (absl::Status st = MakeLeaf(dir, "rogue-client", "rogue-client", "client", "rogue-ca", 1004); !st.ok()) {
    return st;
  }
  TestCerts certs;
  certs.dir = dir;
  certs.ca_cert = dir + "/ca.pem";
  certs.ca_key = dir + "/ca.key";
  certs.server_cert = dir + "/server.pem";
  certs.server_key = dir + "/server.key";
  certs.client_cert = dir + "/client.pem";
  certs.client_key = dir + "/client.key";
  certs.other_client_cert = dir + "/other-client.pem";
  certs.other_client_key = dir + "/other-client.key";
  certs.rogue_ca_cert = dir + "/rogue-ca.pem";
  certs.rogue_client_cert = dir + "/rogue-client.pem";
  certs.rogue_client_key = dir + "/rogue-client.key";
  return certs;
}

}  // namespace testing
}  // namespace deltaserve

// Test-only TLS material: MakeTestCerts() runs the `openssl` command to make a throwaway CA, a server certificate
// for localhost/127.0.0.1 and client certificates, as PEM files in a directory the caller owns. No LibTorch, no
// gRPC: link deltaserve::test_certs from any test (metrics HTTPS, gRPC TLS, mutual TLS).
//
//   if (!OpenSslCommandAvailable()) GTEST_SKIP() << "no openssl command";
//   ASSERT_OK_AND_ASSIGN(TestCerts certs, MakeTestCerts(dir));  // or .value() / .status() checks
//
// All keys are unencrypted EC P-256 (fast to make); certificates are valid from now for 30 days. Stateless and
// thread-compatible: concurrent calls must use different directories.
#ifndef DELTASERVE_TESTS_SERVER_TEST_CERTS_H_
#define DELTASERVE_TESTS_SERVER_TEST_CERTS_H_

#include <string>

#include "absl/status/statusor.h"

namespace deltaserve {
namespace testing {

// Absolute paths of the files MakeTestCerts wrote.
struct TestCerts {
  std::string dir;          // where they all are
  std::string ca_cert;      // ca.pem: the test CA (CN deltaserve-test-ca); signs server, client and other-client
  std::string ca_key;       // ca.key
  std::string server_cert;  // server.pem: CN localhost, SAN DNS:localhost and IP:127.0.0.1, serverAuth
  std::string server_key;   // server.key
  std::string client_cert;  // client.pem: CN acme-client, clientAuth, signed by ca.pem
  std::string client_key;   // client.key
  std::string other_client_cert;  // other-client.pem: CN other-client, clientAuth, signed by ca.pem
  std::string other_client_key;   // other-client.key
  std::string rogue_ca_cert;      // rogue-ca.pem: a second, unrelated CA (CN deltaserve-rogue-ca)
  std::string rogue_client_cert;  // rogue-client.pem: CN rogue-client, clientAuth, signed by rogue-ca.pem
  std::string rogue_client_key;   // rogue-client.key
};

// Whether the `openssl` command can be run (tests GTEST_SKIP without it).
bool OpenSslCommandAvailable();

// Writes the files listed in TestCerts into `dir` (created if missing; existing files of those names are
// replaced). INTERNAL with the failing command and its output when `openssl` fails; FAILED_PRECONDITION when the
// command is missing; INVALID_ARGUMENT for a directory name with a quote in it. REQUIRES: `dir` is writable.
absl::StatusOr<TestCerts> MakeTestCerts(const std::string& dir);

}  // namespace testing
}  // namespace deltaserve

#endif  // DELTASERVE_TESTS_SERVER_TEST_CERTS_H_

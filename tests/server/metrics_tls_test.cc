// HTTPS on the metrics port: certificates from tests/server/test_certs.h, checked with an OpenSSL client.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/metrics/http_server.h"
#include "tests/server/test_certs.h"

namespace deltaserve {
namespace metrics {
namespace {

using ::deltaserve::testing::MakeTestCerts;
using ::deltaserve::testing::OpenSslCommandAvailable;
using ::deltaserve::testing::TestCerts;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kGetMetrics[] = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

// A TCP connection to 127.0.0.1:port with 5 s receive/send timeouts (so a broken server fails the test instead of
// hanging it); -1 when it cannot connect.
int Connect(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  timeval tv{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// Sends `bytes` unencrypted and returns what comes back until the server closes.
std::string PlainExchange(int port, const std::string& bytes) {
  const int fd = Connect(port);
  if (fd < 0) return "connect failed";
  ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = ::recv(fd, buf, sizeof(buf), 0)) > 0) out.append(buf, static_cast<size_t>(n));
  ::close(fd);
  return out;
}

std::string OpenSslErrors() {
  std::string out;
  while (const unsigned long e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    absl::StrAppend(&out, out.empty() ? "" : "; ", buf);
  }
  return out;
}

struct TlsClient {
  std::string ca_file;                 // trust anchor for the server certificate; "" = do not verify it
  std::string verify_name = "127.0.0.1";  // IP address or DNS name the server certificate must be valid for
  std::string cert_file;               // client certificate; "" = none
  std::string key_file;
  int max_version = 0;  // e.g. TLS1_1_VERSION; 0 = library default
};

// Connects with TLS, sends `request`, and returns the whole response; an error when the handshake fails or the
// connection ends without a clean TLS close.
absl::StatusOr<std::string> TlsExchange(int port, const TlsClient& client, const std::string& request = kGetMetrics) {
  ERR_clear_error();
  std::unique_ptr<SSL_CTX, decltype(&SSL_CTX_free)> ctx(SSL_CTX_new(TLS_client_method()), SSL_CTX_free);
  if (client.max_version != 0) {
    // Let old versions through on our side so that only the server can be what refuses them.
    SSL_CTX_set_security_level(ctx.get(), 0);
    SSL_CTX_set_cipher_list(ctx.get(), "DEFAULT:@SECLEVEL=0");
    SSL_CTX_set_min_proto_version(ctx.get(), 0);
    SSL_CTX_set_max_proto_version(ctx.get(), client.max_version);
  }
  if (!client.ca_file.empty()) {
    if (SSL_CTX_load_verify_locations(ctx.get(), client.ca_file.c_str(), nullptr) != 1) {
      return absl::InternalError("test client cannot load CA: " + OpenSslErrors());
    }
    SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
  }
  if (!client.cert_file.empty() &&
      (SSL_CTX_use_certificate_chain_file(ctx.get(), client.cert_file.c_str()) != 1 ||
       SSL_CTX_use_PrivateKey_file(ctx.get(), client.key_file.c_str(), SSL_FILETYPE_PEM) != 1)) {
    return absl::InternalError("test client cannot load its certificate: " + OpenSslErrors());
  }
  const int fd = Connect(port);
  if (fd < 0) return absl::UnavailableError("connect failed");
  std::unique_ptr<SSL, decltype(&SSL_free)> ssl(SSL_new(ctx.get()), SSL_free);
  SSL_set_fd(ssl.get(), fd);
  X509_VERIFY_PARAM* param = SSL_get0_param(ssl.get());
  if (X509_VERIFY_PARAM_set1_ip_asc(param, client.verify_name.c_str()) != 1) {
    SSL_set1_host(ssl.get(), client.verify_name.c_str());
    SSL_set_tlsext_host_name(ssl.get(), client.verify_name.c_str());
  }
  absl::StatusOr<std::string> result;
  if (SSL_connect(ssl.get()) != 1) {
    result = absl::UnavailableError(
        absl::StrCat("handshake failed: ", OpenSslErrors(), " (verify: ",
                     X509_verify_cert_error_string(SSL_get_verify_result(ssl.get())), ")"));
  } else if (SSL_write(ssl.get(), request.data(), static_cast<int>(request.size())) <= 0) {
    result = absl::UnavailableError("write failed: " + OpenSslErrors());
  } else {
    std::string out;
    char buf[4096];
    while (true) {
      const int n = SSL_read(ssl.get(), buf, sizeof(buf));
      if (n > 0) {
        out.append(buf, static_cast<size_t>(n));
        continue;
      }
      const int error = SSL_get_error(ssl.get(), n);
      if (error == SSL_ERROR_ZERO_RETURN) {
        result = out;
      } else {
        result = absl::UnavailableError(absl::StrCat("read failed (SSL error ", error, "): ", OpenSslErrors(),
                                                     "; read so far: ", out));
      }
      break;
    }
  }
  ::close(fd);
  return result;
}

class MetricsTlsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // The test client writes to connections the server may already have refused.
    ::signal(SIGPIPE, SIG_IGN);
    if (!OpenSslCommandAvailable()) return;
    std::string dir_template = ::testing::TempDir() + "metrics_tls_XXXXXX";  // TempDir() ends in '/'
    if (::mkdtemp(dir_template.data()) == nullptr) return;
    dir_ = new std::string(dir_template);
    certs_ = new absl::StatusOr<TestCerts>(MakeTestCerts(*dir_));
  }
  static void TearDownTestSuite() {
    if (dir_ != nullptr) {
      std::error_code ec;
      std::filesystem::remove_all(*dir_, ec);
    }
    delete certs_;
    delete dir_;
    certs_ = nullptr;
    dir_ = nullptr;
  }

  void SetUp() override {
    if (!OpenSslCommandAvailable()) GTEST_SKIP() << "the openssl command is not installed";
    ASSERT_NE(certs_, nullptr) << "cannot make a temporary directory";
    ASSERT_TRUE(certs_->ok()) << certs_->status();
  }

  const TestCerts& certs() const { return **certs_; }

  MetricsHttpServer::Options TlsOptions() const {
    MetricsHttpServer::Options options;
    options.listen_address = "127.0.0.1:0";
    options.tls_cert_file = certs().server_cert;
    options.tls_key_file = certs().server_key;
    return options;
  }

  TlsClient TrustingClient() const {
    TlsClient client;
    client.ca_file = certs().ca_cert;
    return client;
  }

  static std::string Metrics() { return "deltaserve_up 1\n"; }

  static std::string* dir_;
  static absl::StatusOr<TestCerts>* certs_;
};

std::string* MetricsTlsTest::dir_ = nullptr;
absl::StatusOr<TestCerts>* MetricsTlsTest::certs_ = nullptr;

TEST_F(MetricsTlsTest, ServesMetricsOverTlsWithACertificateTheClientVerifies) {
  MetricsHttpServer server(TlsOptions(), Metrics);
  ASSERT_TRUE(server.Start().ok());
  EXPECT_TRUE(server.tls());
  absl::StatusOr<std::string> response = TlsExchange(server.port(), TrustingClient());
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_THAT(*response, HasSubstr("HTTP/1.1 200 OK"));
  EXPECT_THAT(*response, HasSubstr("text/plain; version=0.0.4"));
  EXPECT_THAT(*response, HasSubstr("deltaserve_up 1"));
  // The same request handling as plain HTTP.
  response = TlsExchange(server.port(), TrustingClient(), "GET /healthz HTTP/1.1\r\n\r\n");
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_THAT(*response, HasSubstr("ok"));
  response = TlsExchange(server.port(), TrustingClient(), "POST /metrics HTTP/1.1\r\n\r\n");
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_THAT(*response, HasSubstr("405"));
}

TEST_F(MetricsTlsTest, ServerCertificateIsValidForLocalhostAndNotForOtherNames) {
  MetricsHttpServer server(TlsOptions(), Metrics);
  ASSERT_TRUE(server.Start().ok());
  TlsClient client = TrustingClient();
  client.verify_name = "localhost";
  absl::StatusOr<std::string> response = TlsExchange(server.port(), client);
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_THAT(*response, HasSubstr("deltaserve_up 1"));
  client.verify_name = "metrics.example.com";
  EXPECT_FALSE(TlsExchange(server.port(), client).ok());
}

TEST_F(MetricsTlsTest, ClientTrustingAnotherCaRefusesTheServer) {
  MetricsHttpServer server(TlsOptions(), Metrics);
  ASSERT_TRUE(server.Start().ok());
  TlsClient client;
  client.ca_file = certs().rogue_ca_cert;
  absl::StatusOr<std::string> response = TlsExchange(server.port(), client);
  EXPECT_FALSE(response.ok());
  EXPECT_THAT(response.status().message(), HasSubstr("certificate verify failed"));
}

TEST_F(MetricsTlsTest, PlainHttpOnTheTlsPortFailsAndTheServerKeepsServing) {
  MetricsHttpServer server(TlsOptions(), Metrics);
  ASSERT_TRUE(server.Start().ok());
  const std::string plain = PlainExchange(server.port(), kGetMetrics);
  EXPECT_THAT(plain, Not(HasSubstr("deltaserve_up")));
  EXPECT_THAT(plain, HasSubstr("400"));
  EXPECT_THAT(plain, HasSubstr("HTTPS"));
  absl::StatusOr<std::string> response = TlsExchange(server.port(), TrustingClient());
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_THAT(*response, HasSubstr("deltaserve_up 1"));
}

TEST_F(MetricsTlsTest, GarbageAndStalledHandshakesDoNotBlockTheServer) {
  MetricsHttpServer::Options options = TlsOptions();
  options.io_timeout_ms = 300;
  MetricsHttpServer server(options, Metrics);
  ASSERT_TRUE(server.Start().ok());
  // A TLS record header announcing a handshake, then junk.
  EXPECT_THAT(PlainExchange(server.port(), std::string("\x16\x03\x01\x00\x05junk!", 10)), Not(HasSubstr("200")));
  // Bytes that are not TLS at all.
  EXPECT_THAT(PlainExchange(server.port(), std::string(64, '\0')), Not(HasSubstr("200")));
  // A client that connects and says nothing, holding its connection open: the handshake times out.
  const int stalled = Connect(server.port());
  ASSERT_GE(stalled, 0);
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<std::string> response = TlsExchange(server.port(), TrustingClient());
  const auto waited = std::chrono::steady_clock::now() - start;
  ::close(stalled);
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_THAT(*response, HasSubstr("deltaserve_up 1"));
  EXPECT_LT(waited, std::chrono::seconds(3));
}

TEST_F(MetricsTlsTest, RefusesTlsOlderThan12) {
  MetricsHttpServer server(TlsOptions(), Metrics);
  ASSERT_TRUE(server.Start().ok());
  TlsClient client = TrustingClient();
  client.max_version = TLS1_1_VERSION;
  EXPECT_FALSE(TlsExchange(server.port(), client).ok());
  client.max_version = TLS1_2_VERSION;
  absl::StatusOr<std::string> response = TlsExchange(server.port(), client);
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_THAT(*response, HasSubstr("deltaserve_up 1"));
}

TEST_F(MetricsTlsTest, WithAClientCaServesOnlyClientsWithACertificateItSigned) {
  MetricsHttpServer::Options options = TlsOptions();
  options.tls_client_ca_file = certs().ca_cert;
  MetricsHttpServer server(options, Metrics);
  ASSERT_TRUE(server.Start().ok());

  absl::StatusOr<std::string> no_cert = TlsExchange(server.port(), TrustingClient());
  EXPECT_FALSE(no_cert.ok());
  EXPECT_THAT(no_cert.status().message(), Not(HasSubstr("deltaserve_up")));

  TlsClient rogue = TrustingClient();
  rogue.cert_file = certs().rogue_client_cert;
  rogue.key_file = certs().rogue_client_key;
  absl::StatusOr<std::string> rogue_response = TlsExchange(server.port(), rogue);
  EXPECT_FALSE(rogue_response.ok());
  EXPECT_THAT(rogue_response.status().message(), Not(HasSubstr("deltaserve_up")));

  for (const auto& [cert, key] : {std::pair(certs().client_cert, certs().client_key),
                                  std::pair(certs().other_client_cert, certs().other_client_key)}) {
    TlsClient client = TrustingClient();
    client.cert_file = cert;
    client.key_file = key;
    absl::StatusOr<std::string> response = TlsExchange(server.port(), client);
    ASSERT_TRUE(response.ok()) << cert << ": " << response.status();
    EXPECT_THAT(*response, HasSubstr("deltaserve_up 1"));
  }
}

TEST_F(MetricsTlsTest, StartRejectsAMissingCertificateNamingIt) {
  MetricsHttpServer::Options options = TlsOptions();
  options.tls_cert_file = certs().dir + "/no-such-cert.pem";
  MetricsHttpServer server(options, Metrics);
  const absl::Status st = server.Start();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("no-such-cert.pem"));
  EXPECT_THAT(st.message(), HasSubstr("No such file"));
}

TEST_F(MetricsTlsTest, StartRejectsACertificateFileThatIsNotPem) {
  const std::string bad = certs().dir + "/not-a-cert.pem";
  std::ofstream(bad) << "hello\n";
  MetricsHttpServer::Options options = TlsOptions();
  options.tls_cert_file = bad;
  MetricsHttpServer server(options, Metrics);
  const absl::Status st = server.Start();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("not-a-cert.pem"));
}

TEST_F(MetricsTlsTest, StartRejectsAKeyThatIsNotAKey) {
  const std::string bad = certs().dir + "/bad.key";
  std::ofstream(bad) << "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n";
  MetricsHttpServer::Options options = TlsOptions();
  options.tls_key_file = bad;
  MetricsHttpServer server(options, Metrics);
  const absl::Status st = server.Start();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("bad.key"));
}

TEST_F(MetricsTlsTest, StartRejectsTheKeyOfAnotherCertificate) {
  MetricsHttpServer::Options options = TlsOptions();
  options.tls_key_file = certs().client_key;
  MetricsHttpServer server(options, Metrics);
  const absl::Status st = server.Start();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr(certs().client_key));
  EXPECT_THAT(st.message(), HasSubstr("does not match"));
}

TEST_F(MetricsTlsTest, StartRejectsIncompleteTlsOptions) {
  MetricsHttpServer::Options no_key = TlsOptions();
  no_key.tls_key_file = "";
  EXPECT_EQ(MetricsHttpServer(no_key, Metrics).Start().code(), absl::StatusCode::kInvalidArgument);

  MetricsHttpServer::Options no_cert = TlsOptions();
  no_cert.tls_cert_file = "";
  EXPECT_EQ(MetricsHttpServer(no_cert, Metrics).Start().code(), absl::StatusCode::kInvalidArgument);

  MetricsHttpServer::Options ca_only;
  ca_only.listen_address = "127.0.0.1:0";
  ca_only.tls_client_ca_file = certs().ca_cert;
  EXPECT_EQ(MetricsHttpServer(ca_only, Metrics).Start().code(), absl::StatusCode::kInvalidArgument);

  MetricsHttpServer::Options missing_ca = TlsOptions();
  missing_ca.tls_client_ca_file = certs().dir + "/no-such-ca.pem";
  const absl::Status st = MetricsHttpServer(missing_ca, Metrics).Start();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("no-such-ca.pem"));
}

}  // namespace
}  // namespace metrics
}  // namespace deltaserve

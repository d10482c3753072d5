#include "server/metrics/http_server.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "server/common/logging.h"

namespace deltaserve {
namespace metrics {
namespace {

bool SendAll(int fd, absl::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data.remove_prefix(static_cast<size_t>(n));
  }
  return true;
}

std::string Response(int code, absl::string_view reason, absl::string_view content_type, absl::string_view body) {
  return absl::StrCat("HTTP/1.1 ", code, " ", reason, "\r\nContent-Type: ", content_type,
                      "\r\nContent-Length: ", body.size(), "\r\nConnection: close\r\n\r\n", body);
}

// One connection's byte stream: the socket itself (the plain path, as before TLS existed), or TLS over it.
class Stream {
 public:
  Stream(int fd, SSL* ssl) : fd_(fd), ssl_(ssl) {}

  // Bytes read into `buf` (> 0), or 0 when the peer closed, the receive timed out or the stream failed.
  size_t Read(char* buf, size_t size) {
    if (ssl_ == nullptr) {
      while (true) {
        const ssize_t n = ::recv(fd_, buf, size, 0);
        if (n < 0 && errno == EINTR) continue;
        return n > 0 ? static_cast<size_t>(n) : 0;
      }
    }
    ERR_clear_error();
    const int n = SSL_read(ssl_, buf, static_cast<int>(size));
    if (n <= 0) NoteSslFailure(n);
    return n > 0 ? static_cast<size_t>(n) : 0;
  }

  bool WriteAll(absl::string_view data) {
    if (ssl_ == nullptr) return SendAll(fd_, data);
    while (!data.empty()) {
      ERR_clear_error();
      const int n = SSL_write(ssl_, data.data(), static_cast<int>(data.size()));
      if (n <= 0) {
        NoteSslFailure(n);
        return false;
      }
      data.remove_prefix(static_cast<size_t>(n));
    }
    return true;
  }

  // Whether TLS failed for good (OpenSSL then forbids SSL_shutdown); a timeout or the peer's close is not that.
  bool tls_broken() const { return tls_broken_; }

 private:
  void NoteSslFailure(int rc) {
    const int error = SSL_get_error(ssl_, rc);
    if (error == SSL_ERROR_SYSCALL || error == SSL_ERROR_SSL) tls_broken_ = true;
    ERR_clear_error();
  }

  const int fd_;
  SSL* const ssl_;
  bool tls_broken_ = false;
};

// OpenSSL's error queue (this thread's), as "reason; reason", and cleared. `fallback` when the queue is empty.
std::string DrainOpenSslErrors(absl::string_view fallback = "no detail from OpenSSL") {
  std::string out;
  while (const unsigned long e = ERR_get_error()) {
    const char* reason = ERR_reason_error_string(e);
    std::string text;
    if (reason != nullptr) {
      text = reason;
    } else {
      char buf[256];
      ERR_error_string_n(e, buf, sizeof(buf));
      text = buf;
    }
    if (!absl::StrContains(out, text)) absl::StrAppend(&out, out.empty() ? "" : "; ", text);
  }
  return out.empty() ? std::string(fallback) : out;
}

// OK when `path` can be opened for reading; otherwise says why, naming the option.
absl::Status CheckReadable(absl::string_view option, const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("metrics ", option, " '", path, "' cannot be read: ",
                                                   std::strerror(errno), "; give a readable PEM file"));
  }
  std::fclose(f);
  return absl::OkStatus();
}

bool SetNonBlocking(int fd, bool on) {
  const int flags = ::fcntl(fd, F_GETFL, 0);
  if (flags < 0) return false;
  return ::fcntl(fd, F_SETFL, on ? (flags | O_NONBLOCK) : (flags & ~O_NONBLOCK)) == 0;
}

// Ends our side of `fd` and discards what the peer still sends (for at most 200 ms), so that closing the socket
// with unread request bytes does not reset the connection before the peer has read our answer.
void CloseGracefully(int fd) {
  ::shutdown(fd, SHUT_WR);
  const absl::Time deadline = absl::Now() + absl::Milliseconds(200);
  char buf[1024];
  while (true) {
    const int64_t left_ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (left_ms <= 0) return;
    pollfd pfd{fd, POLLIN, 0};
    const int ready = ::poll(&pfd, 1, static_cast<int>(left_ms));
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) return;
    if (::recv(fd, buf, sizeof(buf), MSG_DONTWAIT) <= 0) return;
  }
}

std::string PeerAddress(int fd) {
  sockaddr_storage peer{};
  socklen_t len = sizeof(peer);
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &len) != 0) return "unknown peer";
  char host[INET6_ADDRSTRLEN] = {0};
  if (peer.ss_family == AF_INET6) {
    const auto* a = reinterpret_cast<const sockaddr_in6*>(&peer);
    ::inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
    return absl::StrCat("[", host, "]:", ntohs(a->sin6_port));
  }
  const auto* a = reinterpret_cast<const sockaddr_in*>(&peer);
  ::inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
  return absl::StrCat(host, ":", ntohs(a->sin_port));
}

// Reads one request head from `stream` and answers it.
void Answer(Stream& stream, int max_request_bytes, const MetricsHttpServer::TextCallback& metrics_text) {
  std::string head;
  char buf[1024];
  size_t end;
  while ((end = head.find("\r\n\r\n")) == std::string::npos &&
         static_cast<int>(head.size()) <= max_request_bytes) {
    const size_t n = stream.Read(buf, sizeof(buf));
    if (n == 0) return;  // closed or timed out
    head.append(buf, n);
  }
  if (end == std::string::npos || static_cast<int>(end) > max_request_bytes) {
    stream.WriteAll(Response(431, "Request Header Fields Too Large", "text/plain", "request too large\n"));
    return;
  }
  const absl::string_view line = absl::string_view(head).substr(0, head.find("\r\n"));
  const size_t sp1 = line.find(' ');
  const size_t sp2 = line.find(' ', sp1 == absl::string_view::npos ? 0 : sp1 + 1);
  if (sp1 == absl::string_view::npos || sp2 == absl::string_view::npos) {
    stream.WriteAll(Response(400, "Bad Request", "text/plain", "malformed request line\n"));
    return;
  }
  const absl::string_view method = line.substr(0, sp1);
  absl::string_view target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  target = target.substr(0, target.find('?'));
  if (method != "GET" && method != "HEAD") {
    stream.WriteAll(Response(405, "Method Not Allowed", "text/plain", "only GET\n"));
    return;
  }
  if (target == "/metrics") {
    stream.WriteAll(Response(200, "OK", "text/plain; version=0.0.4; charset=utf-8", metrics_text()));
  } else if (target == "/healthz") {
    stream.WriteAll(Response(200, "OK", "text/plain", "ok\n"));
  } else {
    stream.WriteAll(Response(404, "Not Found", "text/plain", "try /metrics\n"));
  }
}

}  // namespace

MetricsHttpServer::MetricsHttpServer(const Options& options, TextCallback metrics_text)
    : options_(options), metrics_text_(std::move(metrics_text)) {}

MetricsHttpServer::~MetricsHttpServer() {
  Stop();
  if (ssl_ctx_ != nullptr) SSL_CTX_free(ssl_ctx_);
}

absl::Status MetricsHttpServer::InitTls() {
  const std::string& cert = options_.tls_cert_file;
  const std::string& key = options_.tls_key_file;
  const std::string& client_ca = options_.tls_client_ca_file;
  if (cert.empty()) {
    if (!key.empty() || !client_ca.empty()) {
      return absl::InvalidArgumentError(
          "metrics TLS key or client CA given without a certificate; give tls_cert_file too, or neither for plain "
          "HTTP");
    }
    return absl::OkStatus();  // plain HTTP
  }
  if (key.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics TLS certificate '", cert, "' given without a key; give tls_key_file too"));
  }
  if (absl::Status st = CheckReadable("TLS certificate", cert); !st.ok()) return st;
  if (absl::Status st = CheckReadable("TLS key", key); !st.ok()) return st;
  if (!client_ca.empty()) {
    if (absl::Status st = CheckReadable("TLS client CA", client_ca); !st.ok()) return st;
  }

  ERR_clear_error();
  SSL_CTX* ctx = SSL_CTX_new(TLS_server_method());
  if (ctx == nullptr) {
    return absl::InternalError(absl::StrCat("cannot create a TLS context: ", DrainOpenSslErrors()));
  }
  auto fail = [ctx](std::string message) {
    SSL_CTX_free(ctx);
    return absl::InvalidArgumentError(std::move(message));
  };
  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_NO_TICKET);
  // One short request per connection: no session resumption (so no session state to keep or to get wrong).
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  SSL_CTX_set_num_tickets(ctx, 0);
  static constexpr unsigned char kSessionContext[] = "deltaserve-metrics";
  SSL_CTX_set_session_id_context(ctx, kSessionContext, sizeof(kSessionContext) - 1);

  if (SSL_CTX_use_certificate_chain_file(ctx, cert.c_str()) != 1) {
    return fail(absl::StrCat("metrics TLS certificate '", cert, "' is not a usable PEM certificate (",
                             DrainOpenSslErrors(), "); give the server certificate in PEM form"));
  }
  if (SSL_CTX_use_PrivateKey_file(ctx, key.c_str(), SSL_FILETYPE_PEM) != 1) {
    if (const unsigned long e = ERR_peek_last_error();
        ERR_GET_LIB(e) == ERR_LIB_X509 && ERR_GET_REASON(e) == X509_R_KEY_VALUES_MISMATCH) {
      return fail(absl::StrCat("metrics TLS key '", key, "' does not match certificate '", cert, "' (",
                               DrainOpenSslErrors(), "); give the private key that the certificate was made for"));
    }
    return fail(absl::StrCat("metrics TLS key '", key, "' cannot be used with certificate '", cert, "' (",
                             DrainOpenSslErrors(),
                             "); give the unencrypted PEM private key that the certificate was made for"));
  }
  if (SSL_CTX_check_private_key(ctx) != 1) {
    return fail(absl::StrCat("metrics TLS key '", key, "' does not match certificate '", cert, "' (",
                             DrainOpenSslErrors(), "); give the private key that the certificate was made for"));
  }
  if (X509* x = SSL_CTX_get0_certificate(ctx); x != nullptr && X509_cmp_current_time(X509_get0_notAfter(x)) < 0) {
    DS_LOG(WARNING) << "metrics TLS certificate " << cert << " has expired; scrapers will refuse it until renewed";
  }
  if (!client_ca.empty()) {
    if (SSL_CTX_load_verify_locations(ctx, client_ca.c_str(), nullptr) != 1) {
      return fail(absl::StrCat("metrics TLS client CA '", client_ca, "' holds no usable PEM CA certificate (",
                               DrainOpenSslErrors(), "); give the CA that signs the scrapers' certificates"));
    }
    // Tell clients which CAs are accepted, so one with several certificates picks the right one.
    if (STACK_OF(X509_NAME)* names = SSL_load_client_CA_file(client_ca.c_str()); names != nullptr) {
      SSL_CTX_set_client_CA_list(ctx, names);
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  }
  ERR_clear_error();
  ssl_ctx_ = ctx;
  return absl::OkStatus();
}

absl::Status MetricsHttpServer::Start() {
  const std::string& address = options_.listen_address;
  const size_t colon = address.rfind(':');
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), &port) || port < 0 ||
      port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics address '", address, "' is not host:port (e.g. 127.0.0.1:9464)"));
  }
  std::string host = address.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  if (host.empty()) host = "0.0.0.0";
  if (absl::Status st = InitTls(); !st.ok()) return st;

  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* result = nullptr;
  const std::string port_text = std::to_string(port);
  if (int rc = ::getaddrinfo(host.c_str(), port_text.c_str(), &hints, &result); rc != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics address '", address, "': cannot resolve host: ", gai_strerror(rc)));
  }
  int fd = -1;
  std::string last_error = "no address";
  for (addrinfo* ai = result; ai != nullptr; ai = ai->ai_next) {
    fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      last_error = std::strerror(errno);
      continue;
    }
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && ::listen(fd, 16) == 0) break;
    last_error = std::strerror(errno);
    ::close(fd);
    fd = -1;
  }
  ::freeaddrinfo(result);
  if (fd < 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen for metrics on ", address, ": ", last_error));
  }
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len);
  port_ = bound.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port)
                                      : ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  listen_fd_ = fd;
  thread_ = std::thread([this] { Serve(); });
  return absl::OkStatus();
}

void MetricsHttpServer::Stop() {
  if (stopping_.exchange(true)) return;
  if (thread_.joinable()) thread_.join();
  if (listen_fd_ >= 0) ::close(listen_fd_);
  listen_fd_ = -1;
}

void MetricsHttpServer::Serve() {
  // OpenSSL writes to the socket with write(), which raises SIGPIPE when the peer has gone; blocked on this
  // thread, the signal stays pending here and the write fails with EPIPE instead of killing the process.
  sigset_t pipe_only;
  sigemptyset(&pipe_only);
  sigaddset(&pipe_only, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe_only, nullptr);
  while (!stopping_.load()) {
    pollfd pfd{listen_fd_, POLLIN, 0};
    const int ready = ::poll(&pfd, 1, /*timeout_ms=*/200);
    if (ready <= 0) continue;
    const int conn = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (conn < 0) continue;
    timeval tv{options_.io_timeout_ms / 1000, (options_.io_timeout_ms % 1000) * 1000};
    ::setsockopt(conn, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    ::setsockopt(conn, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (ssl_ctx_ == nullptr) {
      HandleConnection(conn, nullptr);
    } else if (SSL* ssl = AcceptTls(conn); ssl != nullptr) {
      if (HandleConnection(conn, ssl)) {
        ERR_clear_error();
        SSL_shutdown(ssl);  // send close_notify; do not wait for the peer's
        ERR_clear_error();
      }
      SSL_free(ssl);
    }
    ::close(conn);
  }
}

SSL* MetricsHttpServer::AcceptTls(int fd) {
  const std::string peer = PeerAddress(fd);  // now: once the handshake fails the peer may be gone
  ERR_clear_error();
  SSL* ssl = SSL_new(ssl_ctx_);
  if (ssl == nullptr || SSL_set_fd(ssl, fd) != 1 || !SetNonBlocking(fd, true)) {
    LogHandshakeFailure(absl::StrCat("cannot set up TLS for ", peer, ": ", DrainOpenSslErrors()));
    if (ssl != nullptr) SSL_free(ssl);
    return nullptr;
  }
  // Non-blocking, so that the whole handshake (not each read) is bounded by io_timeout_ms.
  const absl::Time deadline = absl::Now() + absl::Milliseconds(options_.io_timeout_ms);
  std::string failure;
  while (true) {
    ERR_clear_error();
    const int rc = SSL_accept(ssl);
    if (rc == 1) break;
    const int error = SSL_get_error(ssl, rc);
    if (error == SSL_ERROR_WANT_READ || error == SSL_ERROR_WANT_WRITE) {
      const int64_t left_ms = absl::ToInt64Milliseconds(deadline - absl::Now());
      pollfd pfd{fd, static_cast<short>(error == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT), 0};
      int ready = 0;
      if (left_ms > 0) {
        do {
          ready = ::poll(&pfd, 1, static_cast<int>(left_ms));
        } while (ready < 0 && errno == EINTR);
      }
      if (ready > 0) continue;
      failure = absl::StrCat("no handshake within ", options_.io_timeout_ms, " ms");
      break;
    }
    const unsigned long first = ERR_peek_error();
    const bool plain_http = ERR_GET_LIB(first) == ERR_LIB_SSL && ERR_GET_REASON(first) == SSL_R_HTTP_REQUEST;
    failure = DrainOpenSslErrors(error == SSL_ERROR_SYSCALL ? "connection closed during the handshake"
                                                            : "handshake failed");
    if (const long verify = SSL_get_verify_result(ssl); verify != X509_V_OK) {
      absl::StrAppend(&failure, " (client certificate: ", X509_verify_cert_error_string(verify), ")");
    }
    if (plain_http) {
      // A plain-HTTP client (e.g. a scrape config still on http://): tell it, in words it can read.
      SetNonBlocking(fd, false);
      SendAll(fd, Response(400, "Bad Request", "text/plain",
                           "this port speaks HTTPS only; scrape https:// instead of http://\n"));
      CloseGracefully(fd);
      failure = "plain HTTP request on the HTTPS port";
    }
    break;
  }
  if (!failure.empty() || !SetNonBlocking(fd, false)) {
    LogHandshakeFailure(absl::StrCat("TLS handshake from ", peer, " failed: ",
                                     failure.empty() ? "cannot make the socket blocking" : failure));
    SSL_free(ssl);
    return nullptr;
  }
  return ssl;
}

void MetricsHttpServer::LogHandshakeFailure(const std::string& reason) {
  const absl::Time now = absl::Now();
  if (now - last_handshake_log_ < absl::Minutes(1)) {
    ++unlogged_handshake_failures_;
    return;
  }
  DS_LOG(WARNING) << "metrics: " << reason
                  << (unlogged_handshake_failures_ > 0
                          ? absl::StrCat(" (and ", unlogged_handshake_failures_, " more failures not logged)")
                          : std::string());
  last_handshake_log_ = now;
  unlogged_handshake_failures_ = 0;
}

bool MetricsHttpServer::HandleConnection(int fd, SSL* ssl) {
  Stream stream(fd, ssl);
  Answer(stream, options_.max_request_bytes, metrics_text_);
  return !stream.tls_broken();
}

}  // namespace metrics
}  // namespace deltaserve

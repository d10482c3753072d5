// MetricsHttpServer: a minimal HTTP/1.1 server for Prometheus scrapes: `GET /metrics` answers the text exposition
// format from a callback, `GET /healthz` answers "ok", anything else 404 (405 for other methods). Optionally
// HTTPS (TLS 1.2+ with OpenSSL), optionally requiring a client certificate signed by a given CA (mutual TLS).
//
// Why not prometheus-cpp's Exposer: Debian's civetweb starts its threads with a fixed 100 KB stack, and with
// OpenBLAS loaded (its static TLS) pthread_create fails and the Exposer throws (docs/ARCHITECTURE.md). This server
// runs one thread with the default stack and answers one connection at a time, with receive/send timeouts so a
// slow client cannot hold it; scrapes are rare and small, so that is enough. With TLS, a connection whose handshake
// fails or does not finish within io_timeout_ms (a plain-HTTP client, no or a wrong client certificate) is closed
// and the server goes on with the next one.
//
// Owns its listening socket, its thread and (with TLS) its OpenSSL context; the certificate and key are read once,
// by Start(). Thread-safe: Start/Stop may be called from any thread; the callback is called on the server's thread.
#ifndef DELTASERVE_SERVER_METRICS_HTTP_SERVER_H_
#define DELTASERVE_SERVER_METRICS_HTTP_SERVER_H_

#include <atomic>
#include <functional>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

// OpenSSL's SSL_CTX and SSL, declared here so that users of this header do not include OpenSSL.
struct ssl_ctx_st;
struct ssl_st;

namespace deltaserve {
namespace metrics {

class MetricsHttpServer {
 public:
  struct Options {
    // "host:port" to listen on; port 0 picks a free port (see port()).
    std::string listen_address = "127.0.0.1:9464";
    // Per-connection receive/send timeout, in milliseconds. With TLS it also bounds the whole handshake.
    int io_timeout_ms = 5000;
    // Largest request head accepted, in bytes.
    int max_request_bytes = 8192;
    // PEM file with the server certificate (then any intermediates): set, the port speaks HTTPS only (TLS 1.2
    // or later); "" = plain HTTP. REQUIRES: tls_key_file set too.
    std::string tls_cert_file = "";
    // PEM file with the private key of tls_cert_file (unencrypted). "" when tls_cert_file is "".
    std::string tls_key_file = "";
    // PEM file with the CA certificate(s) that sign scrapers' client certificates: set, every connection must
    // present a client certificate that verifies against them (mutual TLS; e.g. Prometheus' tls_config
    // cert_file/key_file), else the handshake fails; "" = no client certificate asked for. REQUIRES: TLS on.
    std::string tls_client_ca_file = "";
  };

  using TextCallback = std::function<std::string()>;

  MetricsHttpServer(const Options& options, TextCallback metrics_text);
  ~MetricsHttpServer();
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  // Loads the TLS files (if any), binds and starts serving. INVALID_ARGUMENT for a malformed address, or a TLS
  // file that is missing or unreadable, a key that does not match the certificate, or a key/CA without a
  // certificate (the message names the file and gives OpenSSL's reason); UNAVAILABLE when it cannot bind.
  absl::Status Start();
  // Stops serving and joins the thread. Idempotent.
  void Stop();
  // The bound port (after Start).
  int port() const { return port_; }
  // Whether the port speaks TLS (after a successful Start).
  bool tls() const { return ssl_ctx_ != nullptr; }

 private:
  absl::Status InitTls();
  void Serve();
  // Runs the TLS handshake on `fd` within io_timeout_ms; nullptr (and the reason logged) when it fails.
  ssl_st* AcceptTls(int fd);
  // Reads one request from `fd` (through `ssl` when not null) and answers it. False when TLS failed on the
  // connection, so that it must be closed without a TLS shutdown.
  bool HandleConnection(int fd, ssl_st* ssl);
  // Logs a failed handshake, at most once a minute (with a count of those not logged) so a scanner cannot flood
  // the log. Called on the server's thread only.
  void LogHandshakeFailure(const std::string& reason);

  const Options options_;
  const TextCallback metrics_text_;
  int listen_fd_ = -1;
  int port_ = 0;
  ssl_ctx_st* ssl_ctx_ = nullptr;  // owned; null = plain HTTP
  std::atomic<bool> stopping_{false};
  std::thread thread_;
  // Server thread only.
  absl::Time last_handshake_log_ = absl::InfinitePast();
  int unlogged_handshake_failures_ = 0;
};

}  // namespace metrics
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_METRICS_HTTP_SERVER_H_

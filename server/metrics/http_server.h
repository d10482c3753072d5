// MetricsHttpServer: a minimal HTTP/1.1 server for Prometheus scrapes: `GET /metrics` answers the text exposition
// format from a callback, `GET /healthz` answers "ok", anything else 404 (405 for other methods).
//
// Why not prometheus-cpp's Exposer: Debian's civetweb starts its threads with a fixed 100 KB stack, and with
// OpenBLAS loaded (its static TLS) pthread_create fails and the Exposer throws (docs/ARCHITECTURE.md). This server
// runs one thread with the default stack and answers one connection at a time, with receive/send timeouts so a
// slow client cannot hold it; scrapes are rare and small, so that is enough.
//
// Owns its listening socket and thread. Thread-safe: Start/Stop may be called from any thread; the callback is
// called on the server's thread.
#ifndef DELTASERVE_SERVER_METRICS_HTTP_SERVER_H_
#define DELTASERVE_SERVER_METRICS_HTTP_SERVER_H_

#include <atomic>
#include <functional>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace deltaserve {
namespace metrics {

class MetricsHttpServer {
 public:
  struct Options {
    // "host:port" to listen on; port 0 picks a free port (see port()).
    std::string listen_address = "127.0.0.1:9464";
    // Per-connection receive/send timeout, in milliseconds.
    int io_timeout_ms = 5000;
    // Largest request head accepted, in bytes.
    int max_request_bytes = 8192;
  };

  using TextCallback = std::function<std::string()>;

  MetricsHttpServer(const Options& options, TextCallback metrics_text);
  ~MetricsHttpServer();
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  // Binds and starts serving. INVALID_ARGUMENT for a malformed address, UNAVAILABLE when it cannot bind.
  absl::Status Start();
  // Stops serving and joins the thread. Idempotent.
  void Stop();
  // The bound port (after Start).
  int port() const { return port_; }

 private:
  void Serve();
  void HandleConnection(int fd);

  const Options options_;
  const TextCallback metrics_text_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace metrics
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_METRICS_HTTP_SERVER_H_

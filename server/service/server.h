// DeltaServer: the whole deltaserve process minus flag parsing: loads the model, builds the inference engine,
// opens the delta store, sets up authentication (tenants file, TLS) and the audit log, starts the gRPC server
// (InferenceService, DeltaService, TuningService, grpc.health.v1, reflection), runs the fine-tuning jobs and the
// metrics HTTP endpoint, and shuts all of it down gracefully.
//
// Owns every component it starts. Thread-safe: Shutdown() may be called from any thread (e.g. a signal thread)
// while another thread is in Wait().
#ifndef DELTASERVE_SERVER_SERVICE_SERVER_H_
#define DELTASERVE_SERVER_SERVICE_SERVER_H_

#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "delta_store/fs_store.h"
#include "delta_store/oci_store.h"
#include "delta_store/store.h"
#include "server/auth/audit_log.h"
#include "server/auth/authenticator.h"
#include "server/auth/request_limiter.h"
#include "server/deltas/delta_manager.h"
#include "server/inference/inference_engine.h"
#include "server/model/model.h"
#include "server/tuning/job_manager.h"

namespace grpc {
class Server;
}

namespace deltaserve {
namespace metrics {
class ServerMetrics;
class MetricsHttpServer;
}  // namespace metrics
namespace service {

class InferenceServiceImpl;
class DeltaServiceImpl;
class TuningServiceImpl;
class CallSecurity;

class DeltaServer {
 public:
  // Registry options with an empty url: no shared store.
  static store::OciRegistryStoreOptions NoRegistry() {
    store::OciRegistryStoreOptions o;
    o.url.clear();
    return o;
  }

  struct Options {
    // gRPC listen address, "host:port"; port 0 picks a free port (see port()).
    std::string listen_address = "127.0.0.1:50051";
    // A second, always-plaintext gRPC port that serves only grpc.health.v1 ("" = none); port 0 picks a free port.
    // It starts before the model loads, so that an orchestrator sees the process alive (service "liveness") but
    // not ready ("" and "readiness") while it loads; Kubernetes' native gRPC probes, which cannot speak TLS, use
    // it when the main port has TLS. Health reveals nothing but serving states.
    std::string health_listen_address;
    // Metrics HTTP listen address ("" disables the endpoint); port 0 picks a free port.
    std::string metrics_address = "127.0.0.1:9464";
    // The model directory (docs/MODELS.md).
    std::string model_dir = "models/use-lite";
    // The delta store's directory (docs/STORE.md); "" = an in-memory store (packs are lost at exit). With
    // `registry` set it is the local read-through cache of the shared store.
    std::string store_dir;
    // A shared store on an OCI registry (registry.url non-empty): every replica pointed at the same registry and
    // prefix serves the same packs and labels. Empty url = no shared store.
    store::OciRegistryStoreOptions registry = NoRegistry();
    // How long a resolved reference is reused before asking the registry again (0 = never: a label moved on
    // another replica takes effect at once).
    absl::Duration registry_resolve_ttl = absl::ZeroDuration();
    // How often the server collects the store's garbage (blobs no version references and abandoned uploads,
    // older than store_gc_grace; docs/STORE.md); zero = never (run it elsewhere).
    absl::Duration store_gc_interval = absl::Hours(6);
    // Unreferenced blobs younger than this are kept: a push may be about to reference them. Keep it well above
    // the longest push.
    absl::Duration store_gc_grace = absl::Hours(1);
    // The delta store: quotas, blob size limit, read verification. `store.max_blob_bytes` is also the largest
    // push.
    store::FileSystemStoreOptions store;
    // Delta packs and loaded-pack cache.
    deltas::DeltaManager::Options deltas;
    // Directory of pack files pushed into the store at start ("" = none): <dir>/<task>.dpack for the default
    // tenant, <dir>/<tenant>/<task>.dpack; a file already stored as a version of its task adds nothing.
    std::string delta_dir;
    // Fine-tuning jobs: where they persist (jobs.jobs_dir, "" = in memory), how many run at once, the trainer's
    // threads and whether full fine-tuning is allowed. trainer.model_dir is set from model_dir.
    tuning::JobManager::Options jobs;
    // Device and compute dtype of the model.
    model::ModelOptions model;
    // Request limits and batching.
    inference::InferenceEngine::Options engine;
    // Largest gRPC message accepted, in bytes.
    int max_receive_message_bytes = 16 << 20;
    // Who may call, TLS, and the audit log (docs/SECURITY.md).
    struct Security {
      // The tenants file (API token hashes, roles, quotas; server/auth/tenants.h); "" = the auth-free mode: every
      // caller may act for every tenant (for local use only; logged loudly at start).
      std::string tenants_file;
      // How often the tenants file is checked for changes (tokens are created and revoked without a restart).
      absl::Duration tenants_reload_interval = absl::Seconds(2);
      // The audit log (JSON lines of every mutation and refused attempt); "" = none.
      std::string audit_log;
      // fsync the audit log after every line.
      bool audit_log_sync = false;
      // TLS for the gRPC port: a PEM certificate chain and its private key ("" = plaintext).
      std::string tls_cert_file;
      std::string tls_key_file;
      // A PEM CA bundle: client certificates signed by it are verified, and a tenant whose certificate_names
      // holds a certificate's common name is authenticated by it (mutual TLS). "" = no client certificates.
      std::string tls_client_ca_file;
      // With tls_client_ca_file: refuse connections without a valid client certificate (else a bearer token
      // may stand in for one).
      bool tls_require_client_cert = false;
      // TLS for the metrics port (server/metrics/http_server.h); "" = plain HTTP.
      std::string metrics_tls_cert_file;
      std::string metrics_tls_key_file;
      std::string metrics_tls_client_ca_file;
    };
    Security security;
    // Facts reported by GetModelInfo and the metrics.
    std::string blas = "unknown";
    int intra_op_threads = 0;
  };

  // Health service names (grpc.health.v1) on every port. kLiveness is SERVING while the process runs (also while
  // the model loads and while draining); kReadiness and "" (the whole server) are SERVING once the model is
  // loaded and calls are accepted, NOT_SERVING before that and from BeginDrain() on. The deltaserve.v1 service
  // names follow readiness.
  static constexpr char kLivenessService[] = "liveness";
  static constexpr char kReadinessService[] = "readiness";

  // Loads the model and starts serving. Errors: the model directory's (NOT_FOUND, INVALID_ARGUMENT, ...), or
  // UNAVAILABLE when an address cannot be bound.
  static absl::StatusOr<std::unique_ptr<DeltaServer>> Start(const Options& options);
  ~DeltaServer();

  // Begins draining: readiness turns NOT_SERVING on every port (load balancers and Kubernetes stop sending new
  // calls), deltaserve_ready turns 0, and calls are still served. Idempotent; Shutdown() follows.
  void BeginDrain();
  bool draining() const;

  // Graceful shutdown: BeginDrain() if not yet, the server stops accepting calls, in-flight calls get up to
  // `drain` to finish (then are cancelled), queued rows are finished, the metrics endpoint stops. Idempotent.
  void Shutdown(absl::Duration drain);
  // Blocks until Shutdown() has completed.
  void Wait();

  int port() const { return port_; }
  int metrics_port() const;
  // The health-only port (0 when there is none).
  int health_port() const { return health_port_; }
  const model::Model& model() const { return *model_; }

 private:
  DeltaServer() = default;

  Options options_;
  std::shared_ptr<const model::Model> model_;
  std::unique_ptr<metrics::ServerMetrics> metrics_;
  std::unique_ptr<auth::AuditLog> audit_;
  std::unique_ptr<auth::Authenticator> authenticator_;
  std::unique_ptr<auth::RequestLimiter> limiter_;
  std::unique_ptr<CallSecurity> call_security_;
  std::unique_ptr<store::DeltaStore> store_;
  std::unique_ptr<deltas::DeltaManager> deltas_;
  std::unique_ptr<inference::InferenceEngine> engine_;
  std::unique_ptr<InferenceServiceImpl> inference_service_;
  std::unique_ptr<DeltaServiceImpl> delta_service_;
  std::unique_ptr<tuning::JobManager> jobs_;  // after the model, store and deltas it uses: destroyed before them
  std::unique_ptr<TuningServiceImpl> tuning_service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<grpc::Server> health_server_;  // the health-only port; shut down last
  std::unique_ptr<metrics::MetricsHttpServer> metrics_http_;
  int port_ = 0;
  int health_port_ = 0;

  // Collects the store's garbage every options_.store_gc_interval until Shutdown().
  void GcLoop();

  // Sets the readiness services (and the deltaserve.v1 ones) on every port and deltaserve_ready.
  void SetReadiness(bool ready);

  mutable absl::Mutex mu_;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;   // BeginDrain() was called
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;  // Shutdown() has begun
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;    // Shutdown() has finished
  std::thread gc_thread_;                          // GcLoop(); joined by Shutdown()
};

}  // namespace service
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_SERVICE_SERVER_H_

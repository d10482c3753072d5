#include "server/service/server.h"

#include <algorithm>
#include <chrono>
#include <memory>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "openssl/pem.h"
#include "openssl/x509.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "server/common/file_util.h"
#include "server/common/logging.h"
#include "server/common/status_macros.h"
#include "server/metrics/http_server.h"
#include "server/metrics/metrics.h"
#include "server/model/model_loader.h"
#include "delta_store/caching_store.h"
#include "delta_store/memory_store.h"
#include "delta_store/observed_store.h"
#include "server/service/call_security.h"
#include "server/service/delta_service.h"
#include "server/service/tuning_service.h"
#include "server/service/inference_service.h"
#include "server/service/parse_error_interceptor.h"
#include "server/service/version.h"

namespace deltaserve {
namespace service {

namespace {

// The delta store the options ask for: a filesystem store, an in-memory one, or a registry with one of those as
// its local cache.
absl::StatusOr<std::unique_ptr<store::DeltaStore>> OpenStore(const DeltaServer::Options& options) {
  std::unique_ptr<store::DeltaStore> local;
  if (options.store_dir.empty()) {
    store::MemoryStoreOptions memory;
    memory.max_blob_bytes = options.store.max_blob_bytes;
    memory.quotas = options.store.quotas;
    local = store::NewMemoryStore(memory);
  } else {
    DS_ASSIGN_OR_RETURN(local, store::OpenFileSystemStore(options.store_dir, options.store));
  }
  if (options.registry.url.empty()) {
    if (options.store_dir.empty()) {
      DS_LOG(WARNING) << "no --store_dir: delta packs are kept in memory and lost when the server stops";
    } else {
      DS_LOG(INFO) << "delta store at " << options.store_dir;
    }
    return local;
  }
  store::OciRegistryStoreOptions registry = options.registry;
  registry.max_blob_bytes = options.store.max_blob_bytes;
  registry.quotas = options.store.quotas;
  DS_ASSIGN_OR_RETURN(std::unique_ptr<store::DeltaStore> remote, store::OpenOciRegistryStore(registry));
  DS_LOG(INFO) << "shared delta store at " << registry.url << " (repositories " << registry.repository_prefix
               << "/...), local cache " << (options.store_dir.empty() ? "in memory" : options.store_dir);
  store::CachingStoreOptions caching;
  caching.resolve_ttl = options.registry_resolve_ttl;
  return std::unique_ptr<store::DeltaStore>(
      std::make_unique<store::CachingStore>(std::move(remote), std::move(local), caching));
}

// The contents of a PEM file named by a flag; INVALID_ARGUMENT naming the flag's purpose when unreadable or not PEM.
absl::StatusOr<std::string> ReadPem(const std::string& path, absl::string_view what) {
  absl::StatusOr<std::string> text = ReadFileToString(path);
  if (!text.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(what, " ", path, " cannot be read: ", text.status().message()));
  }
  if (!absl::StrContains(*text, "-----BEGIN ")) {
    return absl::InvalidArgumentError(absl::StrCat(what, " ", path, " is not a PEM file"));
  }
  return text;
}

// OK when `key_pem` is the private key of the first certificate of `cert_pem`; INVALID_ARGUMENT naming the files
// otherwise (gRPC would only fail later, at bind time or at the first handshake, without saying why).
absl::Status CheckKeyMatchesCertificate(const std::string& cert_pem, const std::string& key_pem,
                                        const std::string& cert_path, const std::string& key_path) {
  std::unique_ptr<BIO, decltype(&BIO_free)> cert_bio(BIO_new_mem_buf(cert_pem.data(), static_cast<int>(cert_pem.size())),
                                                     &BIO_free);
  std::unique_ptr<BIO, decltype(&BIO_free)> key_bio(BIO_new_mem_buf(key_pem.data(), static_cast<int>(key_pem.size())),
                                                    &BIO_free);
  std::unique_ptr<X509, decltype(&X509_free)> cert(
      cert_bio ? PEM_read_bio_X509(cert_bio.get(), nullptr, nullptr, nullptr) : nullptr, &X509_free);
  if (cert == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("TLS certificate ", cert_path, " holds no PEM certificate"));
  }
  std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> key(
      key_bio ? PEM_read_bio_PrivateKey(key_bio.get(), nullptr, nullptr, nullptr) : nullptr, &EVP_PKEY_free);
  if (key == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("TLS key ", key_path, " holds no (unencrypted) PEM private key"));
  }
  if (X509_check_private_key(cert.get(), key.get()) != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("TLS key ", key_path, " does not match the certificate ", cert_path));
  }
  return absl::OkStatus();
}

// The gRPC port's credentials: plaintext, TLS, or TLS verifying client certificates.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(const DeltaServer::Options::Security& s) {
  if (s.tls_cert_file.empty() != s.tls_key_file.empty()) {
    return absl::InvalidArgumentError("TLS needs both a certificate (--tls_cert) and its key (--tls_key)");
  }
  if (s.tls_cert_file.empty()) {
    if (!s.tls_client_ca_file.empty() || s.tls_require_client_cert) {
      return absl::InvalidArgumentError(
          "client certificates (--tls_client_ca, --tls_require_client_cert) need TLS: give --tls_cert and --tls_key");
    }
    return grpc::InsecureServerCredentials();
  }
  if (s.tls_require_client_cert && s.tls_client_ca_file.empty()) {
    return absl::InvalidArgumentError("--tls_require_client_cert needs --tls_client_ca (the CA that signs them)");
  }
  grpc::SslServerCredentialsOptions ssl(
      s.tls_client_ca_file.empty()    ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
      : s.tls_require_client_cert ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                  : GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY);
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  DS_ASSIGN_OR_RETURN(pair.private_key, ReadPem(s.tls_key_file, "TLS key"));
  DS_ASSIGN_OR_RETURN(pair.cert_chain, ReadPem(s.tls_cert_file, "TLS certificate"));
  DS_RETURN_IF_ERROR(
      CheckKeyMatchesCertificate(pair.cert_chain, pair.private_key, s.tls_cert_file, s.tls_key_file));
  ssl.pem_key_cert_pairs.push_back(std::move(pair));
  if (!s.tls_client_ca_file.empty()) {
    DS_ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadPem(s.tls_client_ca_file, "client CA"));
  }
  return grpc::SslServerCredentials(ssl);
}

}  // namespace

absl::StatusOr<std::unique_ptr<DeltaServer>> DeltaServer::Start(const Options& options) {
  std::unique_ptr<DeltaServer> server(new DeltaServer());
  server->options_ = options;
  server->metrics_ = std::make_unique<metrics::ServerMetrics>();

  // Who may call, checked before the model loads so that bad flags fail fast: the audit log first (the
  // authenticator records token changes in it), then the tenants file.
  const Options::Security& security = options.security;
  DS_ASSIGN_OR_RETURN(const std::shared_ptr<grpc::ServerCredentials> credentials, ServerCredentials(security));
  if (!security.audit_log.empty()) {
    auth::AuditLog::Options audit;
    audit.path = security.audit_log;
    audit.sync = security.audit_log_sync;
    DS_ASSIGN_OR_RETURN(server->audit_, auth::AuditLog::Open(audit));
    DS_LOG(INFO) << "audit log at " << security.audit_log;
  }
  auth::Authenticator::Options authn;
  authn.tenants_file = security.tenants_file;
  authn.reload_interval = security.tenants_reload_interval;
  authn.audit = server->audit_.get();
  DS_ASSIGN_OR_RETURN(server->authenticator_, auth::Authenticator::Create(authn));
  if (server->authenticator_->enabled()) {
    DS_LOG(INFO) << "authentication on: tenants and API tokens from " << security.tenants_file;
  } else {
    DS_LOG(WARNING) << "*** AUTHENTICATION IS OFF (no --tenants_file): every caller may read, change and delete "
                       "every tenant's packs and jobs. Use this only on a machine you alone can reach; see "
                       "docs/SECURITY.md to turn it on. ***";
  }
  server->limiter_ = std::make_unique<auth::RequestLimiter>(auth::RequestLimiter::Options{});
  server->call_security_ = std::make_unique<CallSecurity>(server->authenticator_.get(), server->limiter_.get(),
                                                          server->audit_.get());

  // The health-only port comes up before the model loads: alive, not ready.
  grpc::EnableDefaultHealthCheckService(true);
  if (!options.health_listen_address.empty()) {
    grpc::ServerBuilder health_builder;
    health_builder.AddListeningPort(options.health_listen_address, grpc::InsecureServerCredentials(),
                                    &server->health_port_);
    server->health_server_ = health_builder.BuildAndStart();
    if (server->health_server_ == nullptr || server->health_port_ == 0) {
      server->health_server_.reset();
      return absl::UnavailableError(absl::StrCat("cannot listen on ", options.health_listen_address,
                                                 " for health checks (--health_listen: in use, or not a valid "
                                                 "host:port)"));
    }
    server->SetReadiness(false);
    DS_LOG(INFO) << "health checks (grpc.health.v1, plaintext) on " << options.health_listen_address << " (port "
                 << server->health_port_ << "): '" << kLivenessService << "' SERVING, '" << kReadinessService
                 << "' NOT_SERVING until the model is loaded";
  }

  const absl::Time load_start = absl::Now();
  DS_ASSIGN_OR_RETURN(std::unique_ptr<model::Model> model, model::LoadModel(options.model_dir, options.model));
  const double load_seconds = absl::ToDoubleSeconds(absl::Now() - load_start);
  server->model_ = std::move(model);
  const model::ModelInfo& info = server->model_->info();
  DS_LOG(INFO) << "loaded " << info.family << " model '" << info.name << "' from " << options.model_dir << " ("
               << info.num_parameters << " parameters, " << info.dtype << " on " << info.device << ") in "
               << load_seconds << " s";
  server->metrics_->SetModelLoadSeconds(load_seconds);
  server->metrics_->SetModelInfo(info.family, info.dtype, info.device, options.blas, info.num_parameters);

  // Per-tenant store quotas from the tenants file (asked at every push; the file's values override the flags').
  Options store_options = options;
  store_options.store.quotas.lookup =
      [authn = server->authenticator_.get()](const std::string& tenant) -> std::optional<store::Quota> {
    std::optional<auth::TenantQuota> q = authn->QuotaOf(tenant);
    if (!q.has_value()) return std::nullopt;
    return store::Quota{q->store_bytes, q->max_packs};
  };
  DS_ASSIGN_OR_RETURN(std::unique_ptr<store::DeltaStore> opened, OpenStore(store_options));
  server->store_ = store::NewObservedStore(std::move(opened), server->metrics_.get());
  deltas::DeltaManager::Options delta_options = options.deltas;
  delta_options.limits.max_bytes = std::min(delta_options.limits.max_bytes, options.store.max_blob_bytes);
  delta_options.cache_observer = server->metrics_.get();
  server->deltas_ = std::make_unique<deltas::DeltaManager>(server->store_.get(), server->model_.get(), delta_options);
  if (!options.delta_dir.empty()) {
    DS_ASSIGN_OR_RETURN(const deltas::ImportReport report, server->deltas_->ImportDirectory(options.delta_dir));
    DS_LOG(INFO) << "imported " << report.imported << " delta packs from " << options.delta_dir
                 << (report.failed.empty() ? "" : absl::StrCat(" (", report.failed.size(), " skipped, see above)"));
  }
  // The scheduler names requests without a tenant as the store does.
  inference::InferenceEngine::Options engine_options = options.engine;
  engine_options.batching.default_tenant = options.deltas.default_tenant;
  DS_ASSIGN_OR_RETURN(server->engine_,
                      inference::InferenceEngine::Create(server->model_, engine_options, server->metrics_.get(),
                                                         server->deltas_.get()));

  ServerFacts facts;
  facts.server_version = kDeltaserveVersion;
  facts.torch_version = TorchVersion();
  facts.blas = options.blas;
  facts.intra_op_threads = options.intra_op_threads;
  facts.model_load_seconds = load_seconds;
  facts.max_receive_message_bytes = options.max_receive_message_bytes;
  facts.num_deltas = [d = server->deltas_.get()] { return d->num_packs(); };
  server->inference_service_ =
      std::make_unique<InferenceServiceImpl>(server->engine_.get(), server->metrics_.get(), facts,
                                             server->deltas_.get(), server->call_security_.get());

  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen_address, credentials, &server->port_);
  builder.SetMaxReceiveMessageSize(options.max_receive_message_bytes);
  builder.SetMaxSendMessageSize(-1);
  server->delta_service_ = std::make_unique<DeltaServiceImpl>(
      server->deltas_.get(), server->metrics_.get(), server->call_security_.get(),
      DeltaServiceImpl::Options{delta_options.limits.max_bytes});
  builder.RegisterService(server->inference_service_.get());
  builder.RegisterService(server->delta_service_.get());
  tuning::JobManager::Options job_options = options.jobs;
  job_options.trainer.model_dir = options.model_dir;
  job_options.default_tenant = options.deltas.default_tenant;
  job_options.observer = server->metrics_.get();
  job_options.tenant_limits = [authn = server->authenticator_.get()](const std::string& tenant) {
    std::optional<auth::TenantQuota> q = authn->QuotaOf(tenant);
    return q.has_value() ? tuning::TenantJobLimits{q->max_queued_jobs, q->max_running_jobs} : tuning::TenantJobLimits{};
  };
  server->jobs_ = std::make_unique<tuning::JobManager>(server->model_.get(), server->deltas_.get(),
                                                       server->store_.get(), job_options);
  DS_RETURN_IF_ERROR(server->jobs_->Start());
  server->tuning_service_ = std::make_unique<TuningServiceImpl>(
      server->jobs_.get(), server->metrics_.get(), server->call_security_.get(),
      TuningServiceImpl::Options{job_options.max_dataset_bytes});
  builder.RegisterService(server->tuning_service_.get());
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(std::make_unique<ParseErrorInterceptorFactory>());
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || server->port_ == 0) {
    return absl::UnavailableError(absl::StrCat(
        "cannot listen on ", options.listen_address, " (in use, or not a valid host:port",
        security.tls_cert_file.empty() ? ")" : "; or the TLS certificate and key do not match or cannot be parsed)"));
  }
  if (!options.metrics_address.empty()) {
    metrics::MetricsHttpServer::Options http;
    http.listen_address = options.metrics_address;
    http.tls_cert_file = security.metrics_tls_cert_file;
    http.tls_key_file = security.metrics_tls_key_file;
    http.tls_client_ca_file = security.metrics_tls_client_ca_file;
    server->metrics_http_ = std::make_unique<metrics::MetricsHttpServer>(
        http,
        [m = server->metrics_.get()] { return m->Serialize(); });
    DS_RETURN_IF_ERROR(server->metrics_http_->Start());
  }
  if (options.store_gc_interval > absl::ZeroDuration()) {
    server->gc_thread_ = std::thread([s = server.get()] { s->GcLoop(); });
  }
  server->SetReadiness(true);
  DS_LOG(INFO) << "serving deltaserve.v1 on " << options.listen_address << " (port " << server->port_
               << (security.tls_cert_file.empty() ? ", plaintext" : ", TLS") << ")"
               << (server->metrics_http_ ? absl::StrCat(", metrics on ",
                                                        security.metrics_tls_cert_file.empty() ? "http" : "https",
                                                        "://", options.metrics_address,
                                                        "/metrics (port ", server->metrics_http_->port(), ")")
                                         : std::string());
  return server;
}

DeltaServer::~DeltaServer() { Shutdown(absl::ZeroDuration()); }

int DeltaServer::metrics_port() const { return metrics_http_ ? metrics_http_->port() : 0; }

void DeltaServer::GcLoop() {
  store::GcOptions gc;
  gc.grace = options_.store_gc_grace;
  mu_.Lock();
  while (!mu_.AwaitWithTimeout(absl::Condition(&shut_down_), options_.store_gc_interval)) {
    mu_.Unlock();
    const absl::Time start = absl::Now();
    absl::StatusOr<store::GcReport> report = store_->CollectGarbage(gc);
    if (!report.ok()) {
      DS_LOG(WARNING) << "store garbage collection failed (will retry): " << report.status();
    } else if (report->blobs_removed > 0 || report->temp_files_removed > 0) {
      DS_LOG(INFO) << "store garbage collection removed " << report->blobs_removed << " blobs ("
                   << report->bytes_removed << " bytes) and " << report->temp_files_removed
                   << " abandoned uploads in " << absl::ToDoubleSeconds(absl::Now() - start) << " s";
    }
    mu_.Lock();
  }
  mu_.Unlock();
}

void DeltaServer::SetReadiness(bool ready) {
  for (grpc::Server* s : {server_.get(), health_server_.get()}) {
    if (s == nullptr) continue;
    grpc::HealthCheckServiceInterface* health = s->GetHealthCheckService();
    if (health == nullptr) continue;
    health->SetServingStatus(ready);  // "" and every name set so far (liveness is set again below)
    health->SetServingStatus(kReadinessService, ready);
    for (const char* name : {"deltaserve.v1.InferenceService", "deltaserve.v1.DeltaService",
                             "deltaserve.v1.TuningService"}) {
      health->SetServingStatus(name, ready);
    }
    health->SetServingStatus(kLivenessService, true);
  }
  metrics_->SetReady(ready);
}

void DeltaServer::BeginDrain() {
  {
    absl::MutexLock lock(&mu_);
    if (draining_) return;
    draining_ = true;
  }
  SetReadiness(false);
  DS_LOG(INFO) << "draining: readiness NOT_SERVING, calls are still served";
}

bool DeltaServer::draining() const {
  absl::MutexLock lock(&mu_);
  return draining_;
}

void DeltaServer::Shutdown(absl::Duration drain) {
  {
    absl::MutexLock lock(&mu_);
    if (shut_down_) return;
    shut_down_ = true;
  }
  BeginDrain();
  if (gc_thread_.joinable()) gc_thread_.join();  // woken by shut_down_; a collection in progress finishes first
  if (server_) {
    // Stops accepting new calls and waits up to `drain` for in-flight ones, then cancels what is left.
    server_->Shutdown(std::chrono::system_clock::now() +
                      std::chrono::microseconds(absl::ToInt64Microseconds(drain)));
  }
  if (engine_) engine_->Stop();
  if (metrics_http_) metrics_http_->Stop();
  if (server_) server_->Wait();
  // Interrupts a running job at its next step; it resumes from its checkpoint at the next start.
  jobs_.reset();
  if (health_server_) {
    // Last: liveness stays SERVING until everything else has stopped.
    health_server_->GetHealthCheckService()->SetServingStatus(false);
    health_server_->Shutdown(std::chrono::system_clock::now());
    health_server_->Wait();
  }
  DS_LOG(INFO) << "server stopped";
  absl::MutexLock lock(&mu_);
  stopped_ = true;
}

void DeltaServer::Wait() {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(&stopped_));
}

}  // namespace service
}  // namespace deltaserve

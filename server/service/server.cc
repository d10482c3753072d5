#include "server/service/server.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "server/common/logging.h"
#include "server/common/status_macros.h"
#include "server/metrics/http_server.h"
#include "server/metrics/metrics.h"
#include "server/model/model_loader.h"
#include "delta_store/caching_store.h"
#include "delta_store/memory_store.h"
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

}  // namespace

absl::StatusOr<std::unique_ptr<DeltaServer>> DeltaServer::Start(const Options& options) {
  std::unique_ptr<DeltaServer> server(new DeltaServer());
  server->options_ = options;
  server->metrics_ = std::make_unique<metrics::ServerMetrics>();

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

  DS_ASSIGN_OR_RETURN(server->store_, OpenStore(options));
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
                                             server->deltas_.get());

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen_address, grpc::InsecureServerCredentials(), &server->port_);
  builder.SetMaxReceiveMessageSize(options.max_receive_message_bytes);
  builder.SetMaxSendMessageSize(-1);
  server->delta_service_ = std::make_unique<DeltaServiceImpl>(
      server->deltas_.get(), server->metrics_.get(),
      DeltaServiceImpl::Options{delta_options.limits.max_bytes});
  builder.RegisterService(server->inference_service_.get());
  builder.RegisterService(server->delta_service_.get());
  tuning::JobManager::Options job_options = options.jobs;
  job_options.trainer.model_dir = options.model_dir;
  job_options.default_tenant = options.deltas.default_tenant;
  job_options.observer = server->metrics_.get();
  server->jobs_ = std::make_unique<tuning::JobManager>(server->model_.get(), server->deltas_.get(),
                                                       server->store_.get(), job_options);
  DS_RETURN_IF_ERROR(server->jobs_->Start());
  server->tuning_service_ = std::make_unique<TuningServiceImpl>(
      server->jobs_.get(), server->metrics_.get(), TuningServiceImpl::Options{job_options.max_dataset_bytes});
  builder.RegisterService(server->tuning_service_.get());
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(std::make_unique<ParseErrorInterceptorFactory>());
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || server->port_ == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", options.listen_address, " (in use, or not a valid host:port)"));
  }
  if (!options.metrics_address.empty()) {
    server->metrics_http_ = std::make_unique<metrics::MetricsHttpServer>(
        metrics::MetricsHttpServer::Options{options.metrics_address},
        [m = server->metrics_.get()] { return m->Serialize(); });
    DS_RETURN_IF_ERROR(server->metrics_http_->Start());
  }
  server->server_->GetHealthCheckService()->SetServingStatus(true);
  server->server_->GetHealthCheckService()->SetServingStatus("deltaserve.v1.InferenceService", true);
  server->server_->GetHealthCheckService()->SetServingStatus("deltaserve.v1.DeltaService", true);
  server->server_->GetHealthCheckService()->SetServingStatus("deltaserve.v1.TuningService", true);
  DS_LOG(INFO) << "serving deltaserve.v1 on " << options.listen_address << " (port " << server->port_ << ")"
               << (server->metrics_http_ ? absl::StrCat(", metrics on http://", options.metrics_address,
                                                        "/metrics (port ", server->metrics_http_->port(), ")")
                                         : std::string());
  return server;
}

DeltaServer::~DeltaServer() { Shutdown(absl::ZeroDuration()); }

int DeltaServer::metrics_port() const { return metrics_http_ ? metrics_http_->port() : 0; }

void DeltaServer::Shutdown(absl::Duration drain) {
  {
    absl::MutexLock lock(&mu_);
    if (shut_down_) return;
    shut_down_ = true;
  }
  if (server_) {
    server_->GetHealthCheckService()->SetServingStatus(false);
    // Stops accepting new calls and waits up to `drain` for in-flight ones, then cancels what is left.
    server_->Shutdown(std::chrono::system_clock::now() +
                      std::chrono::microseconds(absl::ToInt64Microseconds(drain)));
  }
  if (engine_) engine_->Stop();
  if (metrics_http_) metrics_http_->Stop();
  if (server_) server_->Wait();
  // Interrupts a running job at its next step; it resumes from its checkpoint at the next start.
  jobs_.reset();
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

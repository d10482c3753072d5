// deltaserve: serves one frozen pre-trained model (and, later, many tenants' deltas on it) over gRPC.
// Flags are read here and only here; everything else takes Options structs.
#include <pthread.h>
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "server/batching/batcher.h"
#include "server/common/logging.h"
#include "server/service/platform.h"
#include "server/service/server.h"
#include "server/service/version.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:50051", "gRPC listen address (host:port; port 0 = any free port).");
ABSL_FLAG(std::string, metrics_listen, "127.0.0.1:9464",
          "Prometheus /metrics HTTP address (host:port; empty disables it).");
ABSL_FLAG(std::string, tenants_file, "",
          "Tenants, API token hashes, roles and quotas (docs/SECURITY.md; edit with `deltactl admin`). Empty = NO "
          "AUTHENTICATION: every caller may act for every tenant (local use only).");
ABSL_FLAG(double, tenants_reload_s, 2, "How often the tenants file is checked for changes, in seconds.");
ABSL_FLAG(std::string, audit_log, "", "Append a JSON line for every mutation and refused attempt to this file.");
ABSL_FLAG(bool, audit_log_sync, false, "fsync the audit log after every line.");
ABSL_FLAG(std::string, tls_cert, "", "TLS for the gRPC port: PEM certificate chain (with --tls_key).");
ABSL_FLAG(std::string, tls_key, "", "TLS for the gRPC port: PEM private key.");
ABSL_FLAG(std::string, tls_client_ca, "",
          "Verify client certificates signed by this PEM CA; a tenant's certificate_names authenticate it (mTLS).");
ABSL_FLAG(bool, tls_require_client_cert, false, "With --tls_client_ca: refuse clients without a valid certificate.");
ABSL_FLAG(std::string, metrics_tls_cert, "", "TLS for the metrics port: PEM certificate chain (with --metrics_tls_key).");
ABSL_FLAG(std::string, metrics_tls_key, "", "TLS for the metrics port: PEM private key.");
ABSL_FLAG(std::string, metrics_tls_client_ca, "",
          "Metrics port: require client certificates signed by this PEM CA (e.g. Prometheus's).");
ABSL_FLAG(std::string, model_dir, "models/use-lite", "Model directory (config.json, model.safetensors, vocab).");
ABSL_FLAG(std::string, store_dir, "",
          "Delta store directory (created if missing; docs/STORE.md). Empty = an in-memory store, lost at exit.");
ABSL_FLAG(std::string, store_url, "",
          "A shared delta store on an OCI registry (http[s]://host:port), for several replicas; --store_dir is then "
          "its local cache. Credentials: $DELTASERVE_REGISTRY_TOKEN (bearer) or $DELTASERVE_REGISTRY_USER / "
          "$DELTASERVE_REGISTRY_PASSWORD.");
ABSL_FLAG(std::string, store_prefix, "deltaserve", "Repository prefix of the shared store in the registry.");
ABSL_FLAG(double, store_resolve_ttl_s, 0,
          "Reuse a resolved reference of the shared store this long (0 = ask the registry every time, so label "
          "moves on other replicas apply at once).");
ABSL_FLAG(std::string, delta_dir, "",
          "Directory of pack files (<task>.dpack, or <tenant>/<task>.dpack) pushed into the store at start.");
ABSL_FLAG(int64_t, max_pack_bytes, int64_t{256} << 20, "Largest delta pack accepted (push, import, load).");
ABSL_FLAG(int64_t, tenant_store_bytes, 0, "Per-tenant quota: bytes of distinct packs stored (0 = unlimited).");
ABSL_FLAG(int64_t, tenant_store_versions, 0, "Per-tenant quota: pack versions stored (0 = unlimited).");
ABSL_FLAG(double, store_gc_interval_s, 6 * 3600,
          "Collect the store's garbage (unreferenced blobs, abandoned uploads) this often, in seconds (0 = never).");
ABSL_FLAG(double, store_gc_grace_s, 3600,
          "Garbage collection keeps unreferenced blobs younger than this (a push may be about to reference them).");
ABSL_FLAG(bool, verify_every_read, false,
          "Check a stored pack's digest on every read (true) or on its first read since start (false).");
ABSL_FLAG(int64_t, delta_cache_bytes, int64_t{1} << 30,
          "Delta pack cache, tier 1: bytes of packs kept loaded on the model's device (packs in use may exceed it "
          "until they finish).");
ABSL_FLAG(int64_t, host_cache_bytes, int64_t{1} << 30,
          "Delta pack cache, tier 2: bytes (serialized size) of recently evicted packs kept in host memory, so "
          "that reloading them skips the store (0 = off).");
ABSL_FLAG(std::string, jobs_dir, "",
          "Where fine-tuning jobs persist (records, dataset copies, checkpoints); \"\" = in memory (lost at exit).");
ABSL_FLAG(int, max_concurrent_jobs, 1, "Fine-tuning jobs that train at the same time.");
ABSL_FLAG(int, max_queued_jobs_per_tenant, 16, "Fine-tuning jobs one tenant may have queued or running.");
ABSL_FLAG(int64_t, max_dataset_bytes, int64_t{256} << 20, "Largest dataset upload, in bytes.");
ABSL_FLAG(int, training_threads, 1,
          "Intra-op threads of each fine-tuning job (0 = as many as serving); serving keeps the rest.");
ABSL_FLAG(int, training_nice, 10, "Niceness added to training threads.");
ABSL_FLAG(bool, training_yields_to_serving, true,
          "Training threads wait between ops while a serving forward pass runs, so that serving keeps its latency.");
ABSL_FLAG(int64_t, training_micro_batch_tokens, 256,
          "Fine-tuning steps run forward/backward in micro-batches of at most this many padded tokens, so that a "
          "serving forward never waits long for a training op (0 = whole batches).");
ABSL_FLAG(int64_t, checkpoint_every_steps, 50, "Fine-tuning jobs checkpoint every this many steps (and per epoch).");
ABSL_FLAG(bool, allow_full_finetuning, false,
          "Allow `full` fine-tuning jobs (a private copy of every weight: the baseline deltas are compared with).");
ABSL_FLAG(std::string, device, "cpu", "Device for the model: cpu, cuda, cuda:N.");
ABSL_FLAG(std::string, dtype, "float32",
          "Compute dtype: float32 (exact) or bfloat16 (oneDNN; faster on CPUs with AVX512-BF16/AMX).");
ABSL_FLAG(std::string, blas, "openblas",
          "BLAS for float32 matmuls: openblas (fast, default), blis, reference (slow), system (as installed).");
ABSL_FLAG(int, threads, 0, "LibTorch intra-op threads (0 = $OMP_NUM_THREADS when set, else every core).");
ABSL_FLAG(int, max_batch_rows, 32, "Most input sequences in one forward pass.");
ABSL_FLAG(int64_t, max_batch_tokens, 16384, "Most padded tokens (rows x longest row) in one forward pass.");
ABSL_FLAG(double, max_queue_delay_ms, 2.0, "How long a queued input waits for its batch to fill, at most.");
ABSL_FLAG(int64_t, max_queued_rows, 4096, "Most inputs waiting for a batch; beyond: RESOURCE_EXHAUSTED.");
ABSL_FLAG(int64_t, max_queued_rows_per_tenant, 1024,
          "Most inputs one tenant may have waiting (0 = only --max_queued_rows); beyond: RESOURCE_EXHAUSTED with a "
          "retry hint. Keep it well under --max_queued_rows.");
ABSL_FLAG(std::string, tenant_weights, "",
          "Fair-share weights, \"tenant=weight,...\" (e.g. \"acme=4,beta=0.5\"); tenants not listed weigh 1.");
ABSL_FLAG(bool, pack_tokens, true,
          "Run the per-token layers of a batch on its real tokens only (no compute on padding; rows of any length "
          "and prompt-tuned rows share one forward pass), in serving and in fine-tuning jobs. false: every pass is "
          "padded to its longest row.");
ABSL_FLAG(double, max_padding_ratio, 1.5,
          "Without --pack_tokens: split a batch into length-sorted forward passes when its padded tokens exceed this "
          "multiple of its real tokens (0 = never split).");
ABSL_FLAG(double, packed_max_padding_ratio, 4.0,
          "With --pack_tokens: the same split, where padding costs attention only (0 = never split).");
ABSL_FLAG(double, merge_break_even, 1.0,
          "Merge mode: a forward pass whose rows all carry one mergeable pack (lora, bitfit, ln_tuning, ia3) folds it "
          "into the weights when its tokens (real ones when packed) reach this multiple of the pack's break-even size "
          "(0 = never).");
ABSL_FLAG(int, batch_threads, 1, "Threads running batches (1 is right on CPU).");
ABSL_FLAG(int, max_inputs_per_request, 256, "Most texts or id lists in one Embed request.");
ABSL_FLAG(int64_t, max_text_bytes, 1 << 20, "Longest text accepted, in bytes.");
ABSL_FLAG(int64_t, max_sequence_length, 0, "Longest model input in tokens (0 = the model's maximum).");
ABSL_FLAG(bool, truncate, true,
          "Cut inputs longer than the maximum sequence length (true) or answer INVALID_ARGUMENT (false). "
          "A request can override it.");
ABSL_FLAG(int, max_message_bytes, 16 << 20, "Largest gRPC request accepted, in bytes.");
ABSL_FLAG(std::string, port_file, "",
          "If set, write \"<grpc port> <metrics port> <health port (0: none)>\" to this file once serving (for tests and scripts that "
          "start the server on port 0).");
ABSL_FLAG(std::string, health_listen, "",
          "A second, plaintext gRPC port serving only grpc.health.v1 (host:port; \"\" = none). It is up before the "
          "model loads: service 'liveness' is SERVING while the process runs, '' and 'readiness' once it is ready "
          "for calls and until it drains (for Kubernetes' gRPC probes, which cannot use TLS).");
ABSL_FLAG(double, drain_delay_s, 0,
          "On SIGTERM/SIGINT: readiness turns NOT_SERVING at once, then calls are still accepted for this many "
          "seconds (so load balancers notice) before the server stops accepting them. SIGUSR1 starts draining "
          "without stopping (a Kubernetes preStop hook).");
ABSL_FLAG(double, drain_seconds, 30,
          "On SIGTERM/SIGINT, after --drain_delay_s: how long in-flight calls may take to finish.");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("deltaserve: multi-tenant delta serving on one frozen model. See README.md.");
  absl::ParseCommandLine(argc, argv);

  if (absl::Status st = deltaserve::SelectBlas(absl::GetFlag(FLAGS_blas), argv); !st.ok()) {
    std::fprintf(stderr, "deltaserve: %s\n", std::string(st.message()).c_str());
    return 2;
  }
  deltaserve::ConfigureAllocator();
  const double drain_delay_s = absl::GetFlag(FLAGS_drain_delay_s);
  const double drain_seconds = absl::GetFlag(FLAGS_drain_seconds);
  if (!(drain_delay_s >= 0) || !(drain_seconds >= 0)) {
    std::fprintf(stderr, "deltaserve: --drain_delay_s and --drain_seconds must be >= 0 (got %g and %g)\n",
                 drain_delay_s, drain_seconds);
    return 2;
  }
  for (const auto& [name, value] : {std::make_pair("--max_padding_ratio", absl::GetFlag(FLAGS_max_padding_ratio)),
                                    std::make_pair("--packed_max_padding_ratio",
                                                   absl::GetFlag(FLAGS_packed_max_padding_ratio))}) {
    if (!(value >= 0)) {
      std::fprintf(stderr, "deltaserve: %s must be >= 0 (0 = never split a batch by length), got %g\n", name, value);
      return 2;
    }
  }
  if (absl::GetFlag(FLAGS_dtype) == "bfloat16" && absl::GetFlag(FLAGS_batch_threads) > 1 &&
      std::getenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY") == nullptr) {
    // docs/MODELS.md, "bfloat16 and oneDNN": measured, a server with --batch_threads=3 died within seconds, and ran
    // clean with a cache that never evicts.
    std::fprintf(stderr,
                 "deltaserve: --batch_threads=%d cannot run with --dtype=bfloat16 as is: bfloat16 matmuls run in "
                 "oneDNN, which crashes (SIGSEGV) with batches on several threads once its primitive cache evicts; "
                 "use --batch_threads=1 (one batch already uses every core), or set "
                 "ONEDNN_PRIMITIVE_CACHE_CAPACITY=1048576 (never evict; memory grows with the shapes seen)\n",
                 absl::GetFlag(FLAGS_batch_threads));
    return 2;
  }
  // Block SIGTERM/SIGINT/SIGUSR1 in every thread (from the start, so that one sent while the model loads waits);
  // one thread waits for them with sigwait.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  deltaserve::service::DeltaServer::Options options;
  options.listen_address = absl::GetFlag(FLAGS_listen);
  options.metrics_address = absl::GetFlag(FLAGS_metrics_listen);
  options.health_listen_address = absl::GetFlag(FLAGS_health_listen);
  options.security.tenants_file = absl::GetFlag(FLAGS_tenants_file);
  options.security.tenants_reload_interval = absl::Seconds(absl::GetFlag(FLAGS_tenants_reload_s));
  options.security.audit_log = absl::GetFlag(FLAGS_audit_log);
  options.security.audit_log_sync = absl::GetFlag(FLAGS_audit_log_sync);
  options.security.tls_cert_file = absl::GetFlag(FLAGS_tls_cert);
  options.security.tls_key_file = absl::GetFlag(FLAGS_tls_key);
  options.security.tls_client_ca_file = absl::GetFlag(FLAGS_tls_client_ca);
  options.security.tls_require_client_cert = absl::GetFlag(FLAGS_tls_require_client_cert);
  options.security.metrics_tls_cert_file = absl::GetFlag(FLAGS_metrics_tls_cert);
  options.security.metrics_tls_key_file = absl::GetFlag(FLAGS_metrics_tls_key);
  options.security.metrics_tls_client_ca_file = absl::GetFlag(FLAGS_metrics_tls_client_ca);
  options.model_dir = absl::GetFlag(FLAGS_model_dir);
  options.store_dir = absl::GetFlag(FLAGS_store_dir);
  options.delta_dir = absl::GetFlag(FLAGS_delta_dir);
  options.registry.url = absl::GetFlag(FLAGS_store_url);
  options.registry.repository_prefix = absl::GetFlag(FLAGS_store_prefix);
  if (const char* token = std::getenv("DELTASERVE_REGISTRY_TOKEN")) options.registry.bearer_token = token;
  if (const char* user = std::getenv("DELTASERVE_REGISTRY_USER")) options.registry.username = user;
  if (const char* password = std::getenv("DELTASERVE_REGISTRY_PASSWORD")) options.registry.password = password;
  options.registry_resolve_ttl = absl::Seconds(absl::GetFlag(FLAGS_store_resolve_ttl_s));
  options.store.max_blob_bytes = absl::GetFlag(FLAGS_max_pack_bytes);
  options.store.quotas.default_quota.max_bytes = absl::GetFlag(FLAGS_tenant_store_bytes);
  options.store.quotas.default_quota.max_versions = absl::GetFlag(FLAGS_tenant_store_versions);
  options.store.verify_every_read = absl::GetFlag(FLAGS_verify_every_read);
  options.store_gc_interval = absl::Seconds(absl::GetFlag(FLAGS_store_gc_interval_s));
  options.store_gc_grace = absl::Seconds(absl::GetFlag(FLAGS_store_gc_grace_s));
  if (!(absl::GetFlag(FLAGS_store_gc_interval_s) >= 0) || !(absl::GetFlag(FLAGS_store_gc_grace_s) >= 0)) {
    std::fprintf(stderr, "deltaserve: --store_gc_interval_s and --store_gc_grace_s must be >= 0\n");
    return 2;
  }
  options.deltas.cache_bytes = absl::GetFlag(FLAGS_delta_cache_bytes);
  options.deltas.host_cache_bytes = absl::GetFlag(FLAGS_host_cache_bytes);
  options.jobs.jobs_dir = absl::GetFlag(FLAGS_jobs_dir);
  options.jobs.max_concurrent_jobs = absl::GetFlag(FLAGS_max_concurrent_jobs);
  options.jobs.max_queued_jobs_per_tenant = absl::GetFlag(FLAGS_max_queued_jobs_per_tenant);
  options.jobs.max_dataset_bytes = absl::GetFlag(FLAGS_max_dataset_bytes);
  options.jobs.trainer.threads = absl::GetFlag(FLAGS_training_threads);
  options.jobs.trainer.nice = absl::GetFlag(FLAGS_training_nice);
  options.jobs.trainer.yield_to_serving = absl::GetFlag(FLAGS_training_yields_to_serving);
  options.jobs.trainer.micro_batch_tokens = absl::GetFlag(FLAGS_training_micro_batch_tokens);
  options.jobs.trainer.checkpoint_every_steps = absl::GetFlag(FLAGS_checkpoint_every_steps);
  options.jobs.trainer.allow_full = absl::GetFlag(FLAGS_allow_full_finetuning);
  options.model.device = absl::GetFlag(FLAGS_device);
  options.model.dtype = absl::GetFlag(FLAGS_dtype);
  options.engine.max_inputs_per_request = absl::GetFlag(FLAGS_max_inputs_per_request);
  options.engine.max_text_bytes = absl::GetFlag(FLAGS_max_text_bytes);
  options.engine.max_sequence_length = absl::GetFlag(FLAGS_max_sequence_length);
  options.engine.truncate_by_default = absl::GetFlag(FLAGS_truncate);
  options.engine.pack_tokens = absl::GetFlag(FLAGS_pack_tokens);
  options.jobs.trainer.pack_tokens = absl::GetFlag(FLAGS_pack_tokens);
  options.engine.max_padding_ratio = absl::GetFlag(FLAGS_max_padding_ratio);
  options.engine.packed_max_padding_ratio = absl::GetFlag(FLAGS_packed_max_padding_ratio);
  options.engine.merge_break_even = absl::GetFlag(FLAGS_merge_break_even);
  options.engine.batching.max_batch_rows = absl::GetFlag(FLAGS_max_batch_rows);
  options.engine.batching.max_batch_tokens = absl::GetFlag(FLAGS_max_batch_tokens);
  options.engine.batching.max_queue_delay = absl::Microseconds(absl::GetFlag(FLAGS_max_queue_delay_ms) * 1000);
  options.engine.batching.max_queued_rows = absl::GetFlag(FLAGS_max_queued_rows);
  options.engine.batching.max_queued_rows_per_tenant = absl::GetFlag(FLAGS_max_queued_rows_per_tenant);
  if (auto weights = deltaserve::batching::ParseTenantWeights(absl::GetFlag(FLAGS_tenant_weights)); weights.ok()) {
    options.engine.batching.tenant_weights = *std::move(weights);
  } else {
    std::fprintf(stderr, "deltaserve: --tenant_weights: %s\n", std::string(weights.status().message()).c_str());
    return 2;
  }
  options.engine.batching.num_threads = absl::GetFlag(FLAGS_batch_threads);
  options.max_receive_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  options.intra_op_threads = deltaserve::SetIntraOpThreads(absl::GetFlag(FLAGS_threads));
  options.blas = deltaserve::LoadedBlas();
  DS_LOG(INFO) << "deltaserve " << deltaserve::kDeltaserveVersion << " (LibTorch " << deltaserve::TorchVersion()
               << ", BLAS " << options.blas << ", " << options.intra_op_threads << " intra-op threads)";

  auto server = deltaserve::service::DeltaServer::Start(options);
  if (!server.ok()) {
    std::fprintf(stderr, "deltaserve: cannot start: %s\n", server.status().ToString().c_str());
    return 1;
  }
  if (const std::string port_file = absl::GetFlag(FLAGS_port_file); !port_file.empty()) {
    const std::string tmp = port_file + ".tmp";
    if (std::FILE* f = std::fopen(tmp.c_str(), "w")) {
      std::fprintf(f, "%d %d %d\n", (*server)->port(), (*server)->metrics_port(), (*server)->health_port());
      std::fclose(f);
      std::rename(tmp.c_str(), port_file.c_str());
    } else {
      DS_LOG(ERROR) << "cannot write --port_file " << port_file;
    }
  }
  std::thread signal_thread([&signals, s = server->get(), drain_delay_s, drain_seconds] {
    int sig = 0;
    while (sigwait(&signals, &sig) == 0 && sig == SIGUSR1) {
      DS_LOG(INFO) << "received SIGUSR1";
      s->BeginDrain();
    }
    DS_LOG(INFO) << "received " << (sig == SIGTERM ? "SIGTERM" : "SIGINT") << "; draining";
    s->BeginDrain();
    // Still serving for --drain_delay_s (a second SIGTERM/SIGINT cuts it short).
    const absl::Time delay_end = absl::Now() + absl::Seconds(drain_delay_s);
    for (absl::Duration left = delay_end - absl::Now(); left > absl::ZeroDuration(); left = delay_end - absl::Now()) {
      const timespec timeout = absl::ToTimespec(left);
      const int got = sigtimedwait(&signals, nullptr, &timeout);
      if (got == SIGTERM || got == SIGINT) break;
    }
    s->Shutdown(absl::Seconds(drain_seconds));
  });
  (*server)->Wait();
  signal_thread.join();
  server->reset();
  return 0;
}

// JobManager: the fine-tuning jobs of every tenant — validates and queues submitted jobs, runs them on worker
// threads with a Trainer, publishes each result as the next version of the tenant's task (with the requested
// labels), and keeps every job durable.
//
// Durability (Options::jobs_dir non-empty): each job has a directory <jobs_dir>/<id>/ holding job.json (the
// deltaserve.v1.Job record, rewritten atomically on every state change and checkpoint), its datasets (copied from
// the store at submit, so that a store GC cannot take them away) and checkpoint.safetensors (the trainer's
// Checkpoint: parameters, optimizer state, best epoch, position). Start() reloads them: a job that was RUNNING
// resumes from its last checkpoint (attempts + 1), a QUEUED job stays queued, finished jobs stay listable. A
// crash between the end of training and the push re-runs no step: the final checkpoint gives the same pack, and
// pushing the same pack twice is idempotent. With jobs_dir empty jobs live in memory only (lost on restart).
//
// Scheduling: at most max_concurrent_jobs run at once, oldest queued first among tenants under their running limit
// (Options::tenant_limits); each tenant may have at most max_queued_jobs_per_tenant (or its own limit) jobs
// waiting or running (RESOURCE_EXHAUSTED beyond). Jobs run on their own threads
// with TrainerOptions::threads intra-op threads at a lower priority (nice), so that serving keeps its latency.
//
// Tenancy: every job belongs to a tenant; another tenant's job is NOT_FOUND, as in the store, and so is a dataset
// the tenant did not upload itself.
//
// Thread-safe. Owns its worker threads; the destructor stops them (a running job is interrupted, not cancelled:
// it stays RUNNING on disk and resumes at the next Start()).
#ifndef DELTASERVE_SERVER_TUNING_JOB_MANAGER_H_
#define DELTASERVE_SERVER_TUNING_JOB_MANAGER_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "delta_store/store.h"
#include "deltaserve/v1/tuning.pb.h"
#include "server/deltas/delta_manager.h"
#include "server/model/model.h"
#include "server/tuning/job_observer.h"
#include "server/tuning/trainer.h"

namespace deltaserve {
namespace tuning {

struct TenantJobLimits {
  int64_t max_queued = 0;   // jobs queued or running; 0 = Options::max_queued_jobs_per_tenant
  int64_t max_running = 0;  // jobs running at once; 0 = no per-tenant bound (max_concurrent_jobs still applies)
};

class JobManager {
 public:
  struct Options {
    // Where jobs persist ("" = in memory only; jobs are lost on restart).
    std::string jobs_dir;
    // Jobs that train at the same time.
    int max_concurrent_jobs = 1;
    // Jobs one tenant may have queued or running.
    int max_queued_jobs_per_tenant = 16;
    // Largest dataset upload, in bytes.
    int64_t max_dataset_bytes = int64_t{256} << 20;
    // Most examples in one dataset.
    int64_t max_dataset_examples = 1000000;
    // How the trainer runs (threads, niceness, checkpoint interval, whether `full` is allowed).
    TrainerOptions trainer;
    // The tenant a request with an empty tenant acts for.
    std::string default_tenant = "default";
    // Progress events reach watchers at most this often (evaluations and state changes at once).
    absl::Duration progress_interval = absl::Milliseconds(200);
    // Told about jobs; nullptr = nobody. Must outlive the manager.
    JobObserver* observer = nullptr;
    // A tenant's own limits (e.g. from the tenants file): jobs queued or running, and jobs running at once; a 0
    // field = max_queued_jobs_per_tenant, resp. no per-tenant bound. Asked at every submit and every scheduling
    // decision; must be thread-safe and quick. Empty = the server-wide settings for everyone.
    std::function<TenantJobLimits(const std::string& tenant)> tenant_limits;
  };

  // REQUIRES: model, deltas and store outlive the manager; `store` is the one `deltas` publishes to.
  JobManager(const model::Model* model, deltas::DeltaManager* deltas, store::DeltaStore* store, Options options);
  ~JobManager();

  // Loads the persisted jobs (see the class comment) and starts the workers. Call once, before the RPCs.
  // An unreadable job directory is logged and skipped, never fatal.
  absl::Status Start();

  // Stores an uploaded dataset as a blob (content addressed). INVALID_ARGUMENT for empty bytes;
  // RESOURCE_EXHAUSTED over max_dataset_bytes; DATA_LOSS when `expected_digest` does not match.
  absl::StatusOr<store::BlobInfo> UploadDataset(const std::string& tenant, const std::string& expected_digest,
                                                absl::string_view bytes);

  // Validates and queues a job (see TuningService.SubmitJob). Returns the job and whether it was created (false
  // when request_id named an existing job of the tenant).
  absl::StatusOr<std::pair<deltaserve::v1::Job, bool>> Submit(const deltaserve::v1::SubmitJobRequest& request);

  absl::StatusOr<deltaserve::v1::Job> Get(const std::string& tenant, const std::string& id);
  absl::StatusOr<deltaserve::v1::ListJobsResponse> List(const deltaserve::v1::ListJobsRequest& request);
  absl::StatusOr<deltaserve::v1::Job> Cancel(const std::string& tenant, const std::string& id);

  // Waits until the job changed since `*seen` (0 = return it at once) or `timeout` passed, then returns it and
  // sets *seen to its change counter. NOT_FOUND for an unknown job.
  absl::StatusOr<deltaserve::v1::Job> Watch(const std::string& tenant, const std::string& id, int64_t* seen,
                                            absl::Duration timeout);

  // True for SUCCEEDED, FAILED and CANCELLED.
  static bool IsFinal(deltaserve::v1::JobState state);

 private:
  struct Entry;
  absl::StatusOr<std::string> Tenant(const std::string& tenant) const;
  // Parses, labels and splits a job's datasets (at submit from the store, at run from the job's copies).
  absl::StatusOr<TrainingProblem> BuildProblem(const deltaserve::v1::Job& job, const std::string& train_bytes,
                                               const std::string& validation_bytes) const;
  // The bytes of dataset `digest` uploaded by `tenant`; NOT_FOUND when missing or uploaded by another tenant only.
  TenantJobLimits LimitsOf(const std::string& tenant) const;
  // The first queued job whose tenant is under its running limit, if any.
  std::optional<std::string> NextRunnable() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<std::string> ReadBlob(const std::string& tenant, const std::string& digest, const char* what) const;
  // The content of the blob that records `tenant`'s upload of dataset `digest`.
  static std::string DatasetClaim(const std::string& tenant, const std::string& digest);
  absl::Status Persist(const Entry& entry) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::string JobDir(const std::string& id) const;
  void WorkerLoop();
  void RunJob(const std::shared_ptr<Entry>& entry);
  void Finish(const std::shared_ptr<Entry>& entry, deltaserve::v1::JobState state, const absl::Status& error);
  void Changed(Entry* entry) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void NotifyCounts();

  const model::Model* const model_;
  deltas::DeltaManager* const deltas_;
  store::DeltaStore* const store_;
  const Options options_;
  const Trainer trainer_;

  mutable absl::Mutex mu_;
  absl::CondVar work_cv_;     // a job was queued, or stopping
  absl::CondVar changed_cv_;  // some job changed (watchers)
  std::map<std::string, std::shared_ptr<Entry>> jobs_ ABSL_GUARDED_BY(mu_);  // by id
  std::deque<std::string> queue_ ABSL_GUARDED_BY(mu_);                       // queued ids, oldest first
  int running_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_;
};

}  // namespace tuning
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_TUNING_JOB_MANAGER_H_

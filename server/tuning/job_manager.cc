#include "server/tuning/job_manager.h"

#include <algorithm>
#include <filesystem>
#include <optional>
#include <random>
#include <set>
#include <system_error>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "google/protobuf/util/json_util.h"
#include "server/common/file_util.h"
#include "server/common/logging.h"
#include "server/common/sha256.h"
#include "server/common/status_macros.h"
#include "server/delta/method.h"
#include "server/model/safetensors.h"

namespace deltaserve {
namespace tuning {

namespace pb = ::deltaserve::v1;
namespace fs = std::filesystem;

namespace {

constexpr char kJobFile[] = "job.json";
constexpr char kCheckpointFile[] = "checkpoint.safetensors";
constexpr char kTrainFile[] = "train.data";
constexpr char kValidationFile[] = "validation.data";
constexpr char kCheckpointStateKey[] = "deltaserve.checkpoint";
constexpr double kDefaultValidationFraction = 0.1;

const char* StateName(pb::JobState state) {
  switch (state) {
    case pb::JOB_STATE_QUEUED: return "queued";
    case pb::JOB_STATE_RUNNING: return "running";
    case pb::JOB_STATE_SUCCEEDED: return "succeeded";
    case pb::JOB_STATE_FAILED: return "failed";
    case pb::JOB_STATE_CANCELLED: return "cancelled";
    default: return "unknown";
  }
}

int64_t UnixMicros(absl::Time t) { return absl::ToUnixMicros(t); }

std::string NewJobId() {
  static absl::Mutex mu(absl::kConstInit);
  static std::mt19937_64* rng = nullptr;
  absl::MutexLock lock(&mu);
  if (rng == nullptr) rng = new std::mt19937_64(std::random_device{}() ^ static_cast<uint64_t>(absl::GetCurrentTimeNanos()));
  // Sortable by creation time (hex microseconds), then random.
  return absl::StrFormat("job-%011x-%06x", absl::ToUnixMicros(absl::Now()) / 1000, (*rng)() & 0xffffff);
}

absl::StatusOr<DatasetOptions> ToDatasetOptions(const pb::DatasetSpec& spec, int64_t max_bytes,
                                                int64_t max_examples) {
  DatasetOptions options;
  DS_ASSIGN_OR_RETURN(options.format, ParseDatasetFormat(spec.format().empty() ? "auto" : spec.format()));
  options.header = !spec.no_header();
  options.text_column = spec.text_column();
  options.text_pair_column = spec.text_pair_column();
  options.label_column = spec.label_column();
  options.max_bytes = max_bytes;
  options.max_examples = max_examples;
  return options;
}

// The job's hyper-parameters with defaults filled in.
HyperParameters ToHyperParameters(const pb::HyperParameters& p) {
  HyperParameters hp;
  if (p.has_learning_rate()) hp.learning_rate = p.learning_rate();
  if (p.has_head_learning_rate()) hp.head_learning_rate = p.head_learning_rate();
  if (p.has_epochs()) hp.epochs = p.epochs();
  if (p.has_max_steps()) hp.max_steps = p.max_steps();
  if (p.has_batch_size()) hp.batch_size = p.batch_size();
  if (p.has_warmup_fraction()) hp.warmup_fraction = p.warmup_fraction();
  if (p.has_warmup_steps()) hp.warmup_steps = p.warmup_steps();
  if (p.has_weight_decay()) hp.weight_decay = p.weight_decay();
  if (p.has_max_sequence_length()) hp.max_sequence_length = p.max_sequence_length();
  if (p.has_max_grad_norm()) hp.max_grad_norm = p.max_grad_norm();
  if (p.has_seed()) hp.seed = p.seed();
  return hp;
}

absl::StatusOr<TrainableSpec> ToTrainableSpec(const pb::JobSpec& spec) {
  TrainableSpec out;
  std::set<delta::MethodKind> seen;
  for (const pb::MethodConfig& m : spec.methods()) {
    delta::MethodSpec method;
    DS_ASSIGN_OR_RETURN(method.kind, delta::ParseMethodKind(m.method()));
    if (!seen.insert(method.kind).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("method \"", m.method(), "\" is listed twice: a job trains at most one of each method"));
    }
    if (!m.config_json().empty()) {
      nlohmann::json config = nlohmann::json::parse(m.config_json(), nullptr, /*allow_exceptions=*/false);
      if (config.is_discarded() || !config.is_object()) {
        return absl::InvalidArgumentError(absl::StrCat("method \"", m.method(),
                                                       "\": config_json is not a JSON object: ", m.config_json()));
      }
      method.config = std::move(config);
    }
    out.methods.push_back(std::move(method));
  }
  if (spec.full() && !out.methods.empty()) {
    return absl::InvalidArgumentError(
        "full fine-tuning trains every weight: leave methods empty (or submit a delta job without full)");
  }
  const pb::HeadConfig& head = spec.head();
  out.head.type = head.type().empty() ? "classification" : head.type();
  out.head.labels.assign(head.labels().begin(), head.labels().end());
  out.head.hidden = head.hidden();
  if (!head.activation().empty()) out.head.activation = head.activation();
  if (out.head.hidden < 0 || out.head.hidden > 65536) {
    return absl::InvalidArgumentError(absl::StrCat("head.hidden must be in [0, 65536], got ", out.head.hidden));
  }
  return out;
}

pb::EvalResult ToProto(const EvalMetrics& eval, int64_t epoch) {
  pb::EvalResult out;
  out.set_epoch(epoch);
  out.set_loss(eval.loss);
  for (const auto& [name, value] : eval.metrics) (*out.mutable_metrics())[name] = value;
  out.set_primary_metric(eval.primary);
  return out;
}

absl::StatusOr<std::string> CheckpointToBytes(const Checkpoint& checkpoint) {
  return model::SerializeSafetensors(checkpoint.tensors, {{kCheckpointStateKey, checkpoint.state.dump()}});
}

absl::StatusOr<Checkpoint> CheckpointFromFile(const std::string& path) {
  DS_ASSIGN_OR_RETURN(std::unique_ptr<model::SafetensorsFile> file, model::SafetensorsFile::Open(path));
  Checkpoint checkpoint;
  auto it = file->metadata().find(kCheckpointStateKey);
  if (it == file->metadata().end()) return absl::DataLossError(absl::StrCat(path, ": no checkpoint state"));
  checkpoint.state = nlohmann::json::parse(it->second, nullptr, /*allow_exceptions=*/false);
  if (checkpoint.state.is_discarded()) return absl::DataLossError(absl::StrCat(path, ": bad checkpoint state"));
  for (const std::string& name : file->names()) {
    DS_ASSIGN_OR_RETURN(at::Tensor t, file->Load(name, at::kFloat));
    checkpoint.tensors.emplace(name, std::move(t));
  }
  return checkpoint;
}

}  // namespace

struct JobManager::Entry {
  pb::Job job;
  int64_t changes = 1;          // bumped on every visible change (Watch)
  absl::Time last_progress_event = absl::InfinitePast();
  bool cancel_requested = false;
  // In-memory mode only: the datasets' bytes (persistent mode reads them from the job directory).
  std::string train_bytes, validation_bytes;
};

JobManager::JobManager(const model::Model* model, deltas::DeltaManager* deltas, store::DeltaStore* store,
                       Options options)
    : model_(model),
      deltas_(deltas),
      store_(store),
      options_(std::move(options)),
      trainer_(*model, options_.trainer) {}

JobManager::~JobManager() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    work_cv_.SignalAll();
    changed_cv_.SignalAll();
  }
  for (std::thread& t : workers_) t.join();
}

bool JobManager::IsFinal(pb::JobState state) {
  return state == pb::JOB_STATE_SUCCEEDED || state == pb::JOB_STATE_FAILED || state == pb::JOB_STATE_CANCELLED;
}

std::string JobManager::JobDir(const std::string& id) const { return options_.jobs_dir + "/" + id; }

absl::StatusOr<std::string> JobManager::Tenant(const std::string& tenant) const {
  return deltas_->EffectiveTenant(tenant);
}

absl::Status JobManager::Start() {
  if (options_.max_concurrent_jobs < 1) {
    return absl::InvalidArgumentError("max_concurrent_jobs must be at least 1");
  }
  if (!options_.jobs_dir.empty()) {
    std::error_code ec;
    fs::create_directories(options_.jobs_dir, ec);
    if (ec) return absl::InternalError(absl::StrCat("cannot create ", options_.jobs_dir, ": ", ec.message()));
    std::vector<std::shared_ptr<Entry>> loaded;
    for (const fs::directory_entry& d : fs::directory_iterator(options_.jobs_dir, ec)) {
      if (!d.is_directory()) continue;
      const std::string path = d.path().string() + "/" + kJobFile;
      absl::StatusOr<std::string> text = ReadFileToString(path);
      if (!text.ok()) {
        DS_LOG(WARNING) << "skipping job directory " << d.path().string() << ": " << text.status();
        continue;
      }
      auto entry = std::make_shared<Entry>();
      if (!google::protobuf::util::JsonStringToMessage(*text, &entry->job).ok() || entry->job.id().empty()) {
        DS_LOG(WARNING) << "skipping " << path << ": not a job record";
        continue;
      }
      loaded.push_back(std::move(entry));
    }
    std::sort(loaded.begin(), loaded.end(), [](const auto& a, const auto& b) {
      return a->job.created_unix_micros() < b->job.created_unix_micros();
    });
    absl::MutexLock lock(&mu_);
    int resumed = 0, queued = 0;
    for (std::shared_ptr<Entry>& entry : loaded) {
      pb::Job& job = entry->job;
      if (job.state() == pb::JOB_STATE_RUNNING) {
        job.set_state(pb::JOB_STATE_QUEUED);  // resumes from its checkpoint when a worker takes it
        ++resumed;
      }
      if (job.state() == pb::JOB_STATE_QUEUED) {
        queue_.push_back(job.id());
        ++queued;
        (void)Persist(*entry);
      }
      jobs_[job.id()] = std::move(entry);
    }
    if (!loaded.empty()) {
      DS_LOG(INFO) << "jobs: " << loaded.size() << " loaded from " << options_.jobs_dir << " (" << queued
                   << " queued, " << resumed << " of them resume from a checkpoint)";
    }
  }
  for (int i = 0; i < options_.max_concurrent_jobs; ++i) workers_.emplace_back([this] { WorkerLoop(); });
  NotifyCounts();
  return absl::OkStatus();
}

absl::Status JobManager::Persist(const Entry& entry) {
  if (options_.jobs_dir.empty()) return absl::OkStatus();
  std::string json;
  google::protobuf::util::JsonPrintOptions print;
  print.add_whitespace = true;
  print.preserve_proto_field_names = true;
  if (!google::protobuf::util::MessageToJsonString(entry.job, &json, print).ok()) {
    return absl::InternalError("cannot serialize a job record");
  }
  absl::Status st = WriteFileAtomically(JobDir(entry.job.id()) + "/" + kJobFile, json);
  if (!st.ok()) DS_LOG(ERROR) << "job " << entry.job.id() << ": cannot persist its record: " << st;
  return st;
}

void JobManager::Changed(Entry* entry) {
  ++entry->changes;
  changed_cv_.SignalAll();
}

void JobManager::NotifyCounts() {
  if (options_.observer == nullptr) return;
  int64_t queued = 0, running = 0;
  {
    absl::MutexLock lock(&mu_);
    queued = static_cast<int64_t>(queue_.size());
    running = running_;
  }
  options_.observer->OnJobCounts(queued, running);
}

absl::StatusOr<store::BlobInfo> JobManager::UploadDataset(const std::string& tenant,
                                                          const std::string& expected_digest,
                                                          absl::string_view bytes) {
  DS_RETURN_IF_ERROR(Tenant(tenant).status());
  if (!expected_digest.empty() && !IsSha256Digest(expected_digest)) {
    return absl::InvalidArgumentError(
        absl::StrCat("expected digest \"", expected_digest, "\" is not sha256:<64 lowercase hex digits>"));
  }
  if (bytes.empty()) return absl::InvalidArgumentError("UploadDataset: the dataset is empty");
  if (static_cast<int64_t>(bytes.size()) > options_.max_dataset_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat("the dataset is ", bytes.size(),
                                                     " bytes, over this server's limit of ",
                                                     options_.max_dataset_bytes, " bytes"));
  }
  const std::string digest = Sha256Digest(bytes);
  if (!expected_digest.empty() && expected_digest != digest) {
    return absl::DataLossError(absl::StrCat("the upload hashes to ", digest, ", not the expected ",
                                            expected_digest, ": it was damaged in transit; upload it again"));
  }
  DS_ASSIGN_OR_RETURN(const std::string owner, Tenant(tenant));
  DS_ASSIGN_OR_RETURN(store::BlobInfo blob, store::PutBlob(*store_, bytes, digest));
  // The tenant's claim on the dataset: a small blob whose content names both, so that only the tenant that
  // uploaded a dataset can train on it (the blob store itself is shared by content), also across replicas that
  // share a registry store. It lives as long as uploads do (the store's GC grace).
  const std::string claim = DatasetClaim(owner, digest);
  DS_RETURN_IF_ERROR(store::PutBlob(*store_, claim, Sha256Digest(claim)).status());
  return blob;
}

std::string JobManager::DatasetClaim(const std::string& tenant, const std::string& digest) {
  return nlohmann::json{{"deltaserve.dataset_claim.v1", {{"digest", digest}, {"tenant", tenant}}}}.dump();
}

absl::StatusOr<std::string> JobManager::ReadBlob(const std::string& tenant, const std::string& digest,
                                                 const char* what) const {
  if (digest.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": give the digest of an uploaded dataset (UploadDataset)"));
  }
  if (!IsSha256Digest(digest)) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": \"", digest, "\" is not sha256:<64 lowercase hex digits>"));
  }
  const auto not_found = [&] {
    return absl::NotFoundError(absl::StrCat(what, ": tenant \"", tenant, "\" has no uploaded dataset with digest ",
                                            digest, " (uploads are kept for an hour: upload it again)"));
  };
  // Another tenant's dataset (or any other blob) is answered like a missing one.
  const std::string claim = DatasetClaim(tenant, digest);
  absl::StatusOr<store::BlobInfo> claimed = store_->StatBlob(Sha256Digest(claim));
  if (absl::IsNotFound(claimed.status())) return not_found();
  DS_RETURN_IF_ERROR(claimed.status());
  absl::StatusOr<std::string> bytes = store::ReadBlob(*store_, digest);
  if (absl::IsNotFound(bytes.status())) return not_found();
  return bytes;
}

absl::StatusOr<TrainingProblem> JobManager::BuildProblem(const pb::Job& job, const std::string& train_bytes,
                                                         const std::string& validation_bytes) const {
  const pb::JobSpec& spec = job.spec();
  TrainingProblem problem;
  problem.name = spec.task();
  problem.full = spec.full();
  DS_ASSIGN_OR_RETURN(problem.spec, ToTrainableSpec(spec));
  problem.hp = ToHyperParameters(spec.hyper_parameters());
  if (!spec.hyper_parameters().has_max_sequence_length()) {
    // The default fits the model: a job that does not ask for a length never fails for it.
    problem.hp.max_sequence_length =
        std::min(problem.hp.max_sequence_length, model_->info().max_sequence_length);
  }
  DS_RETURN_IF_ERROR(ValidateHyperParameters(problem.hp, *model_));

  auto parse = [&](const pb::DatasetSpec& ds, const std::string& bytes, const char* what) -> absl::StatusOr<Dataset> {
    DS_ASSIGN_OR_RETURN(DatasetOptions options,
                        ToDatasetOptions(ds, options_.max_dataset_bytes, options_.max_dataset_examples));
    absl::StatusOr<Dataset> parsed = ParseDataset(bytes, options);
    if (!parsed.ok()) {
      return absl::Status(parsed.status().code(), absl::StrCat(what, " dataset: ", parsed.status().message()));
    }
    return parsed;
  };
  DS_ASSIGN_OR_RETURN(Dataset train_all, parse(spec.train(), train_bytes, "training"));
  DS_ASSIGN_OR_RETURN(TaskType type, ParseTaskType(problem.spec.head.type));
  if (spec.validation_case() == pb::JobSpec::kValidationDataset) {
    problem.train = std::move(train_all);
    DS_ASSIGN_OR_RETURN(problem.validation, parse(spec.validation_dataset(), validation_bytes, "validation"));
  } else {
    const double fraction = spec.validation_case() == pb::JobSpec::kValidationFraction
                                ? spec.validation_fraction()
                                : kDefaultValidationFraction;
    absl::Status split = SplitDataset(train_all, fraction, problem.hp.seed, &problem.train, &problem.validation);
    if (!split.ok()) return absl::InvalidArgumentError(absl::StrCat("validation_fraction: ", split.message()));
  }
  DS_ASSIGN_OR_RETURN(problem.labels, ResolveLabels(problem.train, type, problem.spec.head.labels));
  problem.spec.head.labels = problem.labels.labels;
  absl::StatusOr<EncodedLabels> train_labels = EncodeLabels(problem.train, problem.labels);
  if (!train_labels.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("training dataset: ", train_labels.status().message()));
  }
  problem.train_labels = *std::move(train_labels);
  absl::StatusOr<EncodedLabels> validation_labels = EncodeLabels(problem.validation, problem.labels);
  if (!validation_labels.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("validation dataset: ", validation_labels.status().message()));
  }
  problem.validation_labels = *std::move(validation_labels);
  problem.provenance = {{"job", job.id()},
                        {"tenant", job.tenant()},
                        {"train_dataset", spec.train().digest()},
                        {"description", spec.description()}};
  if (spec.validation_case() == pb::JobSpec::kValidationDataset) {
    problem.provenance["validation_dataset"] = spec.validation_dataset().digest();
  }
  return problem;
}

absl::StatusOr<std::pair<pb::Job, bool>> JobManager::Submit(const pb::SubmitJobRequest& request) {
  DS_ASSIGN_OR_RETURN(const std::string tenant, Tenant(request.tenant()));
  if (request.request_id().size() > 128) {
    return absl::InvalidArgumentError("request_id is longer than 128 bytes");
  }
  if (!request.request_id().empty()) {
    absl::MutexLock lock(&mu_);
    for (const auto& [id, entry] : jobs_) {
      if (entry->job.tenant() == tenant && entry->job.request_id() == request.request_id()) {
        return std::make_pair(entry->job, false);
      }
    }
  }
  const pb::JobSpec& spec = request.spec();
  DS_RETURN_IF_ERROR(store::CheckName("task", spec.task()));
  for (const std::string& label : spec.labels()) {
    if (!store::IsValidLabel(label) || label == store::kLatestLabel) {
      return absl::InvalidArgumentError(absl::StrCat(
          "label \"", label, "\" cannot be set: use 1-64 characters of [a-z0-9._-], not all digits, not \"",
          store::kLatestLabel, "\" (the server keeps that one)"));
    }
  }
  if (spec.full() && !options_.trainer.allow_full) {
    return absl::FailedPreconditionError(
        "full fine-tuning is off on this server (it trains a private copy of every weight): start the server "
        "with --allow_full_finetuning, or train a delta method");
  }
  if (spec.validation_case() == pb::JobSpec::kValidationFraction &&
      !(spec.validation_fraction() > 0 && spec.validation_fraction() < 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("validation_fraction must be in (0, 1), got ", spec.validation_fraction()));
  }
  DS_ASSIGN_OR_RETURN(std::string train_bytes, ReadBlob(tenant, spec.train().digest(), "train"));
  std::string validation_bytes;
  if (spec.validation_case() == pb::JobSpec::kValidationDataset) {
    DS_ASSIGN_OR_RETURN(validation_bytes, ReadBlob(tenant, spec.validation_dataset().digest(), "validation_dataset"));
  }

  auto entry = std::make_shared<Entry>();
  pb::Job& job = entry->job;
  job.set_id(NewJobId());
  job.set_tenant(tenant);
  *job.mutable_spec() = spec;
  // Everything a worker will check is checked now, so that a bad job fails the call, not later.
  DS_ASSIGN_OR_RETURN(TrainingProblem problem, BuildProblem(job, train_bytes, validation_bytes));
  absl::StatusOr<std::unique_ptr<TrainableDelta>> trainable;
  {
    // Prefix and prompt initialization read the weights, which merge mode may be rewriting.
    absl::ReaderMutexLock weights(&model_->weights_mutex());
    trainable = TrainableDelta::Create(problem.spec, *model_, problem.hp.seed);
  }
  if (!trainable.ok()) return trainable.status();
  job.set_state(pb::JOB_STATE_QUEUED);
  job.set_created_unix_micros(UnixMicros(absl::Now()));
  job.set_train_examples(static_cast<int64_t>(problem.train.examples.size()));
  job.set_validation_examples(static_cast<int64_t>(problem.validation.examples.size()));
  for (const std::string& c : problem.labels.labels) job.add_classes(c);
  job.set_model_parameters(model_->info().num_parameters);
  job.set_trainable_parameters(problem.full ? model_->info().num_parameters + (*trainable)->num_parameters()
                                            : (*trainable)->num_parameters());
  job.set_request_id(request.request_id());

  if (options_.jobs_dir.empty()) {
    entry->train_bytes = std::move(train_bytes);
    entry->validation_bytes = std::move(validation_bytes);
  } else {
    std::error_code ec;
    fs::create_directories(JobDir(job.id()), ec);
    if (ec) return absl::InternalError(absl::StrCat("cannot create ", JobDir(job.id()), ": ", ec.message()));
    DS_RETURN_IF_ERROR(WriteFileAtomically(JobDir(job.id()) + "/" + kTrainFile, train_bytes));
    if (!validation_bytes.empty()) {
      DS_RETURN_IF_ERROR(WriteFileAtomically(JobDir(job.id()) + "/" + kValidationFile, validation_bytes));
    }
  }
  const TenantJobLimits limits = LimitsOf(tenant);
  const int64_t max_queued = limits.max_queued > 0 ? limits.max_queued : options_.max_queued_jobs_per_tenant;
  {
    absl::MutexLock lock(&mu_);
    if (!request.request_id().empty()) {  // a concurrent twin may have won the race
      for (const auto& [id, other] : jobs_) {
        if (other->job.tenant() == tenant && other->job.request_id() == request.request_id()) {
          return std::make_pair(other->job, false);
        }
      }
    }
    int64_t active = 0;
    for (const auto& [id, other] : jobs_) {
      if (other->job.tenant() == tenant && !IsFinal(other->job.state())) ++active;
    }
    if (active >= max_queued) {
      return absl::ResourceExhaustedError(absl::StrCat("tenant \"", tenant, "\" has ", active,
                                                       " jobs queued or running, the limit is ", max_queued,
                                                       ": wait for one to finish or cancel one"));
    }
    DS_RETURN_IF_ERROR(Persist(*entry));
    jobs_[job.id()] = entry;
    queue_.push_back(job.id());
    work_cv_.Signal();
  }
  if (options_.observer != nullptr) options_.observer->OnJobState("queued");
  NotifyCounts();
  DS_LOG(INFO) << "job " << job.id() << " queued: tenant " << tenant << ", task " << spec.task() << ", "
               << job.train_examples() << " training / " << job.validation_examples() << " validation examples";
  return std::make_pair(job, true);
}

absl::StatusOr<pb::Job> JobManager::Get(const std::string& tenant, const std::string& id) {
  DS_ASSIGN_OR_RETURN(const std::string t, Tenant(tenant));
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(id);
  if (it == jobs_.end() || it->second->job.tenant() != t) {
    return absl::NotFoundError(absl::StrCat("no job \"", id, "\" for tenant \"", t, "\""));
  }
  return it->second->job;
}

absl::StatusOr<pb::ListJobsResponse> JobManager::List(const pb::ListJobsRequest& request) {
  DS_ASSIGN_OR_RETURN(const std::string tenant, Tenant(request.tenant()));
  if (request.page_size() < 0 || request.page_size() > 1000) {
    return absl::InvalidArgumentError(absl::StrCat("page_size must be in [0, 1000], got ", request.page_size()));
  }
  int64_t offset = 0;
  if (!request.page_token().empty() && (!absl::SimpleAtoi(request.page_token(), &offset) || offset < 0)) {
    return absl::InvalidArgumentError("page_token is not one this server gave out");
  }
  const int page = request.page_size() == 0 ? 100 : request.page_size();
  std::vector<const pb::Job*> matching;
  pb::ListJobsResponse response;
  absl::MutexLock lock(&mu_);
  for (const auto& [id, entry] : jobs_) {
    if (entry->job.tenant() != tenant) continue;
    if (request.state() != pb::JOB_STATE_UNSPECIFIED && entry->job.state() != request.state()) continue;
    matching.push_back(&entry->job);
  }
  std::sort(matching.begin(), matching.end(), [](const pb::Job* a, const pb::Job* b) {
    if (a->created_unix_micros() != b->created_unix_micros()) return a->created_unix_micros() > b->created_unix_micros();
    return a->id() > b->id();
  });
  for (int64_t i = offset; i < static_cast<int64_t>(matching.size()) && i < offset + page; ++i) {
    *response.add_jobs() = *matching[i];
  }
  if (offset + page < static_cast<int64_t>(matching.size())) response.set_next_page_token(absl::StrCat(offset + page));
  return response;
}

absl::StatusOr<pb::Job> JobManager::Cancel(const std::string& tenant, const std::string& id) {
  DS_ASSIGN_OR_RETURN(const std::string t, Tenant(tenant));
  bool cancelled_now = false;
  pb::Job snapshot;
  {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(id);
    if (it == jobs_.end() || it->second->job.tenant() != t) {
      return absl::NotFoundError(absl::StrCat("no job \"", id, "\" for tenant \"", t, "\""));
    }
    Entry& entry = *it->second;
    if (IsFinal(entry.job.state())) {
      return absl::FailedPreconditionError(absl::StrCat("job ", id, " already finished (",
                                                        pb::JobState_Name(entry.job.state()), ")"));
    }
    entry.cancel_requested = true;
    if (entry.job.state() == pb::JOB_STATE_QUEUED) {
      queue_.erase(std::remove(queue_.begin(), queue_.end(), id), queue_.end());
      entry.job.set_state(pb::JOB_STATE_CANCELLED);
      entry.job.set_finished_unix_micros(UnixMicros(absl::Now()));
      (void)Persist(entry);
      Changed(&entry);
      cancelled_now = true;
    }
    snapshot = entry.job;
  }
  if (cancelled_now) {
    if (options_.observer != nullptr) options_.observer->OnJobState("cancelled");
    NotifyCounts();
  }
  return snapshot;
}

absl::StatusOr<pb::Job> JobManager::Watch(const std::string& tenant, const std::string& id, int64_t* seen,
                                          absl::Duration timeout) {
  DS_ASSIGN_OR_RETURN(const std::string t, Tenant(tenant));
  const absl::Time deadline = absl::Now() + timeout;
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(id);
  if (it == jobs_.end() || it->second->job.tenant() != t) {
    return absl::NotFoundError(absl::StrCat("no job \"", id, "\" for tenant \"", t, "\""));
  }
  std::shared_ptr<Entry> entry = it->second;
  while (entry->changes <= *seen && !stopping_) {
    if (changed_cv_.WaitWithDeadline(&mu_, deadline)) break;
  }
  *seen = entry->changes;
  return entry->job;
}

TenantJobLimits JobManager::LimitsOf(const std::string& tenant) const {
  return options_.tenant_limits ? options_.tenant_limits(tenant) : TenantJobLimits{};
}

std::optional<std::string> JobManager::NextRunnable() const {
  std::map<std::string, int64_t> running;  // per tenant, counted once per call
  bool counted = false;
  for (const std::string& id : queue_) {
    const std::string& tenant = jobs_.at(id)->job.tenant();
    const int64_t limit = LimitsOf(tenant).max_running;
    if (limit <= 0) return id;
    if (!counted) {
      for (const auto& [other_id, other] : jobs_) {
        if (other->job.state() == pb::JOB_STATE_RUNNING) ++running[other->job.tenant()];
      }
      counted = true;
    }
    if (running[tenant] < limit) return id;
  }
  return std::nullopt;
}

void JobManager::WorkerLoop() {
  while (true) {
    std::shared_ptr<Entry> entry;
    {
      absl::MutexLock lock(&mu_);
      std::optional<std::string> next;
      while (!stopping_ && !(next = NextRunnable()).has_value()) {
        // Woken by a submit or a finished job; the timeout notices limits raised in the tenants file.
        work_cv_.WaitWithTimeout(&mu_, absl::Seconds(2));
      }
      if (stopping_) return;
      const std::string id = *next;
      queue_.erase(std::find(queue_.begin(), queue_.end(), id));
      entry = jobs_[id];
      entry->job.set_state(pb::JOB_STATE_RUNNING);
      entry->job.set_attempts(entry->job.attempts() + 1);
      if (entry->job.started_unix_micros() == 0) entry->job.set_started_unix_micros(UnixMicros(absl::Now()));
      entry->job.clear_error();
      (void)Persist(*entry);
      Changed(entry.get());
      ++running_;
    }
    if (options_.observer != nullptr) options_.observer->OnJobState("running");
    NotifyCounts();
    RunJob(entry);
    {
      absl::MutexLock lock(&mu_);
      --running_;
      work_cv_.SignalAll();  // a tenant at its running limit may have a queued job that can start now
    }
    NotifyCounts();
  }
}

void JobManager::Finish(const std::shared_ptr<Entry>& entry, pb::JobState state, const absl::Status& error) {
  {
    absl::MutexLock lock(&mu_);
    pb::Job& job = entry->job;
    job.set_state(state);
    job.set_finished_unix_micros(UnixMicros(absl::Now()));
    if (!error.ok()) {
      job.set_error(std::string(error.message()));
      job.set_error_code(static_cast<int32_t>(error.code()));
    }
    (void)Persist(*entry);
    Changed(entry.get());
  }
  if (!options_.jobs_dir.empty()) {
    // The record stays; the checkpoint and the dataset copies are no longer needed.
    std::error_code ec;
    fs::remove(JobDir(entry->job.id()) + "/" + kCheckpointFile, ec);
    fs::remove(JobDir(entry->job.id()) + "/" + kTrainFile, ec);
    fs::remove(JobDir(entry->job.id()) + "/" + kValidationFile, ec);
  } else {
    entry->train_bytes.clear();
    entry->validation_bytes.clear();
  }
  if (options_.observer != nullptr) options_.observer->OnJobState(StateName(state));
  DS_LOG(INFO) << "job " << entry->job.id() << " " << pb::JobState_Name(state)
               << (error.ok() ? "" : absl::StrCat(": ", error.ToString()));
}

void JobManager::RunJob(const std::shared_ptr<Entry>& entry) {
  pb::Job job;
  std::string train_bytes, validation_bytes;
  {
    absl::MutexLock lock(&mu_);
    job = entry->job;
    train_bytes = entry->train_bytes;
    validation_bytes = entry->validation_bytes;
  }
  const std::string dir = JobDir(job.id());
  if (!options_.jobs_dir.empty()) {
    absl::StatusOr<std::string> train = ReadFileToString(dir + "/" + kTrainFile);
    if (!train.ok()) return Finish(entry, pb::JOB_STATE_FAILED, absl::DataLossError(absl::StrCat(
                                                                     "the job's dataset copy is gone: ",
                                                                     train.status().message())));
    train_bytes = *std::move(train);
    if (job.spec().validation_case() == pb::JobSpec::kValidationDataset) {
      absl::StatusOr<std::string> validation = ReadFileToString(dir + "/" + kValidationFile);
      if (!validation.ok()) return Finish(entry, pb::JOB_STATE_FAILED, validation.status());
      validation_bytes = *std::move(validation);
    }
  }
  absl::StatusOr<TrainingProblem> problem = BuildProblem(job, train_bytes, validation_bytes);
  if (!problem.ok()) return Finish(entry, pb::JOB_STATE_FAILED, problem.status());
  train_bytes.clear();
  validation_bytes.clear();

  std::optional<Checkpoint> resume;
  const std::string checkpoint_path = dir + "/" + kCheckpointFile;
  if (!options_.jobs_dir.empty() && FileExists(checkpoint_path)) {
    absl::StatusOr<Checkpoint> loaded = CheckpointFromFile(checkpoint_path);
    if (loaded.ok()) {
      resume = *std::move(loaded);
      DS_LOG(INFO) << "job " << job.id() << " resumes from its checkpoint at step "
                   << resume->state.value("step", int64_t{0});
    } else {
      DS_LOG(WARNING) << "job " << job.id() << ": unreadable checkpoint, starting over: " << loaded.status();
    }
  }

  TrainCallbacks callbacks;
  absl::Time last_step = absl::Now();
  callbacks.on_progress = [&](const Progress& p) {
    const absl::Time now = absl::Now();
    if (options_.observer != nullptr && !p.eval.has_value()) {
      options_.observer->OnTrainingStep(problem->hp.batch_size, now - last_step);
    }
    last_step = now;
    absl::MutexLock lock(&mu_);
    pb::JobProgress* out = entry->job.mutable_progress();
    out->set_step(p.step);
    out->set_total_steps(p.total_steps);
    out->set_epoch(p.epoch);
    out->set_epochs(p.epochs);
    out->set_loss(p.loss);
    out->set_learning_rate(p.learning_rate);
    out->set_examples_per_second(p.examples_per_second);
    out->set_eta_seconds(p.eta_seconds);
    if (p.eval.has_value()) {
      // Epochs already evaluated (after a resume) are replaced, not repeated.
      pb::EvalResult eval = ToProto(*p.eval, p.epoch);
      auto* evals = entry->job.mutable_evals();
      while (!evals->empty() && evals->rbegin()->epoch() >= p.epoch) evals->RemoveLast();
      *evals->Add() = std::move(eval);
      Changed(entry.get());
      entry->last_progress_event = now;
    } else if (now - entry->last_progress_event >= options_.progress_interval) {
      Changed(entry.get());
      entry->last_progress_event = now;
    }
  };
  callbacks.on_checkpoint = [&](const Checkpoint& checkpoint) -> absl::Status {
    if (options_.jobs_dir.empty()) return absl::OkStatus();
    DS_ASSIGN_OR_RETURN(std::string bytes, CheckpointToBytes(checkpoint));
    DS_RETURN_IF_ERROR(WriteFileAtomically(checkpoint_path, bytes));
    absl::MutexLock lock(&mu_);
    return Persist(*entry);  // the progress so far, with the checkpoint it matches
  };
  callbacks.is_cancelled = [&]() {
    absl::MutexLock lock(&mu_);
    return entry->cancel_requested || stopping_;
  };

  absl::StatusOr<TrainResult> result = trainer_.Run(*problem, resume ? &*resume : nullptr, callbacks);
  if (!result.ok()) {
    bool user_cancelled = false, stopping = false;
    {
      absl::MutexLock lock(&mu_);
      user_cancelled = entry->cancel_requested;
      stopping = stopping_;
    }
    if (absl::IsCancelled(result.status())) {
      if (user_cancelled) return Finish(entry, pb::JOB_STATE_CANCELLED, absl::OkStatus());
      if (stopping) return;  // interrupted by shutdown: stays RUNNING on disk and resumes at the next start
    }
    return Finish(entry, pb::JOB_STATE_FAILED, result.status());
  }
  {
    absl::MutexLock lock(&mu_);
    entry->job.set_best_epoch(result->best_epoch);
    entry->job.set_trainable_parameters(result->trainable_parameters);
    entry->job.set_model_parameters(result->model_parameters);
    entry->job.set_optimizer_state_bytes(result->optimizer_state_bytes);
  }
  if (result->pack.has_value()) {
    absl::StatusOr<std::string> bytes = delta::SerializePack(*result->pack);
    if (!bytes.ok()) return Finish(entry, pb::JOB_STATE_FAILED, bytes.status());
    deltas::PushRequest push;
    push.tenant = job.tenant();
    push.task = job.spec().task();
    push.labels.assign(job.spec().labels().begin(), job.spec().labels().end());
    absl::StatusOr<deltas::PushResult> pushed = deltas_->Push(push, *bytes);
    if (!pushed.ok()) {
      return Finish(entry, pb::JOB_STATE_FAILED,
                    absl::Status(pushed.status().code(),
                                 absl::StrCat("training finished but the pack could not be stored: ",
                                              pushed.status().message())));
    }
    absl::MutexLock lock(&mu_);
    pb::DeltaVersion* v = entry->job.mutable_result();
    v->set_tenant(pushed->version.tenant);
    v->set_task(pushed->version.task);
    v->set_version(pushed->version.version);
    v->set_digest(pushed->version.digest);
    v->set_size_bytes(pushed->version.size);
    v->set_created_unix_micros(absl::ToUnixMicros(pushed->version.created));
    for (const std::string& l : pushed->version.labels) v->add_labels(l);
  }
  Finish(entry, pb::JOB_STATE_SUCCEEDED, absl::OkStatus());
}

}  // namespace tuning
}  // namespace deltaserve

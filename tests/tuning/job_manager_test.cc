// JobManager in process, on the tiny test BERT, an in-memory store and a real jobs directory: what a restart finds
// on disk (running jobs resume, queued ones stay queued, damaged records and checkpoints are survived), limits,
// and failures after training (a store quota) that must leave nothing half-registered.
#include "server/tuning/job_manager.h"

#include <filesystem>
#include <functional>
#include <fstream>
#include <random>

#include "absl/strings/str_cat.h"
#include "delta_store/memory_store.h"
#include "gmock/gmock.h"
#include "google/protobuf/util/json_util.h"
#include "gtest/gtest.h"
#include "server/common/file_util.h"
#include "server/deltas/delta_manager.h"
#include "tests/delta/delta_test_util.h"

namespace deltaserve {
namespace tuning {
namespace {

namespace pb = ::deltaserve::v1;
using ::testing::HasSubstr;

// Keyword sentences in TinyBert's vocabulary: the label follows the keyword.
std::string KeywordTsv(int n) {
  const std::vector<std::string> fillers = {"the", "a", "cat", "dog", "sat", "on", "mat", "is", "big", "small"};
  std::mt19937_64 rng(5);
  std::string out = "text\tlabel\n";
  for (int i = 0; i < n; ++i) {
    const bool positive = i % 2 == 0;
    absl::StrAppend(&out, fillers[rng() % fillers.size()], " ", positive ? "good" : "bad", " ",
                    fillers[rng() % fillers.size()], "\t", positive ? "pos" : "neg", "\n");
  }
  return out;
}

class JobManagerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = delta::testing::TinyBert();
    ASSERT_NE(model_, nullptr);
    dir_ = std::filesystem::temp_directory_path() / absl::StrCat("job_manager_test.", ::getpid(), ".", counter_++);
    std::filesystem::remove_all(dir_);
    UseStore(store::MemoryStoreOptions());
  }
  void UseStore(const store::MemoryStoreOptions& options) {
    deltas_.reset();
    store_ = store::NewMemoryStore(options);
    deltas_ = std::make_unique<deltas::DeltaManager>(store_.get(), model_.get(), deltas::DeltaManager::Options());
  }
  void TearDown() override {
    jobs_.reset();
    std::filesystem::remove_all(dir_);
  }

  void StartJobs(int per_tenant = 16, int concurrent = 1,
                 std::function<TenantJobLimits(const std::string&)> tenant_limits = nullptr) {
    JobManager::Options options;
    options.jobs_dir = dir_.string();
    options.max_concurrent_jobs = concurrent;
    options.tenant_limits = std::move(tenant_limits);
    options.max_queued_jobs_per_tenant = per_tenant;
    options.trainer.checkpoint_every_steps = 2;
    options.trainer.nice = 0;
    jobs_ = std::make_unique<JobManager>(model_.get(), deltas_.get(), store_.get(), options);
    ASSERT_TRUE(jobs_->Start().ok());
  }

  pb::SubmitJobRequest Job(const std::string& task, int examples = 40, int epochs = 2,
                           const std::string& tenant = "") {
    auto uploaded = jobs_->UploadDataset(tenant, "", KeywordTsv(examples));
    EXPECT_TRUE(uploaded.ok()) << uploaded.status();
    pb::SubmitJobRequest request;
    request.set_tenant(tenant);
    pb::JobSpec* spec = request.mutable_spec();
    spec->set_task(task);
    spec->add_methods()->set_method("lora");
    spec->mutable_train()->set_digest(uploaded.ok() ? uploaded->digest : "");
    spec->set_validation_fraction(0.25);
    spec->mutable_hyper_parameters()->set_epochs(epochs);
    spec->mutable_hyper_parameters()->set_batch_size(8);
    spec->mutable_hyper_parameters()->set_learning_rate(1e-2);
    return request;
  }

  pb::Job WaitFinal(const std::string& id) {
    int64_t seen = 0;
    for (int i = 0; i < 600; ++i) {
      auto job = jobs_->Watch("", id, &seen, absl::Seconds(1));
      EXPECT_TRUE(job.ok()) << job.status();
      if (!job.ok() || JobManager::IsFinal(job->state())) return job.ok() ? *job : pb::Job();
    }
    ADD_FAILURE() << "job " << id << " did not finish";
    return pb::Job();
  }

  // Writes a job record the way a killed server leaves it: state `state`, its dataset copy beside it.
  void WriteRecord(const pb::Job& job, const std::string& train_bytes) {
    std::filesystem::create_directories(dir_ / job.id());
    std::string json;
    ASSERT_TRUE(google::protobuf::util::MessageToJsonString(job, &json).ok());
    std::ofstream(dir_ / job.id() / "job.json") << json;
    if (!train_bytes.empty()) std::ofstream(dir_ / job.id() / "train.data") << train_bytes;
  }

  static int counter_;
  std::shared_ptr<const model::Model> model_;
  std::filesystem::path dir_;
  std::unique_ptr<store::DeltaStore> store_;
  std::unique_ptr<deltas::DeltaManager> deltas_;
  std::unique_ptr<JobManager> jobs_;
};
int JobManagerTest::counter_ = 0;

TEST_F(JobManagerTest, DefaultSequenceLengthFitsAModelWithAShorterLimit) {
  StartJobs();
  // TinyBert takes 64 tokens; the default of 128 must not make every job without the field fail.
  auto submitted = jobs_->Submit(Job("short"));
  ASSERT_TRUE(submitted.ok()) << submitted.status();
  EXPECT_EQ(WaitFinal(submitted->first.id()).state(), pb::JOB_STATE_SUCCEEDED);
  // Asking for more than the model takes is an error naming the field.
  pb::SubmitJobRequest request = Job("long");
  request.mutable_spec()->mutable_hyper_parameters()->set_max_sequence_length(4096);
  auto refused = jobs_->Submit(request);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("max_sequence_length"));
}

TEST_F(JobManagerTest, RestartResumesRunningJobsAndKeepsQueuedOnes) {
  const std::string data = KeywordTsv(40);
  StartJobs();
  auto template_job = jobs_->Submit(Job("template"));
  ASSERT_TRUE(template_job.ok()) << template_job.status();
  const pb::Job finished = WaitFinal(template_job->first.id());
  jobs_.reset();

  // Two records as a killed server leaves them: one RUNNING (no checkpoint yet), one QUEUED.
  pb::Job running = template_job->first;
  running.set_id("job-running");
  running.mutable_spec()->set_task("resumed");
  running.set_state(pb::JOB_STATE_RUNNING);
  running.set_attempts(1);
  running.set_created_unix_micros(1);
  WriteRecord(running, data);
  pb::Job queued = running;
  queued.set_id("job-queued");
  queued.mutable_spec()->set_task("waited");
  queued.set_state(pb::JOB_STATE_QUEUED);
  queued.set_attempts(0);
  queued.set_created_unix_micros(2);
  queued.set_tenant("other");
  WriteRecord(queued, data);
  // Garbage the reload must survive.
  std::filesystem::create_directories(dir_ / "job-garbage");
  std::ofstream(dir_ / "job-garbage" / "job.json") << "{not json";

  StartJobs();
  const pb::Job resumed = WaitFinal("job-running");
  EXPECT_EQ(resumed.state(), pb::JOB_STATE_SUCCEEDED) << resumed.error();
  EXPECT_EQ(resumed.attempts(), 2);
  int64_t seen = 0;
  auto waited = jobs_->Watch("other", "job-queued", &seen, absl::Seconds(1));
  ASSERT_TRUE(waited.ok()) << waited.status();
  for (int i = 0; i < 600 && !JobManager::IsFinal(waited->state()); ++i) {
    waited = jobs_->Watch("other", "job-queued", &seen, absl::Seconds(1));
    ASSERT_TRUE(waited.ok());
  }
  EXPECT_EQ(waited->state(), pb::JOB_STATE_SUCCEEDED) << waited->error();
  EXPECT_EQ(waited->attempts(), 1);
  // The finished template job is still listed; the garbage directory is not a job.
  auto listed = jobs_->List(pb::ListJobsRequest());
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(listed->jobs_size(), 2);  // "template" and "resumed" (the default tenant's)
  EXPECT_EQ(finished.state(), pb::JOB_STATE_SUCCEEDED);
  // A finished job keeps its record, not its checkpoint or dataset copy.
  EXPECT_TRUE(std::filesystem::exists(dir_ / "job-running" / "job.json"));
  EXPECT_FALSE(std::filesystem::exists(dir_ / "job-running" / "train.data"));
  EXPECT_FALSE(std::filesystem::exists(dir_ / "job-running" / "checkpoint.safetensors"));
}

TEST_F(JobManagerTest, RequestIdStaysIdempotentAcrossARestart) {
  StartJobs();
  pb::SubmitJobRequest request = Job("once");
  request.set_request_id("retry-me");
  auto first = jobs_->Submit(request);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_TRUE(first->second);
  WaitFinal(first->first.id());
  jobs_.reset();
  StartJobs();
  auto again = jobs_->Submit(request);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_FALSE(again->second);
  EXPECT_EQ(again->first.id(), first->first.id());
  // The same id from another tenant is another job.
  request = Job("once", 40, 2, "other");
  request.set_request_id("retry-me");
  auto theirs = jobs_->Submit(request);
  ASSERT_TRUE(theirs.ok()) << theirs.status();
  EXPECT_TRUE(theirs->second);
  EXPECT_NE(theirs->first.id(), first->first.id());
}

TEST_F(JobManagerTest, DamagedCheckpointStartsOverAndMissingDatasetFailsClearly) {
  StartJobs();
  auto template_job = jobs_->Submit(Job("template"));
  ASSERT_TRUE(template_job.ok()) << template_job.status();
  WaitFinal(template_job->first.id());
  jobs_.reset();

  pb::Job damaged = template_job->first;
  damaged.set_id("job-damaged");
  damaged.mutable_spec()->set_task("damaged");
  damaged.set_state(pb::JOB_STATE_RUNNING);
  WriteRecord(damaged, KeywordTsv(40));
  std::ofstream(dir_ / "job-damaged" / "checkpoint.safetensors") << "not a checkpoint";
  pb::Job orphan = damaged;
  orphan.set_id("job-orphan");
  orphan.mutable_spec()->set_task("orphan");
  WriteRecord(orphan, "");  // its dataset copy is gone

  StartJobs();
  const pb::Job restarted = WaitFinal("job-damaged");
  EXPECT_EQ(restarted.state(), pb::JOB_STATE_SUCCEEDED) << restarted.error();
  const pb::Job failed = WaitFinal("job-orphan");
  EXPECT_EQ(failed.state(), pb::JOB_STATE_FAILED);
  EXPECT_EQ(failed.error_code(), static_cast<int>(absl::StatusCode::kDataLoss));
  EXPECT_THAT(failed.error(), HasSubstr("dataset"));
}

TEST_F(JobManagerTest, StoreQuotaFailsTheJobAfterTrainingAndRegistersNothing) {
  store::MemoryStoreOptions quota;
  quota.quotas.default_quota.max_versions = 1;  // a second pack of the tenant does not fit
  UseStore(quota);
  StartJobs();
  auto first = jobs_->Submit(Job("first"));
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(WaitFinal(first->first.id()).state(), pb::JOB_STATE_SUCCEEDED);
  // The tenant's quota is one version: the second job trains, then cannot store its pack.
  pb::SubmitJobRequest request = Job("second");
  request.mutable_spec()->add_labels("prod");
  auto second = jobs_->Submit(request);
  ASSERT_TRUE(second.ok()) << second.status();
  const pb::Job failed = WaitFinal(second->first.id());
  EXPECT_EQ(failed.state(), pb::JOB_STATE_FAILED);
  EXPECT_EQ(failed.error_code(), static_cast<int>(absl::StatusCode::kResourceExhausted));
  EXPECT_THAT(failed.error(), HasSubstr("could not be stored"));
  EXPECT_FALSE(failed.has_result());
  auto resolved = store_->Resolve(store::Ref{"default", "second", 0, "", ""});
  EXPECT_EQ(resolved.status().code(), absl::StatusCode::kNotFound);
}

TEST_F(JobManagerTest, DatasetsOfAnotherTenantAreNotFound) {
  StartJobs();
  pb::SubmitJobRequest request = Job("mine");  // uploaded by the default tenant
  request.set_tenant("other");
  auto refused = jobs_->Submit(request);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("tenant \"other\" has no uploaded dataset"));
  // The same bytes uploaded by that tenant too: now it is theirs as well.
  ASSERT_TRUE(jobs_->UploadDataset("other", "", KeywordTsv(40)).ok());
  auto accepted = jobs_->Submit(request);
  ASSERT_TRUE(accepted.ok()) << accepted.status();
  ASSERT_TRUE(jobs_->Cancel("other", accepted->first.id()).ok());
}

TEST_F(JobManagerTest, RefusesJobsBeyondTheTenantLimit) {
  StartJobs(/*per_tenant=*/1);
  auto first = jobs_->Submit(Job("slow", 200, /*epochs=*/500));
  ASSERT_TRUE(first.ok()) << first.status();
  auto second = jobs_->Submit(Job("next"));
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(second.status().message()), HasSubstr("cancel one"));
  // Another tenant is not affected.
  pb::SubmitJobRequest other = Job("theirs", 40, 2, "other");
  auto third = jobs_->Submit(other);
  ASSERT_TRUE(third.ok()) << third.status();
  ASSERT_TRUE(jobs_->Cancel("", first->first.id()).ok());
  EXPECT_EQ(WaitFinal(first->first.id()).state(), pb::JOB_STATE_CANCELLED);
  // With the slot free again, the tenant can submit.
  EXPECT_TRUE(jobs_->Submit(Job("next")).ok());
}

TEST_F(JobManagerTest, TenantLimitsOverrideTheServerWide) {
  // acme: 2 jobs queued or running (the server allows 16), 1 running at once (the server runs 2).
  StartJobs(/*per_tenant=*/16, /*concurrent=*/2, [](const std::string& tenant) {
    return tenant == "acme" ? TenantJobLimits{2, 1} : TenantJobLimits{};
  });
  auto first = jobs_->Submit(Job("a1", 200, /*epochs=*/500, "acme"));
  auto second = jobs_->Submit(Job("a2", 200, /*epochs=*/500, "acme"));
  ASSERT_TRUE(first.ok() && second.ok()) << first.status() << second.status();
  auto third = jobs_->Submit(Job("a3", 40, 2, "acme"));
  ASSERT_FALSE(third.ok());
  EXPECT_EQ(third.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(third.status().message()), HasSubstr("the limit is 2"));
  // Another tenant's job takes the second worker although acme's second job was queued first.
  auto other = jobs_->Submit(Job("o1", 200, /*epochs=*/500, "other"));
  ASSERT_TRUE(other.ok()) << other.status();
  pb::Job other_job;
  for (int i = 0; i < 500; ++i) {
    other_job = *jobs_->Get("other", other->first.id());
    if (other_job.state() == pb::JOB_STATE_RUNNING) break;
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_EQ(other_job.state(), pb::JOB_STATE_RUNNING);
  EXPECT_EQ(jobs_->Get("acme", first->first.id())->state(), pb::JOB_STATE_RUNNING);
  EXPECT_EQ(jobs_->Get("acme", second->first.id())->state(), pb::JOB_STATE_QUEUED);
  // When acme's running job ends, its queued one starts.
  ASSERT_TRUE(jobs_->Cancel("acme", first->first.id()).ok());
  ASSERT_TRUE(jobs_->Cancel("other", other->first.id()).ok());
  pb::Job next;
  for (int i = 0; i < 1000; ++i) {
    next = *jobs_->Get("acme", second->first.id());
    if (next.state() == pb::JOB_STATE_RUNNING) break;
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_EQ(next.state(), pb::JOB_STATE_RUNNING);
  ASSERT_TRUE(jobs_->Cancel("acme", second->first.id()).ok());
}

}  // namespace
}  // namespace tuning
}  // namespace deltaserve

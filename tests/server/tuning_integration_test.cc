// Integration: fine-tuning jobs on a real deltaserve (the real use-lite model, a real store and jobs directory)
// over gRPC and through deltactl. A job trains on the served backbone, its pack serves the moment it succeeds,
// bad datasets and hyper-parameters get clear statuses and queue nothing, a NaN loss fails the job and registers
// nothing, cancel stops a job, a job survives a SIGKILL of the server (it resumes from its checkpoint), and a task
// trained on text pairs serves through Classify's text_pairs (and deltactl classify --pairs).
#include <signal.h>

#include <cmath>
#include <fstream>
#include <random>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "client/client.h"
#include "deltaserve/v1/tuning.grpc.pb.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/common/sha256.h"
#include "tests/server/server_process.h"

namespace deltaserve {
namespace {

using ::deltaserve::testing::ServerProcess;
using ::testing::HasSubstr;
namespace pb = ::deltaserve::v1;

// A small sentiment task the frozen encoder separates easily: the label follows the adjective.
std::string SentimentTsv(int n, uint64_t seed, const std::string& label_column = "label") {
  const std::vector<std::string> good = {"great", "wonderful", "excellent", "delightful", "brilliant", "superb"};
  const std::vector<std::string> bad = {"awful", "terrible", "dreadful", "boring", "horrible", "disappointing"};
  const std::vector<std::string> things = {"movie", "film", "story", "acting", "music", "ending", "plot", "cast"};
  std::mt19937_64 rng(seed);
  std::string out = "text\t" + label_column + "\n";
  for (int i = 0; i < n; ++i) {
    const bool positive = i % 2 == 0;
    const auto& words = positive ? good : bad;
    out += absl::StrCat("the ", things[rng() % things.size()], " was ", words[rng() % words.size()], "\t",
                        positive ? "pos" : "neg", "\n");
  }
  return out;
}

class TuningIntegrationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_dir_ = testing::UseLiteModelDir();
    if (model_dir_.empty()) GTEST_SKIP() << "no converted use-lite model: run `bash scripts/setup.sh build`";
    dir_ = testing::MakeTempDir();
  }

  void StartServer(std::vector<std::string> extra = {}) {
    client_.reset();
    server_.reset();
    std::vector<std::string> args = {"--model_dir=" + model_dir_, "--store_dir=" + dir_ + "/store",
                                     "--jobs_dir=" + dir_ + "/jobs", "--max_queue_delay_ms=2",
                                     "--training_threads=1", "--training_nice=0"};
    args.insert(args.end(), extra.begin(), extra.end());
    auto server = ServerProcess::Start(args);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    client::DeltaserveClient::Options options;
    options.target = server_->address();
    options.timeout = absl::Seconds(60);
    client_ = std::make_unique<client::DeltaserveClient>(options);
  }

  std::string Upload(const std::string& bytes, const std::string& tenant = "") {
    auto uploaded = client_->UploadDataset(tenant, bytes);
    EXPECT_TRUE(uploaded.ok()) << uploaded.status();
    return uploaded.ok() ? uploaded->digest() : "";
  }

  // A LoRA + head job on `digest` with small, quick hyper-parameters.
  pb::SubmitJobRequest LoraJob(const std::string& task, const std::string& digest) {
    pb::SubmitJobRequest request;
    pb::JobSpec* spec = request.mutable_spec();
    spec->set_task(task);
    pb::MethodConfig* lora = spec->add_methods();
    lora->set_method("lora");
    lora->set_config_json(R"({"rank": 4, "alpha": 8})");
    spec->mutable_train()->set_digest(digest);
    spec->set_validation_fraction(0.25);
    pb::HyperParameters* hp = spec->mutable_hyper_parameters();
    hp->set_learning_rate(5e-3);
    hp->set_epochs(3);
    hp->set_batch_size(16);
    hp->set_seed(7);
    spec->add_labels("prod");
    return request;
  }

  absl::StatusOr<pb::Job> WaitFor(const std::string& id, const std::string& tenant = "") {
    return client_->WatchJob(tenant, id, nullptr, absl::Seconds(300));
  }

  std::string model_dir_, dir_;
  std::unique_ptr<ServerProcess> server_;
  std::unique_ptr<client::DeltaserveClient> client_;
};

TEST_F(TuningIntegrationTest, TrainedPackServesTheMomentTheJobSucceeds) {
  StartServer();
  const std::string digest = Upload(SentimentTsv(160, 1));
  auto submitted = client_->SubmitJob(LoraJob("sentiment", digest));
  ASSERT_TRUE(submitted.ok()) << submitted.status();
  EXPECT_TRUE(submitted->created());
  const pb::Job& queued = submitted->job();
  EXPECT_EQ(queued.tenant(), "default");
  EXPECT_EQ(queued.train_examples(), 120);
  EXPECT_EQ(queued.validation_examples(), 40);
  EXPECT_THAT(std::vector<std::string>(queued.classes().begin(), queued.classes().end()),
              ::testing::ElementsAre("neg", "pos"));
  EXPECT_GT(queued.trainable_parameters(), 0);
  EXPECT_LT(queued.trainable_parameters(), queued.model_parameters() / 50);  // <= 2 % of the model

  std::vector<pb::Job> events;
  auto done = client_->WatchJob("", queued.id(), [&](const pb::Job& job) {
    events.push_back(job);
    return true;
  }, absl::Seconds(300));
  ASSERT_TRUE(done.ok()) << done.status();
  ASSERT_EQ(done->state(), pb::JOB_STATE_SUCCEEDED) << done->error() << "\n" << server_->Log();
  // The stream showed the job running, with steps that only go up, and one evaluation per epoch.
  ASSERT_GE(events.size(), 3u);
  int64_t last_step = -1;
  bool saw_running = false;
  for (const pb::Job& e : events) {
    saw_running |= e.state() == pb::JOB_STATE_RUNNING;
    EXPECT_GE(e.progress().step(), last_step);
    last_step = e.progress().step();
  }
  EXPECT_TRUE(saw_running);
  ASSERT_EQ(done->evals_size(), 3);
  EXPECT_EQ(done->progress().step(), done->progress().total_steps());
  EXPECT_EQ(done->progress().total_steps(), 3 * 8);  // ceil(120 / 16) = 8 steps per epoch
  const pb::EvalResult& best = done->evals(static_cast<int>(done->best_epoch() - 1));
  EXPECT_GE(best.metrics().at("accuracy"), 0.9);
  for (const pb::EvalResult& e : done->evals()) EXPECT_LE(e.metrics().at("accuracy"), best.metrics().at("accuracy"));

  // The result is the task's version 1, labelled prod, and serves at once.
  ASSERT_TRUE(done->has_result());
  EXPECT_EQ(done->result().task(), "sentiment");
  EXPECT_EQ(done->result().version(), 1);
  EXPECT_THAT(std::vector<std::string>(done->result().labels().begin(), done->result().labels().end()),
              ::testing::Contains("prod"));
  pb::ClassifyRequest classify;
  classify.mutable_task()->set_task("sentiment:prod");
  classify.add_texts("the film was superb");
  classify.add_texts("the plot was dreadful");
  auto labels = client_->Classify(classify);
  ASSERT_TRUE(labels.ok()) << labels.status();
  ASSERT_EQ(labels->results_size(), 2);
  EXPECT_EQ(labels->results(0).labels(0).label(), "pos");
  EXPECT_EQ(labels->results(1).labels(0).label(), "neg");
  // The pack says where it came from.
  auto described = client_->GetDelta("", "sentiment:prod");
  ASSERT_TRUE(described.ok()) << described.status();
  EXPECT_THAT(std::vector<std::string>(described->pack().methods().begin(), described->pack().methods().end()),
              ::testing::ElementsAre("lora"));
  EXPECT_EQ(described->pack().head_kind(), "classification");

  // Metrics count the job and its steps.
  const std::string metrics = testing::HttpGet(server_->metrics_port(), "/metrics");
  EXPECT_THAT(metrics, HasSubstr("deltaserve_tuning_jobs_total{state=\"succeeded\"} 1"));
  EXPECT_THAT(metrics, HasSubstr("deltaserve_tuning_steps_total 24"));
}

TEST_F(TuningIntegrationTest, MalformedDatasetsAreInvalidArgumentNamingTheLine) {
  StartServer();
  struct Case {
    std::string name, bytes, expect;
  };
  const std::vector<Case> cases = {
      {"wrong field count", "text\tlabel\na\tpos\nb\tneg\nc\n", "line 4"},
      {"missing label column", "text\tclass\na\tpos\nb\tneg\n", "no column \"label\""},
      {"bad utf-8", "text\tlabel\na\tpos\nb\xff\tneg\n", "line 3"},
      {"empty text", "text\tlabel\na\tpos\n\tneg\n", "line 3"},
      {"only a header", "text\tlabel\n", "no examples"},
      {"one class", "text\tlabel\na\tpos\nb\tpos\nc\tpos\nd\tpos\n", "at least 2"},
      {"jsonl label of the wrong type", "{\"text\": \"a\", \"label\": \"pos\"}\n{\"text\": \"b\", \"label\": [1]}\n",
       "line 2"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string digest = Upload(c.bytes);
    auto submitted = client_->SubmitJob(LoraJob("bad", digest));
    ASSERT_FALSE(submitted.ok());
    EXPECT_EQ(submitted.status().code(), absl::StatusCode::kInvalidArgument) << submitted.status();
    EXPECT_THAT(std::string(submitted.status().message()), HasSubstr(c.expect));
  }
  // A label outside the given classes names its line.
  pb::SubmitJobRequest request = LoraJob("bad", Upload(SentimentTsv(40, 2)));
  request.mutable_spec()->mutable_head()->add_labels("pos");
  request.mutable_spec()->mutable_head()->add_labels("neutral");
  auto submitted = client_->SubmitJob(request);
  ASSERT_FALSE(submitted.ok());
  EXPECT_EQ(submitted.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(submitted.status().message()), HasSubstr("neg"));
  // Nothing was queued.
  auto jobs = client_->ListJobs(pb::ListJobsRequest());
  ASSERT_TRUE(jobs.ok()) << jobs.status();
  EXPECT_EQ(jobs->jobs_size(), 0);
}

TEST_F(TuningIntegrationTest, BadJobSpecsGetClearStatusesAndQueueNothing) {
  StartServer();
  const std::string digest = Upload(SentimentTsv(40, 3));
  struct Case {
    std::string name;
    std::function<void(pb::SubmitJobRequest*)> edit;
    absl::StatusCode code;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {"learning rate", [](auto* r) { r->mutable_spec()->mutable_hyper_parameters()->set_learning_rate(5); },
       absl::StatusCode::kInvalidArgument, "learning_rate"},
      {"head learning rate",
       [](auto* r) { r->mutable_spec()->mutable_hyper_parameters()->set_head_learning_rate(-0.01); },
       absl::StatusCode::kInvalidArgument, "head_learning_rate"},
      {"batch size", [](auto* r) { r->mutable_spec()->mutable_hyper_parameters()->set_batch_size(0); },
       absl::StatusCode::kInvalidArgument, "batch_size"},
      {"epochs", [](auto* r) { r->mutable_spec()->mutable_hyper_parameters()->set_epochs(1000000); },
       absl::StatusCode::kInvalidArgument, "epochs"},
      {"nan weight decay",
       [](auto* r) { r->mutable_spec()->mutable_hyper_parameters()->set_weight_decay(std::nan("")); },
       absl::StatusCode::kInvalidArgument, "weight_decay"},
      {"unknown method", [](auto* r) { r->mutable_spec()->mutable_methods(0)->set_method("qlora"); },
       absl::StatusCode::kInvalidArgument, "qlora"},
      {"rank 0", [](auto* r) { r->mutable_spec()->mutable_methods(0)->set_config_json(R"({"rank": 0})"); },
       absl::StatusCode::kInvalidArgument, "rank"},
      {"target matches nothing",
       [](auto* r) { r->mutable_spec()->mutable_methods(0)->set_config_json(R"({"targets": ["no.such.module"]})"); },
       absl::StatusCode::kInvalidArgument, "no.such.module"},
      {"config not json", [](auto* r) { r->mutable_spec()->mutable_methods(0)->set_config_json("{rank: 8"); },
       absl::StatusCode::kInvalidArgument, "config_json"},
      {"method twice", [](auto* r) { *r->mutable_spec()->add_methods() = r->spec().methods(0); },
       absl::StatusCode::kInvalidArgument, "twice"},
      {"bad task name", [](auto* r) { r->mutable_spec()->set_task("Bad Task!"); },
       absl::StatusCode::kInvalidArgument, "task"},
      {"bad label", [](auto* r) { r->mutable_spec()->add_labels("latest"); }, absl::StatusCode::kInvalidArgument,
       "latest"},
      {"validation fraction", [](auto* r) { r->mutable_spec()->set_validation_fraction(1.5); },
       absl::StatusCode::kInvalidArgument, "validation_fraction"},
      {"unknown dataset", [](auto* r) { r->mutable_spec()->mutable_train()->set_digest("sha256:" + std::string(64, 'a')); },
       absl::StatusCode::kNotFound, "upload it again"},
      {"malformed digest", [](auto* r) { r->mutable_spec()->mutable_train()->set_digest("md5:abc"); },
       absl::StatusCode::kInvalidArgument, "sha256"},
      {"full fine-tuning off",
       [](auto* r) {
         r->mutable_spec()->clear_methods();
         r->mutable_spec()->set_full(true);
       },
       absl::StatusCode::kFailedPrecondition, "--allow_full_finetuning"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    pb::SubmitJobRequest request = LoraJob("bad", digest);
    c.edit(&request);
    auto submitted = client_->SubmitJob(request);
    ASSERT_FALSE(submitted.ok());
    EXPECT_EQ(submitted.status().code(), c.code) << submitted.status();
    EXPECT_THAT(std::string(submitted.status().message()), HasSubstr(c.expect));
  }
  auto jobs = client_->ListJobs(pb::ListJobsRequest());
  ASSERT_TRUE(jobs.ok());
  EXPECT_EQ(jobs->jobs_size(), 0);
  // Unknown jobs and finished jobs.
  EXPECT_EQ(client_->GetJob("", "job-nope").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(client_->CancelJob("", "job-nope").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(client_->WatchJob("", "job-nope", nullptr, absl::Seconds(30)).status().code(),
            absl::StatusCode::kNotFound);
  // Listing with a bad page size or a token this server never gave out.
  pb::ListJobsRequest bad_list;
  bad_list.set_page_size(5000);
  EXPECT_EQ(client_->ListJobs(bad_list).status().code(), absl::StatusCode::kInvalidArgument);
  bad_list.set_page_size(0);
  bad_list.set_page_token("not-a-token");
  EXPECT_EQ(client_->ListJobs(bad_list).status().code(), absl::StatusCode::kInvalidArgument);
  // A tenant name the store would refuse.
  EXPECT_EQ(client_->GetJob("Bad Tenant!", "job-nope").status().code(), absl::StatusCode::kInvalidArgument);
  // An over-long request id.
  pb::SubmitJobRequest long_id = LoraJob("bad", digest);
  long_id.set_request_id(std::string(200, 'x'));
  EXPECT_EQ(client_->SubmitJob(long_id).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(TuningIntegrationTest, NanLossFailsTheJobAndRegistersNothing) {
  StartServer();
  // Regression targets far beyond float range once squared: the loss overflows at the first step.
  std::string tsv = "text\tlabel\n";
  for (int i = 0; i < 40; ++i) absl::StrAppend(&tsv, "sample number ", i, "\t", i % 2 ? "1e30" : "-1e30", "\n");
  pb::SubmitJobRequest request = LoraJob("exploding", Upload(tsv));
  request.mutable_spec()->mutable_head()->set_type("regression");
  auto submitted = client_->SubmitJob(request);
  ASSERT_TRUE(submitted.ok()) << submitted.status();
  auto done = WaitFor(submitted->job().id());
  ASSERT_TRUE(done.ok()) << done.status();
  EXPECT_EQ(done->state(), pb::JOB_STATE_FAILED);
  EXPECT_THAT(done->error(), HasSubstr("loss became"));  // "... NaN / infinite at step N; lower the learning rate"
  EXPECT_THAT(done->error(), HasSubstr("lower the learning rate"));
  EXPECT_EQ(done->error_code(), static_cast<int>(absl::StatusCode::kAborted));
  EXPECT_FALSE(done->has_result());
  pb::ListDeltasRequest list;
  list.set_task("exploding");
  auto versions = client_->ListDeltas(list);
  ASSERT_TRUE(versions.ok());
  EXPECT_EQ(versions->versions_size(), 0);
}

TEST_F(TuningIntegrationTest, CancelStopsARunningJobAndAQueuedOne) {
  StartServer({"--max_concurrent_jobs=1"});
  const std::string digest = Upload(SentimentTsv(400, 4));
  pb::SubmitJobRequest long_job = LoraJob("long", digest);
  long_job.mutable_spec()->mutable_hyper_parameters()->set_epochs(50);
  auto running = client_->SubmitJob(long_job);
  ASSERT_TRUE(running.ok()) << running.status();
  auto queued = client_->SubmitJob(LoraJob("second", digest));
  ASSERT_TRUE(queued.ok()) << queued.status();
  // Wait until the first one trains.
  auto started = client_->WatchJob("", running->job().id(), [](const pb::Job& job) {
    return job.progress().step() < 2;
  }, absl::Seconds(120));
  ASSERT_TRUE(started.ok()) << started.status();
  auto second = client_->GetJob("", queued->job().id());
  ASSERT_TRUE(second.ok());
  EXPECT_EQ(second->state(), pb::JOB_STATE_QUEUED);
  auto cancelled_queued = client_->CancelJob("", queued->job().id());
  ASSERT_TRUE(cancelled_queued.ok()) << cancelled_queued.status();
  EXPECT_EQ(cancelled_queued->state(), pb::JOB_STATE_CANCELLED);
  ASSERT_TRUE(client_->CancelJob("", running->job().id()).ok());
  auto done = WaitFor(running->job().id());
  ASSERT_TRUE(done.ok()) << done.status();
  EXPECT_EQ(done->state(), pb::JOB_STATE_CANCELLED);
  EXPECT_LT(done->progress().step(), done->progress().total_steps());
  // A finished job cannot be cancelled again.
  EXPECT_EQ(client_->CancelJob("", running->job().id()).status().code(), absl::StatusCode::kFailedPrecondition);
  pb::ListJobsRequest list;
  list.set_state(pb::JOB_STATE_CANCELLED);
  auto jobs = client_->ListJobs(list);
  ASSERT_TRUE(jobs.ok());
  EXPECT_EQ(jobs->jobs_size(), 2);
}

TEST_F(TuningIntegrationTest, JobSurvivesSigkillAndResumesFromItsCheckpoint) {
  StartServer({"--checkpoint_every_steps=4", "--max_concurrent_jobs=1"});
  const std::string digest = Upload(SentimentTsv(320, 5));
  pb::SubmitJobRequest request = LoraJob("durable", digest);
  request.mutable_spec()->mutable_hyper_parameters()->set_epochs(2);
  auto first = client_->SubmitJob(request);
  ASSERT_TRUE(first.ok()) << first.status();
  auto second = client_->SubmitJob(LoraJob("queued-then", digest));
  ASSERT_TRUE(second.ok()) << second.status();
  // Kill the server mid-job, after at least one checkpoint.
  auto progressed = client_->WatchJob("", first->job().id(), [](const pb::Job& job) {
    return job.progress().step() < 9;
  }, absl::Seconds(120));
  ASSERT_TRUE(progressed.ok()) << progressed.status();
  ASSERT_EQ(server_->Stop(SIGKILL), 128 + SIGKILL);

  StartServer({"--checkpoint_every_steps=4", "--max_concurrent_jobs=1"});
  auto done = WaitFor(first->job().id());
  ASSERT_TRUE(done.ok()) << done.status();
  EXPECT_EQ(done->state(), pb::JOB_STATE_SUCCEEDED) << done->error() << "\n" << server_->Log();
  EXPECT_EQ(done->attempts(), 2);
  EXPECT_EQ(done->evals_size(), 2);
  EXPECT_THAT(server_->Log(), HasSubstr("resumes from its checkpoint"));
  auto other = WaitFor(second->job().id());
  ASSERT_TRUE(other.ok()) << other.status();
  EXPECT_EQ(other->state(), pb::JOB_STATE_SUCCEEDED) << other->error();
  EXPECT_EQ(other->attempts(), 1);
  // Both packs serve.
  for (const std::string task : {"durable:prod", "queued-then:prod"}) {
    pb::ClassifyRequest classify;
    classify.mutable_task()->set_task(task);
    classify.add_texts("the music was wonderful");
    auto labels = client_->Classify(classify);
    ASSERT_TRUE(labels.ok()) << task << ": " << labels.status();
    EXPECT_EQ(labels->results(0).labels(0).label(), "pos") << task;
  }
}

TEST_F(TuningIntegrationTest, TenantsSeeOnlyTheirOwnJobsAndRequestIdsAreIdempotent) {
  StartServer();
  const std::string digest = Upload(SentimentTsv(40, 6), "acme");
  pb::SubmitJobRequest request = LoraJob("mine", digest);
  request.set_tenant("acme");
  request.set_request_id("retry-1");
  request.mutable_spec()->mutable_hyper_parameters()->set_epochs(1);
  auto first = client_->SubmitJob(request);
  ASSERT_TRUE(first.ok()) << first.status();
  auto again = client_->SubmitJob(request);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_FALSE(again->created());
  EXPECT_EQ(again->job().id(), first->job().id());
  EXPECT_EQ(client_->GetJob("globex", first->job().id()).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(client_->CancelJob("globex", first->job().id()).status().code(), absl::StatusCode::kNotFound);
  pb::ListJobsRequest list;
  list.set_tenant("globex");
  auto theirs = client_->ListJobs(list);
  ASSERT_TRUE(theirs.ok());
  EXPECT_EQ(theirs->jobs_size(), 0);
  list.set_tenant("acme");
  auto ours = client_->ListJobs(list);
  ASSERT_TRUE(ours.ok());
  EXPECT_EQ(ours->jobs_size(), 1);
  auto done = WaitFor(first->job().id(), "acme");
  ASSERT_TRUE(done.ok()) << done.status();
  EXPECT_EQ(done->state(), pb::JOB_STATE_SUCCEEDED) << done->error();
  EXPECT_EQ(done->result().tenant(), "acme");
}

TEST_F(TuningIntegrationTest, DeltactlSubmitsWatchesListsAndCancels) {
  StartServer();
  const std::string data = dir_ + "/train.tsv";
  std::ofstream(data) << SentimentTsv(80, 8);
  const std::string server = "--server=" + server_->address();
  testing::CommandResult submitted = testing::RunCommand(
      {testing::DeltactlBinary(), server, "tune", "submit", "--task=cli", "--data=" + data, "--method=lora,bitfit",
       R"(--method_config={"lora": {"rank": 2}})", "--label=prod", "--epochs=2", "--batch_size=16", "--lr=0.005",
       "--head_lr=0.02", "--validation_fraction=0.25", "--watch"},
      "", absl::Seconds(300));
  ASSERT_EQ(submitted.exit_code, 0) << submitted.out << submitted.err;
  EXPECT_THAT(submitted.err, HasSubstr("epoch 1: val loss"));
  EXPECT_THAT(submitted.err, HasSubstr("succeeded"));
  EXPECT_THAT(submitted.out, HasSubstr("-> default/cli@1"));

  testing::CommandResult listed =
      testing::RunCommand({testing::DeltactlBinary(), server, "tune", "ls", "--json"});
  ASSERT_EQ(listed.exit_code, 0) << listed.err;
  nlohmann::json jobs = nlohmann::json::parse(listed.out);
  ASSERT_EQ(jobs.size(), 1u);
  EXPECT_EQ(jobs[0]["state"], "JOB_STATE_SUCCEEDED");
  EXPECT_EQ(jobs[0]["spec"]["hyper_parameters"]["head_learning_rate"], 0.02) << jobs[0].dump();
  const std::string id = jobs[0]["id"];
  // Cancelling a finished job: FAILED_PRECONDITION, exit code 1.
  testing::CommandResult cancel = testing::RunCommand({testing::DeltactlBinary(), server, "tune", "cancel", id});
  EXPECT_EQ(cancel.exit_code, 1);
  EXPECT_THAT(cancel.err, HasSubstr("FAILED_PRECONDITION"));
  // A malformed dataset is reported with its line by the CLI too.
  std::ofstream(dir_ + "/bad.tsv") << "text\tlabel\nfine\tpos\nbroken line without a label\n";
  testing::CommandResult bad = testing::RunCommand({testing::DeltactlBinary(), server, "tune", "submit",
                                                    "--task=cli", "--data=" + dir_ + "/bad.tsv", "--method=lora"});
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_THAT(bad.err, HasSubstr("INVALID_ARGUMENT"));
  EXPECT_THAT(bad.err, HasSubstr("line 3"));
}

// A small pair task: "same" when the second text names the first one's animal, "different" otherwise. The label
// depends on both texts: only a model that sees the pair can learn it.
std::string SameAnimalTsv(int n, uint64_t seed) {
  const std::vector<std::string> animals = {"cat", "dog", "horse", "bird"};
  const std::vector<std::string> verbs = {"sleeps", "runs", "eats", "sits", "waits", "plays"};
  const std::vector<std::string> places = {"in the garden", "on the road", "near the house", "by the river"};
  std::mt19937_64 rng(seed);
  std::string out = "text\ttext_pair\tlabel\n";
  for (int i = 0; i < n; ++i) {
    const bool same = i % 2 == 0;
    const size_t a = rng() % animals.size();
    const size_t b = same ? a : (a + 1 + rng() % (animals.size() - 1)) % animals.size();
    out += absl::StrCat("the ", animals[a], " ", verbs[rng() % verbs.size()], "\t", "a ", animals[b], " ",
                        places[rng() % places.size()], "\t", same ? "same" : "different", "\n");
  }
  return out;
}

TEST_F(TuningIntegrationTest, PairTaskTrainsAndServesWithTextPairs) {
  StartServer();
  pb::SubmitJobRequest request = LoraJob("same_animal", Upload(SameAnimalTsv(320, 9)));
  // Matching words across the two texts takes a few more, larger steps than sentiment (~5 s).
  request.mutable_spec()->mutable_hyper_parameters()->set_epochs(6);
  request.mutable_spec()->mutable_hyper_parameters()->set_learning_rate(0.02);
  auto submitted = client_->SubmitJob(request);
  ASSERT_TRUE(submitted.ok()) << submitted.status();
  auto done = WaitFor(submitted->job().id());
  ASSERT_TRUE(done.ok()) << done.status();
  ASSERT_EQ(done->state(), pb::JOB_STATE_SUCCEEDED) << done->error() << "\n" << server_->Log();
  const pb::EvalResult& best = done->evals(static_cast<int>(done->best_epoch() - 1));
  EXPECT_GE(best.metrics().at("accuracy"), 0.9);

  // Classify takes the pairs with texts + text_pairs, encoded as the job trained on them.
  pb::ClassifyRequest classify;
  classify.mutable_task()->set_task("same_animal:prod");
  const std::vector<std::pair<std::string, std::string>> inputs = {
      {"the cat sleeps", "a cat on the road"}, {"the dog runs", "a horse near the house"},
      {"the bird eats", "a bird by the river"}, {"the horse waits", "a cat in the garden"}};
  for (const auto& [text, pair] : inputs) {
    classify.add_texts(text);
    classify.add_text_pairs(pair);
  }
  auto labels = client_->Classify(classify);
  ASSERT_TRUE(labels.ok()) << labels.status();
  ASSERT_EQ(labels->results_size(), 4);
  const std::vector<std::string> expected = {"same", "different", "same", "different"};
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(labels->results(i).labels(0).label(), expected[i]) << inputs[i].first << " / " << inputs[i].second;
    EXPECT_FALSE(labels->results(i).truncated());
  }

  // Not one pair per text: INVALID_ARGUMENT saying so.
  classify.add_text_pairs("one too many");
  auto mismatched = client_->Classify(classify);
  ASSERT_FALSE(mismatched.ok());
  EXPECT_EQ(mismatched.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(mismatched.status().message()),
              HasSubstr("text_pairs has 5 entries but texts has 4: give one per text, or none"));

  // deltactl classify --pairs: TEXT<TAB>PAIR per stdin line.
  testing::CommandResult cli = testing::RunCommand(
      {testing::DeltactlBinary(), "--server=" + server_->address(), "classify", "--task=same_animal:prod",
       "--pairs", "--top_k=1"},
      "the dog sleeps\ta dog by the river\nthe cat plays\ta bird on the road\n");
  ASSERT_EQ(cli.exit_code, 0) << cli.err;
  nlohmann::json out = nlohmann::json::parse(cli.out);
  ASSERT_EQ(out["results"].size(), 2u);
  EXPECT_EQ(out["results"][0]["text_pair"], "a dog by the river");
  EXPECT_EQ(out["results"][0]["labels"][0]["label"], "same");
  EXPECT_EQ(out["results"][1]["labels"][0]["label"], "different");
}

TEST_F(TuningIntegrationTest, BadUploadsAndNonNumericRegressionLabelsGetClearStatuses) {
  StartServer({"--max_dataset_bytes=2000"});
  // Over the limit: RESOURCE_EXHAUSTED naming it.
  auto big = client_->UploadDataset("", SentimentTsv(200, 9));
  ASSERT_FALSE(big.ok());
  EXPECT_EQ(big.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(big.status().message()), HasSubstr("2000"));
  EXPECT_EQ(client_->UploadDataset("", "").status().code(), absl::StatusCode::kInvalidArgument);

  // Raw streams: a damaged upload, a wrong announced size, a chunk before the header.
  auto channel = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
  auto stub = pb::TuningService::NewStub(channel);
  auto upload = [&](const std::vector<pb::UploadDatasetRequest>& messages) {
    grpc::ClientContext context;
    pb::UploadDatasetResponse response;
    auto writer = stub->UploadDataset(&context, &response);
    for (const auto& m : messages) {
      if (!writer->Write(m)) break;
    }
    writer->WritesDone();
    return writer->Finish();
  };
  const std::string bytes = SentimentTsv(10, 10);
  pb::UploadDatasetRequest header, chunk;
  header.mutable_header()->set_expected_digest(Sha256Digest("something else"));
  chunk.set_chunk(bytes);
  grpc::Status damaged = upload({header, chunk});
  EXPECT_EQ(damaged.error_code(), grpc::StatusCode::DATA_LOSS) << damaged.error_message();
  header.mutable_header()->clear_expected_digest();
  header.mutable_header()->set_size_bytes(static_cast<int64_t>(bytes.size()) + 1);
  grpc::Status short_upload = upload({header, chunk});
  EXPECT_EQ(short_upload.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(short_upload.error_message(), HasSubstr("announced"));
  grpc::Status headless = upload({chunk});
  EXPECT_EQ(headless.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(headless.error_message(), HasSubstr("header"));

  // A regression job whose labels are not numbers names the line.
  auto uploaded = client_->UploadDataset("", "text\tlabel\nfirst\t0.5\nsecond\tlots\n");
  ASSERT_TRUE(uploaded.ok()) << uploaded.status();
  pb::SubmitJobRequest request = LoraJob("scores", uploaded->digest());
  request.mutable_spec()->mutable_head()->set_type("regression");
  request.mutable_spec()->set_validation_fraction(0.5);
  auto submitted = client_->SubmitJob(request);
  ASSERT_FALSE(submitted.ok());
  EXPECT_EQ(submitted.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(submitted.status().message()), HasSubstr("line 3"));
}

}  // namespace
}  // namespace deltaserve

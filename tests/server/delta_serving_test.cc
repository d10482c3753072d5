// Integration: a real deltaserve serving delta packs imported from --delta_dir into its (in-memory) store, called
// over gRPC. Each result must equal
// the in-process forward of the same pack; tasks of different tenants stay apart; bad packs are skipped at start.
#include <fstream>
#include <thread>

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <sys/stat.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/delta/delta_batch.h"
#include "server/delta/delta_pack.h"
#include "server/model/model_loader.h"
#include "tests/delta/delta_test_util.h"
#include "tests/server/server_process.h"

namespace deltaserve {
namespace {

using ::deltaserve::testing::ServerProcess;
using ::testing::HasSubstr;
namespace pb = ::deltaserve::v1;
using delta::MethodKind;
using delta::MethodSpec;
using delta::PackContents;
using delta::testing::RandomTensor;

const model::ModuleInfo* Module(const model::Model& m, const std::string& name) {
  for (const auto& info : m.modules()) {
    if (info.name == name) return &info;
  }
  return nullptr;
}

PackContents BasePack(const model::Model& m, const std::string& name) {
  PackContents c;
  c.manifest.name = name;
  c.manifest.backbone_family = m.info().family;
  c.manifest.backbone_fingerprint = m.info().fingerprint;
  c.manifest.provenance = {{"made_by", "delta_serving_test"}};
  return c;
}

// LoRA r=4 on every query/value, BitFit on the pooler, and a 3-label classification head.
PackContents SentimentPack(const model::Model& m, uint64_t seed) {
  PackContents c = BasePack(m, "sentiment");
  MethodSpec lora;
  lora.kind = MethodKind::kLora;
  lora.config = {{"rank", 4}, {"alpha", 8}, {"targets", {"query", "value"}}};
  for (const auto& info : m.modules()) {
    if (info.kind != model::ModuleKind::kLinear) continue;
    if (!(absl::EndsWith(info.name, ".query") || absl::EndsWith(info.name, ".value"))) continue;
    lora.tensors[info.name + ".lora_A"] = RandomTensor({4, info.in_features}, 0.2, seed++);
    lora.tensors[info.name + ".lora_B"] = RandomTensor({info.out_features, 4}, 0.2, seed++);
  }
  c.methods.push_back(lora);
  MethodSpec bitfit;
  bitfit.kind = MethodKind::kBitFit;
  bitfit.config = {{"targets", {"pooler.dense"}}};
  bitfit.tensors["pooler.dense.bias"] = RandomTensor({Module(m, "pooler.dense")->out_features}, 0.1, seed++);
  c.methods.push_back(bitfit);
  delta::HeadSpec head;
  head.config = {{"type", "classification"}, {"labels", {"negative", "neutral", "positive"}}};
  head.tensors["out.weight"] = RandomTensor({3, m.info().embedding_dim}, 1.0, seed++);
  head.tensors["out.bias"] = RandomTensor({3}, 0.1, seed++);
  c.head = head;
  return c;
}

// Prompt tuning (5 soft tokens) and no head.
PackContents TopicPack(const model::Model& m, uint64_t seed) {
  PackContents c = BasePack(m, "topic");
  MethodSpec prompt;
  prompt.kind = MethodKind::kPrompt;
  prompt.config = {{"num_virtual_tokens", 5}};
  prompt.tensors["prompt_embeddings"] =
      RandomTensor({5, Module(m, "embeddings.word_embeddings")->out_features}, 0.3, seed);
  c.methods.push_back(prompt);
  return c;
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out << bytes;
}

std::vector<float> Values(const pb::Vector& v) { return {v.values().begin(), v.values().end()}; }

class DeltaServingTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string model_dir = testing::UseLiteModelDir();
    if (model_dir.empty()) return;
    auto loaded = model::LoadModel(model_dir, {});
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    model_ = loaded->release();
    dir_ = new std::string(testing::MakeTempDir());
    ::mkdir((*dir_ + "/acme").c_str(), 0755);
    auto sentiment = delta::SerializePack(SentimentPack(*model_, 100));
    ASSERT_TRUE(sentiment.ok()) << sentiment.status();
    WriteFile(*dir_ + "/sentiment.dpack", *sentiment);
    auto topic = delta::SerializePack(TopicPack(*model_, 200));
    ASSERT_TRUE(topic.ok()) << topic.status();
    WriteFile(*dir_ + "/acme/topic.dpack", *topic);
    WriteFile(*dir_ + "/broken.dpack", "not a pack at all");
    PackContents other = SentimentPack(*model_, 300);
    other.manifest.backbone_fingerprint = "sha256:" + std::string(64, 'a');
    WriteFile(*dir_ + "/other-backbone.dpack", *delta::SerializePack(other));

    auto server = ServerProcess::Start({"--model_dir=" + model_dir, "--delta_dir=" + *dir_,
                                        "--max_queue_delay_ms=20"});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override {
    if (model_ == nullptr) GTEST_SKIP() << "no converted use-lite model: run `bash scripts/setup.sh build`";
    ASSERT_NE(server_, nullptr);
    client::DeltaserveClient::Options options;
    options.target = server_->address();
    client_ = std::make_unique<client::DeltaserveClient>(options);
  }

  // The in-process result: the pack file loaded here, applied to one row.
  static std::vector<float> Expected(const std::string& pack_path, const std::vector<int64_t>& ids) {
    std::ifstream in(pack_path, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    auto pack = delta::DeltaPack::Load(bytes, *model_, {});
    EXPECT_TRUE(pack.ok()) << pack.status();
    c10::InferenceMode guard;
    auto hooks = delta::DeltaBatch::Create({pack->get()}, *model_);
    EXPECT_TRUE(hooks.ok());
    auto out = delta::testing::RunRows(*model_, {ids}, hooks->get());
    EXPECT_TRUE(out.ok()) << out.status();
    at::Tensor pooled = out->pooled[0].contiguous();
    return std::vector<float>(pooled.data_ptr<float>(), pooled.data_ptr<float>() + pooled.numel());
  }

  static float MaxDiff(const std::vector<float>& a, const std::vector<float>& b) {
    float m = a.size() == b.size() ? 0.f : 1e9f;
    for (size_t i = 0; i < a.size() && i < b.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
    return m;
  }

  static const model::Model* model_;
  static std::string* dir_;
  static ServerProcess* server_;
  std::unique_ptr<client::DeltaserveClient> client_;
};

const model::Model* DeltaServingTest::model_ = nullptr;
std::string* DeltaServingTest::dir_ = nullptr;
ServerProcess* DeltaServingTest::server_ = nullptr;

TEST_F(DeltaServingTest, LoadsValidPacksAndSkipsBrokenOnesWithAReason) {
  auto info = client_->GetModelInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->num_deltas(), 2);
  EXPECT_THAT(server_->Log(), HasSubstr("broken.dpack"));
  EXPECT_THAT(server_->Log(), HasSubstr("other-backbone.dpack"));
}

TEST_F(DeltaServingTest, EmbedWithATaskEqualsTheInProcessForwardOfItsPack) {
  const std::vector<int64_t> ids = {34, 2280, 3744, 1394, 152, 2009};
  pb::EmbedRequest request;
  request.mutable_task()->set_task("sentiment");
  *request.add_token_ids()->mutable_ids() = {ids.begin(), ids.end()};
  auto r = client_->Embed(request);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_LE(MaxDiff(Values(r->results(0).embedding()), Expected(*dir_ + "/sentiment.dpack", ids)), 1e-5);
  EXPECT_EQ(r->delta().name(), "sentiment");
  EXPECT_THAT(r->delta().digest(), ::testing::StartsWith("sha256:"));
  EXPECT_THAT(std::vector<std::string>(r->delta().methods().begin(), r->delta().methods().end()),
              ::testing::ElementsAre("lora", "bitfit"));
}

TEST_F(DeltaServingTest, ConcurrentRequestsOfDifferentTasksShareBatchesAndGetTheirOwnResults) {
  const std::vector<int64_t> ids = {16, 241, 43, 888, 6};
  const std::vector<float> base = [&] {
    pb::EmbedRequest r;
    *r.add_token_ids()->mutable_ids() = {ids.begin(), ids.end()};
    return Values(client_->Embed(r)->results(0).embedding());
  }();
  const std::vector<float> sentiment = Expected(*dir_ + "/sentiment.dpack", ids);
  const std::vector<float> topic = Expected(*dir_ + "/acme/topic.dpack", ids);
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 18; ++i) {
    threads.emplace_back([&, i] {
      pb::EmbedRequest r;
      *r.add_token_ids()->mutable_ids() = {ids.begin(), ids.end()};
      const std::vector<float>* want = &base;
      if (i % 3 == 1) {
        r.mutable_task()->set_task("sentiment");
        want = &sentiment;
      } else if (i % 3 == 2) {
        r.set_tenant("acme");
        r.mutable_task()->set_task("topic");
        want = &topic;
      }
      auto out = client_->Embed(r);
      if (!out.ok() || MaxDiff(Values(out->results(0).embedding()), *want) > 1e-5) failures++;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_GT(MaxDiff(sentiment, base), 1e-3) << "the pack must change the embedding";
  EXPECT_GT(MaxDiff(topic, base), 1e-3);
}

TEST_F(DeltaServingTest, ClassifyReturnsLabelsBestFirstWithScoresThatSumToOne) {
  pb::ClassifyRequest request;
  request.mutable_task()->set_task("sentiment");
  request.add_texts("I love this movie.");
  request.add_texts("The stock market fell sharply today.");
  auto r = client_->Classify(request);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->results_size(), 2);
  for (const auto& result : r->results()) {
    ASSERT_EQ(result.labels_size(), 3);
    float sum = 0;
    for (int k = 0; k < 3; ++k) {
      sum += result.labels(k).score();
      if (k > 0) EXPECT_GE(result.labels(k - 1).score(), result.labels(k).score());
    }
    EXPECT_NEAR(sum, 1.0, 1e-5);
  }
  request.set_top_k(1);
  auto top1 = client_->Classify(request);
  ASSERT_TRUE(top1.ok());
  EXPECT_EQ(top1->results(0).labels_size(), 1);
  EXPECT_EQ(top1->results(0).labels(0).label(), r->results(0).labels(0).label());
}

TEST_F(DeltaServingTest, TaskByDigestFindsThePack) {
  pb::EmbedRequest by_name;
  by_name.mutable_task()->set_task("sentiment");
  by_name.add_texts("hello world");
  auto a = client_->Embed(by_name);
  ASSERT_TRUE(a.ok());
  pb::EmbedRequest by_digest;
  by_digest.mutable_task()->set_digest(a->delta().digest());
  by_digest.add_texts("hello world");
  auto b = client_->Embed(by_digest);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_LE(MaxDiff(Values(a->results(0).embedding()), Values(b->results(0).embedding())), 1e-6);
}

TEST_F(DeltaServingTest, AnswersClearErrorsForBadTaskReferences) {
  struct Case {
    std::string tenant, task, digest, label;
    absl::StatusCode code;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"", "no-such-task", "", "", absl::StatusCode::kNotFound, "default/no-such-task has no versions"},
      {"", "topic", "", "", absl::StatusCode::kNotFound, "default/topic has no versions"},  // acme's, not ours
      {"globex", "sentiment", "", "", absl::StatusCode::kNotFound, "globex/sentiment has no versions"},
      {"", "Bad/Name", "", "", absl::StatusCode::kInvalidArgument, "reference \"Bad/Name\""},
      {"", "", "sha256:xyz", "", absl::StatusCode::kInvalidArgument, "not sha256"},
      {"", "", "sha256:" + std::string(64, '0'), "", absl::StatusCode::kNotFound, "is not a version of any task"},
      {"", "sentiment", "", "prod", absl::StatusCode::kNotFound, "has no label \"prod\""},
      {"", "sentiment@latest", "", "", absl::StatusCode::kInvalidArgument, "version"},
      {"acme", "globex/topic", "", "", absl::StatusCode::kPermissionDenied, "names tenant \"globex\""},
  };
  for (const Case& c : cases) {
    pb::EmbedRequest request;
    request.set_tenant(c.tenant);
    request.add_texts("hello");
    request.mutable_task()->set_task(c.task);
    if (!c.digest.empty()) request.mutable_task()->set_digest(c.digest);
    if (!c.label.empty()) request.mutable_task()->set_label(c.label);
    auto r = client_->Embed(request);
    EXPECT_EQ(r.status().code(), c.code) << c.task << c.digest;
    EXPECT_THAT(r.status().message(), HasSubstr(c.message));
  }
  pb::ClassifyRequest no_head;
  no_head.set_tenant("acme");
  no_head.mutable_task()->set_task("topic");
  no_head.add_texts("hello");
  auto r = client_->Classify(no_head);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), HasSubstr("has no head"));
  pb::ClassifyRequest no_task;
  no_task.add_texts("hello");
  EXPECT_EQ(client_->Classify(no_task).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(DeltaServingTest, PerTokenEmbeddingsOfAPromptTaskCoverOnlyTheCallersTokens) {
  pb::EmbedRequest request;
  request.set_tenant("acme");
  request.mutable_task()->set_task("topic");
  request.add_texts("I love this movie.");
  request.set_return_token_embeddings(true);
  auto r = client_->Embed(request);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->results(0).token_embeddings_size(), r->results(0).num_tokens());
}

TEST_F(DeltaServingTest, DeltactlClassifiesAndEmbedsWithATask) {
  const std::string server = "--server=" + server_->address();
  auto classify = testing::RunCommand({testing::DeltactlBinary(), server, "classify", "--task=sentiment",
                                       "--top_k=2", "I love this movie."});
  ASSERT_EQ(classify.exit_code, 0) << classify.err;
  auto out = nlohmann::json::parse(classify.out);
  EXPECT_EQ(out["results"][0]["labels"].size(), 2u);
  EXPECT_EQ(out["delta"]["name"], "sentiment");
  auto missing = testing::RunCommand({testing::DeltactlBinary(), server, "classify", "hello"});
  EXPECT_EQ(missing.exit_code, 2);
  auto embed = testing::RunCommand({testing::DeltactlBinary(), server, "--tenant=acme", "embed", "--task=topic",
                                    "hello world"});
  ASSERT_EQ(embed.exit_code, 0) << embed.err;
  EXPECT_EQ(nlohmann::json::parse(embed.out)["delta"]["methods"][0], "prompt");
}

}  // namespace
}  // namespace deltaserve

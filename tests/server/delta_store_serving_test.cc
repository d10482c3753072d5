// Integration: the Deltas API of a real deltaserve on a real store directory, over gRPC and through deltactl.
// Pushed packs serve at once; labels move what requests get; bad pushes and bad references get clear statuses
// and store nothing; the store survives a restart; corrupt bytes on disk are DATA_LOSS, never a wrong answer.
#include <sys/stat.h>

#include <cmath>
#include <fstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/client.h"
#include "deltaserve/v1/deltas.grpc.pb.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/common/file_util.h"
#include "server/common/sha256.h"
#include "server/delta/delta_pack.h"
#include "server/model/model_loader.h"
#include "tests/delta/delta_test_util.h"
#include "tests/server/server_process.h"

namespace deltaserve {
namespace {

using ::deltaserve::testing::ServerProcess;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
namespace pb = ::deltaserve::v1;

// LoRA r=2 on every query/value and a two-label head; `seed` makes packs differ.
std::string Pack(const model::Model& m, const std::string& name, uint64_t seed,
                 const std::string& fingerprint = "") {
  delta::PackContents c;
  c.manifest.name = name;
  c.manifest.backbone_family = m.info().family;
  c.manifest.backbone_fingerprint = fingerprint.empty() ? m.info().fingerprint : fingerprint;
  delta::MethodSpec lora;
  lora.kind = delta::MethodKind::kLora;
  lora.config = {{"rank", 2}, {"alpha", 4}, {"targets", {"query", "value"}}};
  for (const auto& info : m.modules()) {
    if (info.kind != model::ModuleKind::kLinear) continue;
    if (!(absl::EndsWith(info.name, ".query") || absl::EndsWith(info.name, ".value"))) continue;
    lora.tensors[info.name + ".lora_A"] = delta::testing::RandomTensor({2, info.in_features}, 0.3, seed++);
    lora.tensors[info.name + ".lora_B"] = delta::testing::RandomTensor({info.out_features, 2}, 0.3, seed++);
  }
  c.methods.push_back(lora);
  delta::HeadSpec head;
  head.config = {{"type", "classification"}, {"labels", {"neg", "pos"}}};
  head.tensors["out.weight"] = delta::testing::RandomTensor({2, m.info().embedding_dim}, 1.0, seed++);
  head.tensors["out.bias"] = delta::testing::RandomTensor({2}, 0.1, seed++);
  c.head = head;
  auto bytes = delta::SerializePack(c);
  EXPECT_TRUE(bytes.ok()) << bytes.status();
  return *bytes;
}

std::vector<float> Values(const pb::Vector& v) { return {v.values().begin(), v.values().end()}; }

float MaxDiff(const std::vector<float>& a, const std::vector<float>& b) {
  float m = a.size() == b.size() ? 0.f : 1e9f;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

class DeltaStoreServingTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    model_dir_ = new std::string(testing::UseLiteModelDir());
    if (model_dir_->empty()) return;
    auto loaded = model::LoadModel(*model_dir_, {});
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    model_ = loaded->release();
  }

  void SetUp() override {
    if (model_ == nullptr) GTEST_SKIP() << "no converted use-lite model: run `bash scripts/setup.sh build`";
    store_dir_ = testing::MakeTempDir() + "/store";
    StartServer({});
  }

  void StartServer(std::vector<std::string> extra) {
    client_.reset();
    server_.reset();
    std::vector<std::string> args = {"--model_dir=" + *model_dir_, "--store_dir=" + store_dir_,
                                     "--max_pack_bytes=400000", "--max_queue_delay_ms=5"};
    args.insert(args.end(), extra.begin(), extra.end());
    auto server = ServerProcess::Start(args);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    client::DeltaserveClient::Options options;
    options.target = server_->address();
    client_ = std::make_unique<client::DeltaserveClient>(options);
  }

  absl::StatusOr<pb::PushDeltaResponse> Push(const std::string& task, const std::string& bytes,
                                             std::vector<std::string> labels = {}, const std::string& tenant = "") {
    pb::PushDeltaHeader header;
    header.set_tenant(tenant);
    header.set_task(task);
    for (const std::string& l : labels) header.add_labels(l);
    return client_->PushDelta(header, bytes);
  }

  absl::StatusOr<std::vector<float>> EmbedWith(const std::string& task_text, const std::string& label = "") {
    pb::EmbedRequest request;
    request.mutable_task()->set_task(task_text);
    if (!label.empty()) request.mutable_task()->set_label(label);
    request.add_texts("a movie I will remember");
    auto r = client_->Embed(request);
    if (!r.ok()) return r.status();
    return Values(r->results(0).embedding());
  }

  static std::string* model_dir_;
  static const model::Model* model_;
  std::string store_dir_;
  std::unique_ptr<ServerProcess> server_;
  std::unique_ptr<client::DeltaserveClient> client_;
};

std::string* DeltaStoreServingTest::model_dir_ = nullptr;
const model::Model* DeltaStoreServingTest::model_ = nullptr;

TEST_F(DeltaStoreServingTest, PushedPackServesAtOnceAndPullsBackAsTheStoredBytes) {
  const std::string bytes = Pack(*model_, "sentiment-v1", 1);
  auto pushed = Push("sentiment", bytes, {"prod"});
  ASSERT_TRUE(pushed.ok()) << pushed.status();
  EXPECT_TRUE(pushed->created());
  EXPECT_EQ(pushed->version().tenant(), "default");
  EXPECT_EQ(pushed->version().version(), 1);
  EXPECT_THAT(pushed->version().labels(), ElementsAre("latest", "prod"));
  EXPECT_EQ(pushed->uploaded_digest(), Sha256Digest(bytes));
  EXPECT_THAT(pushed->pack().methods(), ElementsAre("lora"));
  EXPECT_EQ(pushed->pack().head_kind(), "classification");

  pb::EmbedRequest request;
  request.mutable_task()->set_task("sentiment");
  request.add_texts("a movie I will remember");
  auto embedded = client_->Embed(request);
  ASSERT_TRUE(embedded.ok()) << embedded.status();
  EXPECT_EQ(embedded->delta().digest(), pushed->version().digest());

  std::string pulled;
  auto version = client_->PullDelta("", "sentiment@1", &pulled);
  ASSERT_TRUE(version.ok()) << version.status();
  EXPECT_EQ(Sha256Digest(pulled), pushed->version().digest());
  EXPECT_EQ(version->digest(), pushed->version().digest());

  auto got = client_->GetDelta("", "default/sentiment:prod");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->pack().name(), "sentiment-v1");
  EXPECT_THAT(got->pack().head_labels(), ElementsAre("neg", "pos"));

  // Pushing the same pack again changes nothing.
  auto again = Push("sentiment", bytes);
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->created());
  EXPECT_EQ(again->version().version(), 1);
}

TEST_F(DeltaStoreServingTest, MovingALabelSwitchesWhatRequestsGetAndVersionsStayAddressable) {
  ASSERT_TRUE(Push("sentiment", Pack(*model_, "v1", 1), {"prod"}).ok());
  ASSERT_TRUE(Push("sentiment", Pack(*model_, "v2", 100)).ok());
  auto v1 = EmbedWith("sentiment@1");
  auto v2 = EmbedWith("sentiment@2");
  ASSERT_TRUE(v1.ok() && v2.ok()) << v1.status() << v2.status();
  ASSERT_GT(MaxDiff(*v1, *v2), 1e-4);
  EXPECT_LE(MaxDiff(*EmbedWith("sentiment", "prod"), *v1), 1e-6);
  EXPECT_LE(MaxDiff(*EmbedWith("sentiment:prod"), *v1), 1e-6);
  EXPECT_LE(MaxDiff(*EmbedWith("sentiment"), *v2), 1e-6);  // latest

  pb::SetLabelRequest move;
  move.set_task("sentiment");
  move.set_label("prod");
  move.set_version(2);
  auto moved = client_->SetLabel(move);
  ASSERT_TRUE(moved.ok()) << moved.status();
  EXPECT_EQ(moved->version().version(), 2);
  EXPECT_LE(MaxDiff(*EmbedWith("sentiment:prod"), *v2), 1e-6);
  EXPECT_LE(MaxDiff(*EmbedWith("sentiment@1"), *v1), 1e-6);
}

TEST_F(DeltaStoreServingTest, ListPagesThroughVersionsOfATenant) {
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(Push("paged", Pack(*model_, "p", 10 + 10 * i)).ok());
  ASSERT_TRUE(Push("other", Pack(*model_, "o", 99)).ok());
  ASSERT_TRUE(Push("theirs", Pack(*model_, "t", 77), {}, "acme").ok());
  pb::ListDeltasRequest request;
  request.set_task("paged");
  request.set_page_size(2);
  auto first = client_->ListDeltas(request);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_EQ(first->versions_size(), 2);
  ASSERT_FALSE(first->next_page_token().empty());
  request.set_page_token(first->next_page_token());
  auto second = client_->ListDeltas(request);
  ASSERT_TRUE(second.ok());
  ASSERT_EQ(second->versions_size(), 1);
  EXPECT_EQ(second->versions(0).version(), 3);
  EXPECT_TRUE(second->next_page_token().empty());
  pb::ListDeltasRequest all;
  auto mine = client_->ListDeltas(all);
  ASSERT_TRUE(mine.ok());
  EXPECT_EQ(mine->versions_size(), 4);  // not acme's
  request.set_page_token("garbage");
  EXPECT_EQ(client_->ListDeltas(request).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(DeltaStoreServingTest, BadPushesGetClearStatusesAndStoreNothing) {
  const std::string good = Pack(*model_, "good", 1);
  struct Case {
    std::string task, bytes, expected_digest, message;
    absl::StatusCode code;
  };
  const std::vector<Case> cases = {
      {"sentiment", "definitely not a pack", "", "delta pack", absl::StatusCode::kInvalidArgument},
      {"sentiment", Pack(*model_, "x", 1, "sha256:" + std::string(64, 'b')), "", "backbone",
       absl::StatusCode::kFailedPrecondition},
      {"../../etc", good, "", "not a valid name", absl::StatusCode::kInvalidArgument},
      {"sentiment", good, "sha256:" + std::string(64, 'c'), "damaged", absl::StatusCode::kDataLoss},
      {"sentiment", std::string(500000, 'x'), "", "limit", absl::StatusCode::kResourceExhausted},
  };
  for (const Case& c : cases) {
    pb::PushDeltaHeader header;
    header.set_task(c.task);
    header.set_expected_digest(c.expected_digest);
    auto r = client_->PushDelta(header, c.bytes);
    EXPECT_EQ(r.status().code(), c.code) << c.message << ": " << r.status();
    EXPECT_THAT(r.status().message(), HasSubstr(c.message));
  }
  // A stream that starts with a chunk, and one whose size differs from its header's.
  auto channel = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
  auto stub = pb::DeltaService::NewStub(channel);
  {
    grpc::ClientContext context;
    pb::PushDeltaResponse response;
    auto writer = stub->PushDelta(&context, &response);
    pb::PushDeltaRequest chunk;
    chunk.set_chunk(good);
    writer->Write(chunk);
    writer->WritesDone();
    const grpc::Status status = writer->Finish();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(status.error_message(), HasSubstr("header"));
  }
  {
    grpc::ClientContext context;
    pb::PushDeltaResponse response;
    auto writer = stub->PushDelta(&context, &response);
    pb::PushDeltaRequest header;
    header.mutable_header()->set_task("sentiment");
    header.mutable_header()->set_size_bytes(static_cast<int64_t>(good.size()) + 10);
    writer->Write(header);
    pb::PushDeltaRequest chunk;
    chunk.set_chunk(good);
    writer->Write(chunk);
    writer->WritesDone();
    const grpc::Status status = writer->Finish();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(status.error_message(), HasSubstr("announced"));
  }
  auto listed = client_->ListDeltas(pb::ListDeltasRequest());
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(listed->versions_size(), 0);
}

TEST_F(DeltaStoreServingTest, BadLabelAndDeleteRequestsGetClearStatuses) {
  ASSERT_TRUE(Push("sentiment", Pack(*model_, "v1", 1), {"prod"}).ok());
  auto set = [&](const std::string& label, int64_t version) {
    pb::SetLabelRequest r;
    r.set_task("sentiment");
    r.set_label(label);
    r.set_version(version);
    return client_->SetLabel(r).status();
  };
  EXPECT_EQ(set("latest", 1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(set("Prod!", 1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(set("canary", 7).code(), absl::StatusCode::kNotFound);
  pb::DeleteVersionRequest del;
  del.set_task("sentiment");
  del.set_version(1);
  const absl::Status labelled = client_->DeleteVersion(del);
  EXPECT_EQ(labelled.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(labelled.message(), HasSubstr("prod"));
  pb::DeleteLabelRequest unlabel;
  unlabel.set_task("sentiment");
  unlabel.set_label("nope");
  EXPECT_EQ(client_->DeleteLabel(unlabel).code(), absl::StatusCode::kNotFound);
  unlabel.set_label("prod");
  EXPECT_TRUE(client_->DeleteLabel(unlabel).ok());
  EXPECT_TRUE(client_->DeleteVersion(del).ok());
  EXPECT_EQ(EmbedWith("sentiment").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(client_->GetDelta("", "sentiment@1").status().code(), absl::StatusCode::kNotFound);
  std::string bytes;
  EXPECT_EQ(client_->PullDelta("", "sentiment@@1", &bytes).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(DeltaStoreServingTest, StoreSurvivesARestartEnforcesQuotasAndNeverServesCorruptBytes) {
  StartServer({"--tenant_store_versions=2"});
  ASSERT_TRUE(Push("a", Pack(*model_, "a", 1)).ok());
  auto b = Push("b", Pack(*model_, "b", 50));
  ASSERT_TRUE(b.ok());
  auto over = Push("c", Pack(*model_, "c", 90));
  EXPECT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(over.status().message(), HasSubstr("default"));
  auto before = EmbedWith("a");
  ASSERT_TRUE(before.ok());

  StartServer({"--tenant_store_versions=2"});  // the same store directory, a new process
  auto after = EmbedWith("a");
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_LE(MaxDiff(*before, *after), 1e-6);
  EXPECT_EQ(client_->ListDeltas(pb::ListDeltasRequest())->versions_size(), 2);

  // Flip a byte of b's blob on disk: pulling or serving it is DATA_LOSS, and `a` still serves.
  const std::string hex = b->version().digest().substr(7);
  const std::string path = store_dir_ + "/blobs/sha256/" + hex.substr(0, 2) + "/" + hex.substr(2);
  auto blob = ReadFileToString(path);
  ASSERT_TRUE(blob.ok()) << blob.status();
  std::string corrupt = *blob;
  corrupt[corrupt.size() / 2] ^= 1;
  ::chmod(path.c_str(), 0644);
  ASSERT_TRUE(WriteFileAtomically(path, corrupt).ok());
  std::string pulled;
  EXPECT_EQ(client_->PullDelta("", "b", &pulled).status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(EmbedWith("b").status().code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(EmbedWith("a").ok());
}

TEST_F(DeltaStoreServingTest, DeltactlPushesListsPullsLabelsAndRemoves) {
  const std::string dir = testing::MakeTempDir();
  const std::string file = dir + "/sentiment.dpack";
  std::ofstream(file, std::ios::binary) << Pack(*model_, "cli", 5);
  const std::string server = "--server=" + server_->address();
  auto run = [&](std::vector<std::string> args) {
    args.insert(args.begin(), {testing::DeltactlBinary(), server});
    return testing::RunCommand(args);
  };
  auto push = run({"push", file, "--task=sentiment", "--label=prod,canary", "--json"});
  ASSERT_EQ(push.exit_code, 0) << push.err;
  const nlohmann::json pushed = nlohmann::json::parse(push.out);
  EXPECT_EQ(pushed["version"]["version"], 1);
  EXPECT_EQ(pushed["created"], true);
  const std::string digest = pushed["version"]["digest"];

  auto text = run({"push", file, "--task=sentiment"});
  ASSERT_EQ(text.exit_code, 0) << text.err;
  EXPECT_THAT(text.out, HasSubstr("already stored as default/sentiment@1"));

  auto ls = run({"ls", "--json"});
  ASSERT_EQ(ls.exit_code, 0) << ls.err;
  const nlohmann::json listed = nlohmann::json::parse(ls.out);
  ASSERT_EQ(listed.size(), 1u);
  EXPECT_EQ(listed[0]["labels"], nlohmann::json({"canary", "latest", "prod"}));
  auto table = run({"ls"});
  EXPECT_THAT(table.out, HasSubstr("sentiment"));
  EXPECT_THAT(table.out, HasSubstr("canary,latest,prod"));

  const std::string out = dir + "/pulled.dpack";
  auto pull = run({"pull", "sentiment:prod", "--output=" + out});
  ASSERT_EQ(pull.exit_code, 0) << pull.err;
  EXPECT_EQ(*FileSha256Digest(out), digest);

  auto show = run({"show", digest, "--json"});
  ASSERT_EQ(show.exit_code, 0) << show.err;
  EXPECT_EQ(nlohmann::json::parse(show.out)["pack"]["name"], "cli");

  EXPECT_EQ(run({"rm", "sentiment:canary"}).exit_code, 0);
  auto refused = run({"rm", "sentiment@1"});
  EXPECT_EQ(refused.exit_code, 1);
  EXPECT_THAT(refused.err, HasSubstr("FAILED_PRECONDITION"));
  EXPECT_EQ(run({"rm", "sentiment:prod"}).exit_code, 0);
  EXPECT_EQ(run({"rm", "sentiment@1"}).exit_code, 0);
  EXPECT_EQ(run({"label", "sentiment", "prod"}).exit_code, 2);  // usage
  auto missing = run({"pull", "sentiment"});
  EXPECT_EQ(missing.exit_code, 1);
  EXPECT_THAT(missing.err, HasSubstr("NOT_FOUND"));
}

}  // namespace
}  // namespace deltaserve

// Integration: the Deltas API of a real deltaserve on a real store directory, over gRPC and through deltactl.
// Pushed packs serve at once; labels move what requests get; bad pushes and bad references get clear statuses
// and store nothing; the store survives a restart; corrupt bytes on disk are DATA_LOSS, never a wrong answer.
#include <sys/stat.h>
#include <unistd.h>

#include <signal.h>

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
#include "tests/server/test_packs.h"
#include "tests/store/local_registry.h"

namespace deltaserve {
namespace {

using ::deltaserve::testing::ServerProcess;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
namespace pb = ::deltaserve::v1;

using ::deltaserve::testing::LoraHeadPack;

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
  const std::string bytes = LoraHeadPack(*model_, "sentiment-v1", 1);
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
  ASSERT_TRUE(Push("sentiment", LoraHeadPack(*model_, "v1", 1), {"prod"}).ok());
  ASSERT_TRUE(Push("sentiment", LoraHeadPack(*model_, "v2", 100)).ok());
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
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(Push("paged", LoraHeadPack(*model_, "p", 10 + 10 * i)).ok());
  ASSERT_TRUE(Push("other", LoraHeadPack(*model_, "o", 99)).ok());
  ASSERT_TRUE(Push("theirs", LoraHeadPack(*model_, "t", 77), {}, "acme").ok());
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
  const std::string good = LoraHeadPack(*model_, "good", 1);
  struct Case {
    std::string task, bytes, expected_digest, message;
    absl::StatusCode code;
  };
  const std::vector<Case> cases = {
      {"sentiment", "definitely not a pack", "", "delta pack", absl::StatusCode::kInvalidArgument},
      {"sentiment", LoraHeadPack(*model_, "x", 1, "sha256:" + std::string(64, 'b')), "", "backbone",
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
  {
    grpc::ClientContext context;
    pb::PushDeltaResponse response;
    auto writer = stub->PushDelta(&context, &response);
    pb::PushDeltaRequest header;
    header.mutable_header()->set_task("sentiment");
    header.mutable_header()->set_size_bytes(-5);
    writer->Write(header);
    writer->WritesDone();
    const grpc::Status status = writer->Finish();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(status.error_message(), HasSubstr("size_bytes"));
  }
  auto listed = client_->ListDeltas(pb::ListDeltasRequest());
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(listed->versions_size(), 0);
}

TEST_F(DeltaStoreServingTest, BadLabelAndDeleteRequestsGetClearStatuses) {
  ASSERT_TRUE(Push("sentiment", LoraHeadPack(*model_, "v1", 1), {"prod"}).ok());
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

// The server collects the store's garbage on its own: a blob only a deleted version referenced goes, once older
// than the grace period; the blobs of live versions stay.
TEST_F(DeltaStoreServingTest, PeriodicGarbageCollectionRemovesBlobsOfDeletedVersionsOnly) {
  StartServer({"--store_gc_interval_s=0.5", "--store_gc_grace_s=0"});
  auto old_version = Push("gc", LoraHeadPack(*model_, "gc", 1));
  ASSERT_TRUE(old_version.ok()) << old_version.status();
  auto new_version = Push("gc", LoraHeadPack(*model_, "gc", 2));
  ASSERT_TRUE(new_version.ok()) << new_version.status();
  auto blob_path = [&](const std::string& digest) {
    const std::string hex = digest.substr(7);
    return store_dir_ + "/blobs/sha256/" + hex.substr(0, 2) + "/" + hex.substr(2);
  };
  const std::string old_blob = blob_path(old_version->version().digest());
  const std::string new_blob = blob_path(new_version->version().digest());
  ASSERT_EQ(::access(old_blob.c_str(), F_OK), 0);
  pb::DeleteVersionRequest remove;
  remove.set_task("gc");
  remove.set_version(old_version->version().version());
  ASSERT_TRUE(client_->DeleteVersion(remove).ok());

  const absl::Time end = absl::Now() + absl::Seconds(30);
  while (::access(old_blob.c_str(), F_OK) == 0 && absl::Now() < end) absl::SleepFor(absl::Milliseconds(50));
  EXPECT_NE(::access(old_blob.c_str(), F_OK), 0) << "the deleted version's blob was never collected";
  EXPECT_EQ(::access(new_blob.c_str(), F_OK), 0) << "a live version's blob was collected";
  EXPECT_TRUE(EmbedWith("gc").ok());
  EXPECT_THAT(testing::HttpGet(server_->metrics_port(), "/metrics"),
              ::testing::ContainsRegex("deltaserve_store_operations_total\\{code=\"OK\",op=\"gc\"\\} [1-9]"));
  EXPECT_THAT(server_->Log(), HasSubstr("store garbage collection removed 1 blobs"));
}

TEST_F(DeltaStoreServingTest, StoreSurvivesARestartEnforcesQuotasAndNeverServesCorruptBytes) {
  StartServer({"--tenant_store_versions=2"});
  ASSERT_TRUE(Push("a", LoraHeadPack(*model_, "a", 1)).ok());
  auto b = Push("b", LoraHeadPack(*model_, "b", 50));
  ASSERT_TRUE(b.ok());
  auto over = Push("c", LoraHeadPack(*model_, "c", 90));
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
  std::ofstream(file, std::ios::binary) << LoraHeadPack(*model_, "cli", 5);
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

// Two replicas on one OCI registry (each with its own local cache directory): what is pushed or labelled through
// one is served by the other at once; a stopped replica loses nothing.
TEST_F(DeltaStoreServingTest, ReplicasSharingARegistrySeeEachOthersPacksAndLabels) {
  if (store::LocalRegistry::FindBinary().empty()) GTEST_SKIP() << store::LocalRegistry::kSkipMessage;
  auto registry = store::LocalRegistry::Start();
  ASSERT_TRUE(registry.ok()) << registry.status();
  const std::string root = testing::MakeTempDir();
  auto start = [&](const std::string& name) {
    return ServerProcess::Start({"--model_dir=" + *model_dir_, "--store_dir=" + root + "/" + name,
                                 "--store_url=" + (*registry)->url(), "--max_pack_bytes=400000"});
  };
  auto one = start("one");
  auto two = start("two");
  ASSERT_TRUE(one.ok() && two.ok()) << one.status() << two.status();
  client::DeltaserveClient::Options o1, o2;
  o1.target = (*one)->address();
  o2.target = (*two)->address();
  client::DeltaserveClient c1(o1), c2(o2);
  auto embed = [](client::DeltaserveClient& c, const std::string& task) -> absl::StatusOr<std::vector<float>> {
    pb::EmbedRequest request;
    request.mutable_task()->set_task(task);
    request.add_texts("a movie I will remember");
    auto r = c.Embed(request);
    if (!r.ok()) return r.status();
    return Values(r->results(0).embedding());
  };
  pb::PushDeltaHeader header;
  header.set_task("shared");
  header.add_labels("prod");
  ASSERT_TRUE(c1.PushDelta(header, LoraHeadPack(*model_, "v1", 1)).ok());
  header.clear_labels();
  ASSERT_TRUE(c2.PushDelta(header, LoraHeadPack(*model_, "v2", 100)).ok());
  auto v1_on_two = embed(c2, "shared:prod");
  auto v1_on_one = embed(c1, "shared@1");
  auto v2_on_one = embed(c1, "shared");
  ASSERT_TRUE(v1_on_two.ok() && v1_on_one.ok() && v2_on_one.ok())
      << v1_on_two.status() << v1_on_one.status() << v2_on_one.status();
  EXPECT_LE(MaxDiff(*v1_on_two, *v1_on_one), 1e-6);
  EXPECT_GT(MaxDiff(*v1_on_one, *v2_on_one), 1e-4);

  pb::SetLabelRequest move;
  move.set_task("shared");
  move.set_label("prod");
  move.set_version(2);
  ASSERT_TRUE(c1.SetLabel(move).ok());
  auto moved = embed(c2, "shared:prod");  // no resolve TTL: the other replica sees the move at once
  ASSERT_TRUE(moved.ok()) << moved.status();
  EXPECT_LE(MaxDiff(*moved, *v2_on_one), 1e-6);

  (*one)->Stop(SIGKILL);
  auto listed = c2.ListDeltas(pb::ListDeltasRequest());
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_EQ(listed->versions_size(), 2);
}

}  // namespace
}  // namespace deltaserve

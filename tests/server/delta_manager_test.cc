// DeltaManager over a tiny BERT and an in-memory store (wrapped to inject failures): pushes are validated before
// anything is stored, references in every form resolve, failures leave nothing half-done, the loaded-pack cache
// keeps to its budget without freeing packs in use.
#include "server/deltas/delta_manager.h"

#include <sys/stat.h>

#include <fstream>

#include "delta_store/fault_store.h"
#include "delta_store/memory_store.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/common/sha256.h"
#include "tests/delta/delta_test_util.h"
#include "tests/server/server_process.h"

namespace deltaserve {
namespace deltas {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

delta::PackContents BitFitPack(const model::Model& m, const std::string& name, uint64_t seed) {
  delta::PackContents c;
  c.manifest.name = name;
  c.manifest.backbone_family = m.info().family;
  c.manifest.backbone_fingerprint = m.info().fingerprint;
  c.manifest.provenance = {{"description", "a test pack"}};
  delta::MethodSpec bitfit;
  bitfit.kind = delta::MethodKind::kBitFit;
  bitfit.config = {{"targets", {"encoder.layer.0.output.dense"}}};
  bitfit.tensors["encoder.layer.0.output.dense.bias"] = delta::testing::RandomTensor({32}, 0.1, seed);
  c.methods.push_back(bitfit);
  delta::HeadSpec head;
  head.config = {{"type", "classification"}, {"labels", {"no", "yes"}}};
  head.tensors["out.weight"] = delta::testing::RandomTensor({2, m.info().embedding_dim}, 1.0, seed + 1);
  head.tensors["out.bias"] = delta::testing::RandomTensor({2}, 0.1, seed + 2);
  c.head = head;
  return c;
}

std::string Bytes(const model::Model& m, const std::string& name, uint64_t seed) {
  auto bytes = delta::SerializePack(BitFitPack(m, name, seed));
  EXPECT_TRUE(bytes.ok()) << bytes.status();
  return *bytes;
}

class DeltaManagerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = delta::testing::TinyBert();
    ASSERT_NE(model_, nullptr);
    base_ = store::NewMemoryStore();
    faults_ = std::make_unique<store::FaultInjectingStore>(base_.get());
    manager_ = std::make_unique<DeltaManager>(faults_.get(), model_.get(), DeltaManager::Options());
  }

  PushResult PushOrDie(const std::string& tenant, const std::string& task, const std::string& bytes,
                       std::vector<std::string> labels = {}) {
    PushRequest request;
    request.tenant = tenant;
    request.task = task;
    request.labels = std::move(labels);
    auto r = manager_->Push(request, bytes);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : PushResult();
  }

  absl::StatusOr<std::shared_ptr<const delta::DeltaPack>> ResolveText(const std::string& tenant,
                                                                      const std::string& text) {
    inference::TaskSelector s;
    s.task = text;
    return manager_->Resolve(tenant, s);
  }

  std::shared_ptr<const model::Model> model_;
  std::unique_ptr<store::DeltaStore> base_;
  std::unique_ptr<store::FaultInjectingStore> faults_;
  std::unique_ptr<DeltaManager> manager_;
};

TEST_F(DeltaManagerTest, PushStoresTheCanonicalPackAsTheNextVersionAndSummarizesIt) {
  const PushResult first = PushOrDie("", "sentiment", Bytes(*model_, "one", 1), {"prod"});
  EXPECT_TRUE(first.created);
  EXPECT_EQ(first.version.tenant, "default");
  EXPECT_EQ(first.version.version, 1);
  EXPECT_THAT(first.version.labels, ElementsAre("latest", "prod"));
  EXPECT_EQ(first.pack.name, "one");
  EXPECT_THAT(first.pack.methods, ElementsAre("bitfit"));
  EXPECT_EQ(first.pack.head_kind, "classification");
  EXPECT_THAT(first.pack.head_labels, ElementsAre("no", "yes"));
  EXPECT_EQ(first.pack.description, "a test pack");
  // The stored bytes are the canonical ones: they hash to the version's digest.
  auto stored = store::ReadBlob(*base_, first.version.digest);
  ASSERT_TRUE(stored.ok());
  EXPECT_EQ(Sha256Digest(*stored), first.version.digest);

  const PushResult again = PushOrDie("", "sentiment", Bytes(*model_, "one", 1));
  EXPECT_FALSE(again.created);
  EXPECT_EQ(again.version.version, 1);
  const PushResult second = PushOrDie("", "sentiment", Bytes(*model_, "two", 2));
  EXPECT_TRUE(second.created);
  EXPECT_EQ(second.version.version, 2);
}

TEST_F(DeltaManagerTest, RejectsBadPushesAndStoresNothing) {
  struct Case {
    std::string tenant, task, bytes, expected_digest;
    std::vector<std::string> labels;
    absl::StatusCode code;
    std::string message;
  };
  delta::PackContents other = BitFitPack(*model_, "other", 9);
  other.manifest.backbone_fingerprint = "sha256:" + std::string(64, 'a');
  const std::string good = Bytes(*model_, "good", 3);
  const std::vector<Case> cases = {
      {"", "sentiment", "not a pack", "", {}, absl::StatusCode::kInvalidArgument, "delta pack"},
      {"", "sentiment", *delta::SerializePack(other), "", {}, absl::StatusCode::kFailedPrecondition, "backbone"},
      {"", "../etc", good, "", {}, absl::StatusCode::kInvalidArgument, "not a valid name"},
      {"Acme", "sentiment", good, "", {}, absl::StatusCode::kInvalidArgument, "not a valid name"},
      {"", "sentiment", good, "sha256:" + std::string(64, '0'), {}, absl::StatusCode::kDataLoss, "damaged"},
      {"", "sentiment", good, "md5:abc", {}, absl::StatusCode::kInvalidArgument, "expected digest"},
      {"", "sentiment", good, "", {"latest"}, absl::StatusCode::kInvalidArgument, "the server keeps that one"},
      {"", "sentiment", good, "", {"42"}, absl::StatusCode::kInvalidArgument, "not all digits"},
  };
  for (const Case& c : cases) {
    PushRequest request{c.tenant, c.task, c.expected_digest, c.labels};
    auto r = manager_->Push(request, c.bytes);
    EXPECT_EQ(r.status().code(), c.code) << c.message << ": " << r.status();
    EXPECT_THAT(r.status().message(), HasSubstr(c.message));
  }
  EXPECT_TRUE(base_->ListBlobs()->empty());
  EXPECT_TRUE(base_->List({})->versions.empty());
}

TEST_F(DeltaManagerTest, StoreFailuresSurfaceAndLeaveNoVersionBehind) {
  faults_->FailNext("AddVersion", absl::UnavailableError("disk on fire"));
  PushRequest request{"", "sentiment", "", {"prod"}};
  auto r = manager_->Push(request, Bytes(*model_, "one", 1));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(base_->List({})->versions.empty());
  // The retry succeeds and is version 1.
  auto retry = manager_->Push(request, Bytes(*model_, "one", 1));
  ASSERT_TRUE(retry.ok()) << retry.status();
  EXPECT_EQ(retry->version.version, 1);
}

TEST_F(DeltaManagerTest, ResolvesEveryReferenceForm) {
  const PushResult v1 = PushOrDie("acme", "sentiment", Bytes(*model_, "one", 1), {"prod"});
  const PushResult v2 = PushOrDie("acme", "sentiment", Bytes(*model_, "two", 2));
  struct Case {
    std::string tenant, text, want;
  };
  for (const Case& c : std::vector<Case>{{"acme", "sentiment", "two"},
                                        {"acme", "sentiment@1", "one"},
                                        {"acme", "sentiment:prod", "one"},
                                        {"acme", "sentiment:latest", "two"},
                                        {"", "acme/sentiment@1", "one"},
                                        {"acme", "acme/sentiment:prod", "one"},
                                        {"acme", v1.version.digest, "one"},
                                        {"acme", "sentiment@" + v2.version.digest, "two"}}) {
    auto pack = ResolveText(c.tenant, c.text);
    ASSERT_TRUE(pack.ok()) << c.text << ": " << pack.status();
    EXPECT_EQ((*pack)->manifest().name, c.want) << c.text;
  }
  inference::TaskSelector by_fields;
  by_fields.task = "sentiment";
  by_fields.label = "prod";
  EXPECT_EQ((*manager_->Resolve("acme", by_fields))->manifest().name, "one");
  by_fields.label.clear();
  by_fields.version = 2;
  EXPECT_EQ((*manager_->Resolve("acme", by_fields))->manifest().name, "two");
  // Another tenant cannot reach acme's packs, by name or by digest.
  EXPECT_EQ(ResolveText("globex", "sentiment").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(ResolveText("globex", v1.version.digest).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(ResolveText("globex", "acme/sentiment").status().code(), absl::StatusCode::kInvalidArgument);
  // A text reference with a separate selector is ambiguous.
  inference::TaskSelector mixed;
  mixed.task = "sentiment@1";
  mixed.label = "prod";
  EXPECT_EQ(manager_->Resolve("acme", mixed).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(DeltaManagerTest, MovingALabelChangesWhatNewResolutionsGet) {
  PushOrDie("", "sentiment", Bytes(*model_, "one", 1), {"prod"});
  PushOrDie("", "sentiment", Bytes(*model_, "two", 2));
  auto before = ResolveText("", "sentiment:prod");
  ASSERT_TRUE(before.ok());
  auto moved = manager_->SetLabel("", "sentiment", "prod", 2);
  ASSERT_TRUE(moved.ok()) << moved.status();
  EXPECT_THAT(moved->labels, ElementsAre("latest", "prod"));
  EXPECT_EQ((*ResolveText("", "sentiment:prod"))->manifest().name, "two");
  // The handle resolved before the move still holds the old pack.
  EXPECT_EQ((*before)->manifest().name, "one");
  EXPECT_EQ(manager_->DeleteVersion("", "sentiment", 2).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(manager_->DeleteLabel("", "sentiment", "prod").ok());
  EXPECT_TRUE(manager_->DeleteVersion("", "sentiment", 2).ok());
  EXPECT_EQ((*ResolveText("", "sentiment"))->manifest().name, "one");
}

TEST_F(DeltaManagerTest, KeepsLoadedPacksWithinTheCacheBudgetWithoutFreeingPacksInUse) {
  DeltaManager::Options options;
  options.cache_bytes = 1;  // every pack is over it: only the most recent stays cached
  DeltaManager small(faults_.get(), model_.get(), options);
  PushRequest a{"", "a", "", {}}, b{"", "b", "", {}};
  ASSERT_TRUE(small.Push(a, Bytes(*model_, "a", 1)).ok());
  ASSERT_TRUE(small.Push(b, Bytes(*model_, "b", 2)).ok());
  inference::TaskSelector sa, sb;
  sa.task = "a";
  sb.task = "b";
  auto held = small.Resolve("", sa);
  ASSERT_TRUE(held.ok());
  ASSERT_TRUE(small.Resolve("", sb).ok());
  EXPECT_EQ(small.num_packs(), 1);
  EXPECT_EQ((*held)->manifest().name, "a");  // evicted from the cache, still alive for its holder
  const int reads = faults_->Calls("OpenBlob");
  ASSERT_TRUE(small.Resolve("", sa).ok());  // a miss: loaded from the store again
  EXPECT_EQ(faults_->Calls("OpenBlob"), reads + 1);
}

TEST_F(DeltaManagerTest, CorruptStoredBytesAreDataLossNotAWrongPack) {
  const PushResult v1 = PushOrDie("", "sentiment", Bytes(*model_, "one", 1));
  DeltaManager fresh(faults_.get(), model_.get(), DeltaManager::Options());  // nothing cached
  faults_->CorruptReads(true);
  inference::TaskSelector s;
  s.task = "sentiment";
  auto r = fresh.Resolve("", s);
  EXPECT_FALSE(r.ok());
  EXPECT_TRUE(r.status().code() == absl::StatusCode::kDataLoss ||
              r.status().code() == absl::StatusCode::kInvalidArgument)
      << r.status();
  faults_->CorruptReads(false);
  EXPECT_TRUE(fresh.Resolve("", s).ok());
}

TEST_F(DeltaManagerTest, ImportsADirectoryPerTenantAndReportsWhatItSkips) {
  const std::string dir = testing::MakeTempDir();
  ::mkdir((dir + "/acme").c_str(), 0755);
  ::mkdir((dir + "/Bad Tenant").c_str(), 0755);
  std::ofstream(dir + "/sentiment.dpack", std::ios::binary) << Bytes(*model_, "sentiment", 1);
  std::ofstream(dir + "/acme/sentiment.dpack", std::ios::binary) << Bytes(*model_, "acme-sentiment", 2);
  std::ofstream(dir + "/Bad Tenant/x.dpack", std::ios::binary) << Bytes(*model_, "x", 3);
  std::ofstream(dir + "/UPPER.dpack", std::ios::binary) << Bytes(*model_, "upper", 4);
  std::ofstream(dir + "/garbage.dpack", std::ios::binary) << "garbage";
  std::ofstream(dir + "/notes.txt") << "not a pack: ignored";
  auto report = manager_->ImportDirectory(dir);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->imported, 2);
  ASSERT_EQ(report->failed.size(), 3u);
  EXPECT_EQ((*ResolveText("", "sentiment"))->manifest().name, "sentiment");
  EXPECT_EQ((*ResolveText("acme", "sentiment"))->manifest().name, "acme-sentiment");
  // Importing again adds no versions.
  ASSERT_TRUE(manager_->ImportDirectory(dir).ok());
  EXPECT_EQ(base_->List({})->versions.size(), 2u);
  EXPECT_EQ(manager_->ImportDirectory(dir + "/nope").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace deltas
}  // namespace deltaserve

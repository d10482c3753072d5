// DeltaManager over a tiny BERT and an in-memory store (wrapped to inject failures): pushes are validated before
// anything is stored, references in every form resolve, failures leave nothing half-done, the pack cache keeps to
// its budget without evicting packs in use, reloads evicted packs from host memory, loads a pack once however many
// requests miss on it, Prefetch warms packs, and a label moved under concurrent resolutions never fails one.
#include "server/deltas/delta_manager.h"

#include <sys/stat.h>

#include <atomic>
#include <fstream>
#include <thread>

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
  EXPECT_EQ(ResolveText("globex", "acme/sentiment").status().code(), absl::StatusCode::kPermissionDenied);
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
  // Budget: one pack in tier 1, no tier 2 (every reload reads the store).
  const int64_t pack_bytes = (*delta::DeltaPack::Load(Bytes(*model_, "a", 1), *model_, {}))->bytes();
  DeltaManager::Options options;
  options.cache_bytes = pack_bytes;
  options.host_cache_bytes = 0;
  DeltaManager small(faults_.get(), model_.get(), options);
  PushRequest a{"", "a", "", {}}, b{"", "b", "", {}}, c{"", "c", "", {}};
  ASSERT_TRUE(small.Push(a, Bytes(*model_, "a", 1)).ok());
  ASSERT_TRUE(small.Push(b, Bytes(*model_, "b", 2)).ok());  // no room: a push never evicts
  ASSERT_TRUE(small.Push(c, Bytes(*model_, "c", 3)).ok());
  EXPECT_EQ(small.num_packs(), 1);
  inference::TaskSelector sa, sb, sc;
  sa.task = "a";
  sb.task = "b";
  sc.task = "c";
  auto held = small.Resolve("", sa);  // a hit, held: pinned
  ASSERT_TRUE(held.ok());
  EXPECT_EQ(faults_->Calls("OpenBlob"), 0);
  ASSERT_TRUE(small.Resolve("", sb).ok());  // loaded; a is pinned, so tier 1 goes over budget for a while
  EXPECT_EQ(faults_->Calls("OpenBlob"), 1);
  EXPECT_EQ(small.num_packs(), 2);
  EXPECT_EQ(small.cache_stats().device_bytes, 2 * pack_bytes);
  ASSERT_TRUE(small.Resolve("", sc).ok());  // b (unpinned) makes room; a stays
  EXPECT_EQ(small.num_packs(), 2);
  ASSERT_TRUE(small.Resolve("", sa).ok());  // still a hit (c, unpinned, left)
  EXPECT_EQ(faults_->Calls("OpenBlob"), 2);
  held = absl::CancelledError("released");
  ASSERT_TRUE(small.Resolve("", sb).ok());  // a, unpinned now, makes room
  EXPECT_EQ(faults_->Calls("OpenBlob"), 3);
  EXPECT_EQ(small.num_packs(), 1);
  EXPECT_EQ(small.cache_stats().device_bytes, pack_bytes);
  EXPECT_EQ(small.cache_stats().evictions[0], 3);
}

TEST_F(DeltaManagerTest, AnEvictedPackReloadsFromTheHostTierWithoutReadingTheStore) {
  const int64_t pack_bytes = (*delta::DeltaPack::Load(Bytes(*model_, "a", 1), *model_, {}))->bytes();
  DeltaManager::Options options;
  options.cache_bytes = pack_bytes;
  DeltaManager small(faults_.get(), model_.get(), options);
  const PushResult a = PushOrDie("", "a", Bytes(*model_, "a", 1));
  PushOrDie("", "b", Bytes(*model_, "b", 2));
  inference::TaskSelector sa, sb;
  sa.task = "a";
  sb.task = "b";
  auto first = small.Resolve("", sa);
  ASSERT_TRUE(first.ok()) << first.status();
  const std::string name = (*first)->manifest().name;
  const std::vector<std::string> labels = (*first)->head()->labels();
  first = absl::CancelledError("released");
  ASSERT_TRUE(small.Resolve("", sb).ok());  // a goes to tier 2
  const int reads = faults_->Calls("OpenBlob");
  auto again = small.Resolve("", sa);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(faults_->Calls("OpenBlob"), reads);
  EXPECT_EQ((*again)->digest(), a.version.digest);
  EXPECT_EQ((*again)->manifest().name, name);
  EXPECT_EQ((*again)->head()->labels(), labels);
  EXPECT_EQ((*again)->bytes(), pack_bytes);
  const CacheStats stats = small.cache_stats();
  EXPECT_EQ(stats.lookups[static_cast<int>(CacheTier::kHost)], 1);
  EXPECT_EQ(stats.host_entries, 1);  // b now
}

TEST_F(DeltaManagerTest, ConcurrentMissesOnOnePackReadTheStoreOnce) {
  const PushResult v = PushOrDie("", "sentiment", Bytes(*model_, "one", 1));
  DeltaManager fresh(faults_.get(), model_.get(), DeltaManager::Options());  // nothing cached
  constexpr int kThreads = 12;
  std::vector<absl::StatusOr<std::shared_ptr<const delta::DeltaPack>>> got(kThreads, absl::UnknownError(""));
  std::vector<std::thread> threads;
  inference::TaskSelector s;
  s.task = "sentiment";
  for (int i = 0; i < kThreads; ++i) threads.emplace_back([&, i] { got[i] = fresh.Resolve("", s); });
  for (std::thread& t : threads) t.join();
  for (const auto& g : got) {
    ASSERT_TRUE(g.ok()) << g.status();
    EXPECT_EQ(g->get(), got[0]->get());
  }
  EXPECT_EQ(faults_->Calls("OpenBlob"), 1);
  const CacheStats stats = fresh.cache_stats();
  EXPECT_EQ(stats.loads_ok[static_cast<int>(CacheTier::kStore)], 1);
  EXPECT_EQ(stats.lookups[static_cast<int>(CacheTier::kDevice)] + stats.lookups[static_cast<int>(CacheTier::kStore)],
            kThreads);
}

TEST_F(DeltaManagerTest, AFailedLoadIsReportedAndRetriedNotCached) {
  PushOrDie("", "sentiment", Bytes(*model_, "one", 1));
  DeltaManager fresh(faults_.get(), model_.get(), DeltaManager::Options());
  faults_->FailNext("OpenBlob", absl::UnavailableError("disk on fire"));
  inference::TaskSelector s;
  s.task = "sentiment";
  EXPECT_EQ(fresh.Resolve("", s).status(), absl::UnavailableError("disk on fire"));
  EXPECT_EQ(fresh.num_packs(), 0);
  EXPECT_TRUE(fresh.Resolve("", s).ok());
  EXPECT_EQ(fresh.cache_stats().loads_failed[static_cast<int>(CacheTier::kStore)], 1);
}

TEST_F(DeltaManagerTest, PrefetchLoadsPacksAndSaysWhereTheyCameFrom) {
  const PushResult one = PushOrDie("acme", "sentiment", Bytes(*model_, "one", 1), {"prod"});
  PushOrDie("acme", "topic", Bytes(*model_, "topic", 2));
  DeltaManager fresh(faults_.get(), model_.get(), DeltaManager::Options());
  inference::TaskSelector prod, topic;
  prod.task = "sentiment";
  prod.label = "prod";
  topic.task = "acme/topic@1";
  auto r = fresh.Prefetch("acme", {prod, topic});
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->size(), 2u);
  EXPECT_EQ((*r)[0].version.digest, one.version.digest);
  EXPECT_EQ((*r)[0].version.task, "sentiment");
  EXPECT_EQ((*r)[0].source, CacheTier::kStore);
  EXPECT_GT((*r)[0].device_bytes, 0);
  EXPECT_GT((*r)[0].serialized_bytes, 0);
  EXPECT_TRUE((*r)[0].resident);
  EXPECT_EQ((*r)[1].version.task, "topic");
  EXPECT_EQ(fresh.num_packs(), 2);
  const int reads = faults_->Calls("OpenBlob");
  // Requests now hit; prefetching again says the packs were loaded already.
  ASSERT_TRUE(fresh.Resolve("acme", prod).ok());
  auto again = fresh.Prefetch("acme", {prod});
  ASSERT_TRUE(again.ok());
  EXPECT_EQ((*again)[0].source, CacheTier::kDevice);
  EXPECT_EQ((*again)[0].load_time, absl::ZeroDuration());
  EXPECT_EQ(faults_->Calls("OpenBlob"), reads);
}

TEST_F(DeltaManagerTest, PrefetchRejectsBadReferencesBeforeLoadingAnything) {
  PushOrDie("acme", "sentiment", Bytes(*model_, "one", 1));
  DeltaManager fresh(faults_.get(), model_.get(), DeltaManager::Options());
  inference::TaskSelector good, missing, malformed, other_tenant;
  good.task = "sentiment";
  missing.task = "nope";
  malformed.task = "sentiment@x";
  other_tenant.task = "globex/sentiment";
  EXPECT_EQ(fresh.Prefetch("acme", {}).status().code(), absl::StatusCode::kInvalidArgument);
  auto bad = fresh.Prefetch("acme", {good, malformed});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("task reference 2 of 2"));
  EXPECT_EQ(fresh.Prefetch("acme", {other_tenant}).status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(fresh.num_packs(), 0);
  EXPECT_EQ(fresh.Prefetch("acme", {missing}).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(fresh.Prefetch("globex", {good}).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(fresh.num_packs(), 0);
}

TEST_F(DeltaManagerTest, PrefetchBeyondTheBudgetReportsWhichPacksStayed) {
  const int64_t pack_bytes = (*delta::DeltaPack::Load(Bytes(*model_, "a", 1), *model_, {}))->bytes();
  DeltaManager::Options options;
  options.cache_bytes = 2 * pack_bytes;
  DeltaManager small(faults_.get(), model_.get(), options);
  std::vector<inference::TaskSelector> all;
  for (int i = 0; i < 3; ++i) {
    PushOrDie("", "t" + std::to_string(i), Bytes(*model_, "t", 10 + i));
    inference::TaskSelector s;
    s.task = "t" + std::to_string(i);
    all.push_back(s);
  }
  auto r = small.Prefetch("", all);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE((*r)[0].resident);
  EXPECT_TRUE((*r)[1].resident);
  EXPECT_TRUE((*r)[2].resident);
  EXPECT_EQ(small.num_packs(), 2);
}

TEST_F(DeltaManagerTest, RequestsResolvingWhileALabelMovesGetTheOldOrTheNewPackNeverAnError) {
  const PushResult one = PushOrDie("", "sentiment", Bytes(*model_, "one", 1), {"prod"});
  const PushResult two = PushOrDie("", "sentiment", Bytes(*model_, "two", 2));
  // A budget of one pack and no host tier: the swaps also evict and reload packs under the readers.
  const int64_t pack_bytes = (*delta::DeltaPack::Load(Bytes(*model_, "a", 1), *model_, {}))->bytes();
  DeltaManager::Options options;
  options.cache_bytes = pack_bytes;
  options.host_cache_bytes = 0;
  DeltaManager manager(faults_.get(), model_.get(), options);
  std::atomic<bool> stop{false};
  std::atomic<int> resolved{0}, errors{0}, wrong{0};
  std::vector<std::thread> readers;
  for (int t = 0; t < 6; ++t) {
    readers.emplace_back([&] {
      inference::TaskSelector prod;
      prod.task = "sentiment:prod";
      while (!stop) {
        auto pack = manager.Resolve("", prod);
        if (!pack.ok()) {
          ++errors;
        } else if ((*pack)->digest() != one.version.digest && (*pack)->digest() != two.version.digest) {
          ++wrong;
        } else {
          ++resolved;
        }
      }
    });
  }
  for (int move = 0; move < 40; ++move) {
    ASSERT_TRUE(manager.SetLabel("", "sentiment", "prod", move % 2 == 0 ? 2 : 1).ok());
    // Once the move returns, every new resolution sees it.
    inference::TaskSelector prod;
    prod.task = "sentiment:prod";
    auto now = manager.Resolve("", prod);
    ASSERT_TRUE(now.ok());
    EXPECT_EQ((*now)->digest(), move % 2 == 0 ? two.version.digest : one.version.digest);
    absl::SleepFor(absl::Milliseconds(2));
  }
  stop = true;
  for (std::thread& t : readers) t.join();
  EXPECT_EQ(errors, 0);
  EXPECT_EQ(wrong, 0);
  EXPECT_GT(resolved, 0);
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

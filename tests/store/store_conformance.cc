// The DeltaStore conformance suite (store_conformance.h).
#include "tests/store/store_conformance.h"

#include <stdlib.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <memory>
#include <optional>
#include <set>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "server/common/sha256.h"

namespace deltaserve {
namespace store {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Code = absl::StatusCode;

std::string StoreFactoryName(const ::testing::TestParamInfo<StoreFactory>& info) { return info.param.name; }

void StoreConformanceTest::SetUp() {
  std::string tmpl = ::testing::TempDir() + "store_conformance.XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl.data()), nullptr) << tmpl;
  root_ = tmpl;
  ASSERT_TRUE(GetParam().create) << "the StoreFactory has no create function";
  Recreate(StoreConfig());
}

void StoreConformanceTest::TearDown() {
  store_.reset();
  std::error_code ignored;
  if (!root_.empty()) std::filesystem::remove_all(root_, ignored);
}

void StoreConformanceTest::Recreate(const StoreConfig& config) {
  store_.reset();
  config_ = config;
  dir_ = absl::StrCat(root_, "/store", stores_++);
  ASSERT_EQ(::mkdir(dir_.c_str(), 0755), 0) << dir_;
  absl::StatusOr<std::unique_ptr<DeltaStore>> store = GetParam().create(dir_, config_);
  ASSERT_TRUE(store.ok()) << store.status();
  store_ = std::move(store).value();
}

void StoreConformanceTest::Reopen() {
  ASSERT_TRUE(can_reopen());
  store_.reset();
  absl::StatusOr<std::unique_ptr<DeltaStore>> store = GetParam().reopen(dir_, config_);
  ASSERT_TRUE(store.ok()) << store.status();
  store_ = std::move(store).value();
}

VersionInfo StoreConformanceTest::Push(const std::string& tenant, const std::string& task, const std::string& data) {
  absl::StatusOr<VersionInfo> info = PushPack(*store_, tenant, task, data);
  EXPECT_TRUE(info.ok()) << tenant << "/" << task << ": " << info.status();
  return info.ok() ? *info : VersionInfo();
}

namespace {

// Deterministic bytes of a given size.
std::string Bytes(size_t size, int seed) {
  std::string data(size, '\0');
  uint32_t x = 2654435761u * (seed + 1);
  for (char& c : data) {
    x = x * 1664525u + 1013904223u;
    c = static_cast<char>(x >> 24);
  }
  return data;
}

// Every version the store lists, across pages.
std::vector<VersionInfo> ListAll(DeltaStore& store, ListOptions options) {
  std::vector<VersionInfo> all;
  for (int pages = 0; pages < 1000; ++pages) {
    absl::StatusOr<ListPage> page = store.List(options);
    EXPECT_TRUE(page.ok()) << page.status();
    if (!page.ok()) break;
    all.insert(all.end(), page->versions.begin(), page->versions.end());
    if (page->next_page_token.empty()) break;
    options.page_token = page->next_page_token;
  }
  return all;
}

std::string Key(const VersionInfo& v) { return absl::StrCat(v.tenant, "/", v.task, "@", v.version); }

}  // namespace

// --- Blobs ---

TEST_P(StoreConformanceTest, StreamsMultiChunkBlobRoundTrip) {
  const std::string data = Bytes(300000, 1);
  absl::StatusOr<std::unique_ptr<BlobWriter>> writer = store().NewBlobWriter(Sha256Digest(data));
  ASSERT_TRUE(writer.ok()) << writer.status();
  for (size_t offset = 0; offset < data.size(); offset += 70001) {
    DS_ASSERT_OK((*writer)->Append(absl::string_view(data).substr(offset, 70001)));
  }
  absl::StatusOr<BlobInfo> info = (*writer)->Commit();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->digest, Sha256Digest(data));
  EXPECT_EQ(info->size, static_cast<int64_t>(data.size()));

  absl::StatusOr<std::unique_ptr<BlobReader>> reader = store().OpenBlob(info->digest);
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_EQ((*reader)->size(), static_cast<int64_t>(data.size()));
  std::string read;
  char buffer[4099];
  while (true) {
    absl::StatusOr<size_t> n = (*reader)->Read(buffer, sizeof(buffer));
    ASSERT_TRUE(n.ok()) << n.status();
    if (*n == 0) break;
    read.append(buffer, *n);
  }
  EXPECT_TRUE(read == data) << "read " << read.size() << " bytes, wrote " << data.size();
  absl::StatusOr<size_t> after_end = (*reader)->Read(buffer, sizeof(buffer));
  ASSERT_TRUE(after_end.ok()) << after_end.status();
  EXPECT_EQ(*after_end, 0u);
}

TEST_P(StoreConformanceTest, StoresEmptyBlob) {
  absl::StatusOr<BlobInfo> info = PutBlob(store(), "");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->digest, Sha256Digest(""));
  EXPECT_EQ(info->size, 0);
  absl::StatusOr<std::string> read = ReadBlob(store(), info->digest);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(*read, "");
}

TEST_P(StoreConformanceTest, SameBytesTwiceStoreOneBlob) {
  absl::StatusOr<BlobInfo> first = PutBlob(store(), "pack bytes");
  absl::StatusOr<BlobInfo> second = PutBlob(store(), "pack bytes", Sha256Digest("pack bytes"));
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(first->digest, second->digest);
  absl::StatusOr<std::vector<BlobInfo>> blobs = store().ListBlobs();
  ASSERT_TRUE(blobs.ok()) << blobs.status();
  ASSERT_EQ(blobs->size(), 1u);
  EXPECT_EQ((*blobs)[0].digest, first->digest);
}

TEST_P(StoreConformanceTest, RejectsBlobWhoseDigestDiffersFromExpected) {
  absl::StatusOr<BlobInfo> info = PutBlob(store(), "actual bytes", Sha256Digest("other bytes"));
  DS_EXPECT_CODE(info, Code::kDataLoss);
  DS_EXPECT_CODE(store().StatBlob(Sha256Digest("actual bytes")), Code::kNotFound);
  DS_EXPECT_CODE(store().StatBlob(Sha256Digest("other bytes")), Code::kNotFound);
  absl::StatusOr<std::vector<BlobInfo>> blobs = store().ListBlobs();
  ASSERT_TRUE(blobs.ok()) << blobs.status();
  EXPECT_TRUE(blobs->empty());
}

TEST_P(StoreConformanceTest, RejectsMalformedDigests) {
  const std::string hex(64, 'a');
  const std::vector<std::string> malformed = {
      "sha256:", "sha256:" + std::string(64, 'A'), "md5:" + hex, "sha256:" + hex.substr(1), "sha256:" + hex + "a",
      "sha256:../../../etc/passwd", "sha256:" + hex.substr(3) + "/..", hex, "../x"};
  for (const std::string& bad : malformed) {
    SCOPED_TRACE(bad);
    DS_EXPECT_CODE(store().NewBlobWriter(bad), Code::kInvalidArgument);
    DS_EXPECT_CODE(store().OpenBlob(bad), Code::kInvalidArgument);
    DS_EXPECT_CODE(store().StatBlob(bad), Code::kInvalidArgument);
    DS_EXPECT_CODE(store().DeleteBlob(bad), Code::kInvalidArgument);
    DS_EXPECT_CODE(store().AddVersion("acme", "summarize", bad), Code::kInvalidArgument);
    Ref ref;
    ref.digest = bad;
    DS_EXPECT_CODE(store().Resolve(ref), Code::kInvalidArgument);
  }
  DS_EXPECT_CODE(store().OpenBlob(""), Code::kInvalidArgument);
}

TEST_P(StoreConformanceTest, StatsAndListsBlobsByDigest) {
  std::vector<std::string> digests;
  for (int i = 0; i < 3; ++i) {
    absl::StatusOr<BlobInfo> info = PutBlob(store(), Bytes(100 + i, i));
    ASSERT_TRUE(info.ok()) << info.status();
    digests.push_back(info->digest);
  }
  absl::StatusOr<BlobInfo> stat = store().StatBlob(digests[1]);
  ASSERT_TRUE(stat.ok()) << stat.status();
  EXPECT_EQ(stat->digest, digests[1]);
  EXPECT_EQ(stat->size, 101);
  EXPECT_LE(stat->created, absl::Now() + absl::Seconds(5));

  absl::StatusOr<std::vector<BlobInfo>> blobs = store().ListBlobs();
  ASSERT_TRUE(blobs.ok()) << blobs.status();
  std::sort(digests.begin(), digests.end());
  ASSERT_EQ(blobs->size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ((*blobs)[i].digest, digests[i]);

  const std::string missing = Sha256Digest("never stored");
  DS_EXPECT_CODE(store().StatBlob(missing), Code::kNotFound);
  DS_EXPECT_CODE(store().OpenBlob(missing), Code::kNotFound);
  DS_EXPECT_CODE(store().DeleteBlob(missing), Code::kNotFound);
}

TEST_P(StoreConformanceTest, AppendAfterCommitFails) {
  absl::StatusOr<std::unique_ptr<BlobWriter>> writer = store().NewBlobWriter("");
  ASSERT_TRUE(writer.ok()) << writer.status();
  DS_ASSERT_OK((*writer)->Append("abc"));
  DS_ASSERT_OK((*writer)->Commit());
  DS_EXPECT_CODE((*writer)->Append("more"), Code::kFailedPrecondition);
}

TEST_P(StoreConformanceTest, UncommittedWriterLeavesNothingVisible) {
  {
    absl::StatusOr<std::unique_ptr<BlobWriter>> writer = store().NewBlobWriter("");
    ASSERT_TRUE(writer.ok()) << writer.status();
    DS_ASSERT_OK((*writer)->Append("abandoned upload"));
  }
  DS_EXPECT_CODE(store().StatBlob(Sha256Digest("abandoned upload")), Code::kNotFound);
  absl::StatusOr<std::vector<BlobInfo>> blobs = store().ListBlobs();
  ASSERT_TRUE(blobs.ok()) << blobs.status();
  EXPECT_TRUE(blobs->empty());
}

TEST_P(StoreConformanceTest, RejectsBlobLargerThanMaxBlobBytes) {
  StoreConfig config;
  config.max_blob_bytes = 1000;
  Recreate(config);
  absl::StatusOr<std::unique_ptr<BlobWriter>> writer = store().NewBlobWriter("");
  ASSERT_TRUE(writer.ok()) << writer.status();
  DS_ASSERT_OK((*writer)->Append(Bytes(600, 1)));
  DS_EXPECT_CODE((*writer)->Append(Bytes(600, 2)), Code::kResourceExhausted);
  writer->reset();
  absl::StatusOr<std::vector<BlobInfo>> blobs = store().ListBlobs();
  ASSERT_TRUE(blobs.ok()) << blobs.status();
  EXPECT_TRUE(blobs->empty());
  DS_EXPECT_OK(PutBlob(store(), Bytes(1000, 3)));  // exactly the limit is fine
}

TEST_P(StoreConformanceTest, DeletesBlobOnlyWhenUnreferenced) {
  VersionInfo v = Push("acme", "summarize", "pack");
  absl::Status referenced = store().DeleteBlob(v.digest);
  EXPECT_EQ(referenced.code(), Code::kFailedPrecondition) << referenced;
  DS_EXPECT_OK(ReadBlob(store(), v.digest));

  DS_ASSERT_OK(store().DeleteVersion("acme", "summarize", v.version));
  DS_EXPECT_OK(store().DeleteBlob(v.digest));
  DS_EXPECT_CODE(store().StatBlob(v.digest), Code::kNotFound);
  DS_EXPECT_CODE(store().DeleteBlob(v.digest), Code::kNotFound);
}

// --- Versions and labels ---

TEST_P(StoreConformanceTest, NumbersVersionsAndKeepsLatestOnTheHighest) {
  VersionInfo v1 = Push("acme", "summarize", "one");
  VersionInfo v2 = Push("acme", "summarize", "two");
  VersionInfo v3 = Push("acme", "summarize", "three");
  EXPECT_EQ(v1.version, 1);
  EXPECT_EQ(v2.version, 2);
  EXPECT_EQ(v3.version, 3);
  EXPECT_EQ(v3.tenant, "acme");
  EXPECT_EQ(v3.task, "summarize");
  EXPECT_EQ(v3.digest, Sha256Digest("three"));
  EXPECT_EQ(v3.size, 5);
  EXPECT_THAT(v3.labels, ElementsAre("latest"));

  absl::StatusOr<VersionInfo> latest = store().Resolve(Ref{"acme", "summarize", 0, "", ""});
  ASSERT_TRUE(latest.ok()) << latest.status();
  EXPECT_EQ(latest->version, 3);
  EXPECT_THAT(latest->labels, ElementsAre("latest"));
  absl::StatusOr<VersionInfo> named = store().Resolve(Ref{"acme", "summarize", 0, "latest", ""});
  ASSERT_TRUE(named.ok()) << named.status();
  EXPECT_EQ(named->version, 3);
  absl::StatusOr<VersionInfo> first = store().Resolve(Ref{"acme", "summarize", 1, "", ""});
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(first->digest, Sha256Digest("one"));
  EXPECT_TRUE(first->labels.empty());
}

TEST_P(StoreConformanceTest, AddingTheSameDigestAgainReturnsTheExistingVersion) {
  VersionInfo v1 = Push("acme", "summarize", "one");
  Push("acme", "summarize", "two");
  VersionInfo again = Push("acme", "summarize", "one");
  EXPECT_EQ(again.version, 1);
  EXPECT_EQ(again.digest, v1.digest);
  EXPECT_EQ(again.created, v1.created);
  absl::StatusOr<VersionInfo> latest = store().Resolve(Ref{"acme", "summarize", 0, "", ""});
  ASSERT_TRUE(latest.ok()) << latest.status();
  EXPECT_EQ(latest->version, 2);
  absl::StatusOr<TenantUsage> usage = store().Usage("acme");
  ASSERT_TRUE(usage.ok()) << usage.status();
  EXPECT_EQ(usage->versions, 2);
  // Another task may point at the same blob.
  EXPECT_EQ(Push("acme", "translate", "one").version, 1);
}

TEST_P(StoreConformanceTest, AddVersionNeedsAnExistingBlob) {
  DS_EXPECT_CODE(store().AddVersion("acme", "summarize", Sha256Digest("not stored")), Code::kNotFound);
  DS_EXPECT_CODE(store().Resolve(Ref{"acme", "summarize", 0, "", ""}), Code::kNotFound);
}

TEST_P(StoreConformanceTest, SetsMovesAndDeletesLabels) {
  Push("acme", "summarize", "one");
  Push("acme", "summarize", "two");
  DS_ASSERT_OK(store().SetLabel("acme", "summarize", "prod", 1));
  DS_ASSERT_OK(store().SetLabel("acme", "summarize", "canary", 2));
  absl::StatusOr<VersionInfo> prod = store().Resolve(Ref{"acme", "summarize", 0, "prod", ""});
  ASSERT_TRUE(prod.ok()) << prod.status();
  EXPECT_EQ(prod->version, 1);
  EXPECT_THAT(prod->labels, ElementsAre("prod"));

  DS_ASSERT_OK(store().SetLabel("acme", "summarize", "prod", 2));  // move
  prod = store().Resolve(Ref{"acme", "summarize", 0, "prod", ""});
  ASSERT_TRUE(prod.ok()) << prod.status();
  EXPECT_EQ(prod->version, 2);
  EXPECT_THAT(prod->labels, ElementsAre("canary", "latest", "prod"));

  DS_ASSERT_OK(store().DeleteLabel("acme", "summarize", "prod"));
  DS_EXPECT_CODE(store().Resolve(Ref{"acme", "summarize", 0, "prod", ""}), Code::kNotFound);
  DS_EXPECT_CODE(store().DeleteLabel("acme", "summarize", "prod"), Code::kNotFound);
  DS_EXPECT_CODE(store().SetLabel("acme", "summarize", "prod", 9), Code::kNotFound);
  DS_EXPECT_CODE(store().SetLabel("acme", "missing", "prod", 1), Code::kNotFound);
  DS_EXPECT_CODE(store().SetLabel("acme", "summarize", "prod", 0), Code::kInvalidArgument);
}

TEST_P(StoreConformanceTest, RejectsLatestAndNumericLabels) {
  Push("acme", "summarize", "one");
  DS_EXPECT_CODE(store().SetLabel("acme", "summarize", "latest", 1), Code::kInvalidArgument);
  DS_EXPECT_CODE(store().DeleteLabel("acme", "summarize", "latest"), Code::kInvalidArgument);
  DS_EXPECT_CODE(store().SetLabel("acme", "summarize", "123", 1), Code::kInvalidArgument);
  DS_EXPECT_CODE(store().SetLabel("acme", "summarize", "Prod", 1), Code::kInvalidArgument);
  DS_EXPECT_OK(store().SetLabel("acme", "summarize", "v1.2-rc_3", 1));
}

TEST_P(StoreConformanceTest, RefusesToDeleteAVersionALabelNames) {
  Push("acme", "summarize", "one");
  Push("acme", "summarize", "two");
  DS_ASSERT_OK(store().SetLabel("acme", "summarize", "prod", 1));
  DS_ASSERT_OK(store().SetLabel("acme", "summarize", "canary", 1));
  absl::Status status = store().DeleteVersion("acme", "summarize", 1);
  EXPECT_EQ(status.code(), Code::kFailedPrecondition) << status;
  EXPECT_THAT(status.message(), HasSubstr("prod"));
  EXPECT_THAT(status.message(), HasSubstr("canary"));
  DS_EXPECT_OK(store().Resolve(Ref{"acme", "summarize", 1, "", ""}));

  DS_ASSERT_OK(store().DeleteLabel("acme", "summarize", "prod"));
  DS_ASSERT_OK(store().DeleteLabel("acme", "summarize", "canary"));
  DS_EXPECT_OK(store().DeleteVersion("acme", "summarize", 1));
}

TEST_P(StoreConformanceTest, LatestMovesDownOnDeleteAndNumbersAreNeverReused) {
  Push("acme", "summarize", "one");
  Push("acme", "summarize", "two");
  Push("acme", "summarize", "three");
  DS_ASSERT_OK(store().DeleteVersion("acme", "summarize", 3));
  absl::StatusOr<VersionInfo> latest = store().Resolve(Ref{"acme", "summarize", 0, "", ""});
  ASSERT_TRUE(latest.ok()) << latest.status();
  EXPECT_EQ(latest->version, 2);
  EXPECT_THAT(latest->labels, ElementsAre("latest"));
  DS_EXPECT_CODE(store().DeleteVersion("acme", "summarize", 3), Code::kNotFound);
  DS_EXPECT_CODE(store().DeleteVersion("acme", "summarize", 0), Code::kInvalidArgument);
  DS_EXPECT_CODE(store().DeleteVersion("acme", "missing", 1), Code::kNotFound);

  EXPECT_EQ(Push("acme", "summarize", "four").version, 4);
  EXPECT_EQ(Push("acme", "summarize", "three").version, 5);  // the same bytes again: a new number

  for (int64_t v : {1, 2, 4, 5}) DS_ASSERT_OK(store().DeleteVersion("acme", "summarize", v));
  DS_EXPECT_CODE(store().Resolve(Ref{"acme", "summarize", 0, "", ""}), Code::kNotFound);
  EXPECT_TRUE(ListAll(store(), ListOptions()).empty());
  EXPECT_EQ(Push("acme", "summarize", "one").version, 6);
}

TEST_P(StoreConformanceTest, ResolvesByVersionLabelAndDigest) {
  VersionInfo v1 = Push("acme", "summarize", "one");
  VersionInfo v2 = Push("acme", "summarize", "two");
  Push("acme", "translate", "three");
  absl::StatusOr<BlobInfo> loose = PutBlob(store(), "unreferenced");
  ASSERT_TRUE(loose.ok()) << loose.status();

  // A digest alone names a blob.
  Ref by_digest;
  by_digest.digest = loose->digest;
  absl::StatusOr<VersionInfo> blob = store().Resolve(by_digest);
  ASSERT_TRUE(blob.ok()) << blob.status();
  EXPECT_EQ(blob->tenant, "");
  EXPECT_EQ(blob->task, "");
  EXPECT_EQ(blob->version, 0);
  EXPECT_EQ(blob->digest, loose->digest);
  EXPECT_EQ(blob->size, 12);
  by_digest.digest = Sha256Digest("missing");
  DS_EXPECT_CODE(store().Resolve(by_digest), Code::kNotFound);

  // With a tenant and task, the digest must be one of the task's versions.
  absl::StatusOr<VersionInfo> pinned = store().Resolve(Ref{"acme", "summarize", 0, "", v1.digest});
  ASSERT_TRUE(pinned.ok()) << pinned.status();
  EXPECT_EQ(pinned->version, 1);
  absl::Status other_task = store().Resolve(Ref{"acme", "translate", 0, "", v2.digest}).status();
  EXPECT_EQ(other_task.code(), Code::kNotFound) << other_task;
  DS_EXPECT_CODE(store().Resolve(Ref{"acme", "summarize", 0, "", loose->digest}), Code::kNotFound);
  absl::StatusOr<VersionInfo> tenant_only = store().Resolve(Ref{"acme", "", 0, "", v2.digest});
  ASSERT_TRUE(tenant_only.ok()) << tenant_only.status();
  EXPECT_EQ(tenant_only->task, "summarize");
  EXPECT_EQ(tenant_only->version, 2);
  DS_EXPECT_CODE(store().Resolve(Ref{"other", "", 0, "", v2.digest}), Code::kNotFound);

  // NOT_FOUND names what is missing.
  absl::Status no_task = store().Resolve(Ref{"acme", "missing", 0, "", ""}).status();
  EXPECT_EQ(no_task.code(), Code::kNotFound) << no_task;
  EXPECT_THAT(no_task.message(), HasSubstr("acme/missing"));
  absl::Status no_version = store().Resolve(Ref{"acme", "summarize", 9, "", ""}).status();
  EXPECT_EQ(no_version.code(), Code::kNotFound) << no_version;
  EXPECT_THAT(no_version.message(), HasSubstr("9"));
  absl::Status no_label = store().Resolve(Ref{"acme", "summarize", 0, "nope", ""}).status();
  EXPECT_EQ(no_label.code(), Code::kNotFound) << no_label;
  EXPECT_THAT(no_label.message(), HasSubstr("nope"));

  // Several selectors at once, or none of tenant/task/digest, are not references.
  DS_EXPECT_CODE(store().Resolve(Ref{"acme", "summarize", 1, "prod", ""}), Code::kInvalidArgument);
  DS_EXPECT_CODE(store().Resolve(Ref{"acme", "summarize", 1, "", v1.digest}), Code::kInvalidArgument);
  DS_EXPECT_CODE(store().Resolve(Ref()), Code::kInvalidArgument);
  DS_EXPECT_CODE(store().Resolve(Ref{"acme", "", 0, "", ""}), Code::kInvalidArgument);
  DS_EXPECT_CODE(store().Resolve(Ref{"", "summarize", 0, "", ""}), Code::kInvalidArgument);
  DS_EXPECT_CODE(store().Resolve(Ref{"acme", "summarize", -1, "", ""}), Code::kInvalidArgument);
}

TEST_P(StoreConformanceTest, ListsVersionsInOrderAcrossPages) {
  // Pushed out of order; listed by (tenant, task, version).
  Push("beta", "x", "b-x-1");
  Push("acme", "y", "a-y-1");
  Push("acme", "x", "a-x-1");
  Push("acme", "x", "a-x-2");
  Push("acme", "y", "a-y-2");
  Push("beta", "x", "b-x-2");
  Push("acme", "x", "a-x-3");
  const std::vector<std::string> expected = {"acme/x@1", "acme/x@2", "acme/x@3", "acme/y@1",
                                             "acme/y@2", "beta/x@1", "beta/x@2"};

  ListOptions options;
  options.page_size = 3;
  std::vector<std::string> keys;
  int pages = 0;
  while (true) {
    absl::StatusOr<ListPage> page = store().List(options);
    ASSERT_TRUE(page.ok()) << page.status();
    ++pages;
    EXPECT_LE(page->versions.size(), 3u);
    for (const VersionInfo& v : page->versions) keys.push_back(Key(v));
    if (page->next_page_token.empty()) break;
    options.page_token = page->next_page_token;
    ASSERT_LT(pages, 10);
  }
  EXPECT_EQ(keys, expected);
  EXPECT_EQ(pages, 3);

  absl::StatusOr<ListPage> all = store().List(ListOptions());  // default page size
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->versions.size(), 7u);
  EXPECT_EQ(all->next_page_token, "");
  EXPECT_THAT(all->versions[2].labels, ElementsAre("latest"));

  ListOptions acme;
  acme.tenant = "acme";
  acme.page_size = 2;
  keys.clear();
  for (const VersionInfo& v : ListAll(store(), acme)) keys.push_back(Key(v));
  EXPECT_EQ(keys, std::vector<std::string>(expected.begin(), expected.begin() + 5));

  ListOptions acme_y;
  acme_y.tenant = "acme";
  acme_y.task = "y";
  acme_y.page_size = 1;
  keys.clear();
  for (const VersionInfo& v : ListAll(store(), acme_y)) keys.push_back(Key(v));
  EXPECT_EQ(keys, (std::vector<std::string>{"acme/y@1", "acme/y@2"}));

  ListOptions bad;
  bad.task = "x";  // a task without its tenant
  DS_EXPECT_CODE(store().List(bad), Code::kInvalidArgument);
  bad = ListOptions();
  bad.page_token = "not a token!";
  DS_EXPECT_CODE(store().List(bad), Code::kInvalidArgument);
  bad.page_token = "AAAA";
  DS_EXPECT_CODE(store().List(bad), Code::kInvalidArgument);
  bad = ListOptions();
  bad.page_size = 1001;
  DS_EXPECT_CODE(store().List(bad), Code::kInvalidArgument);
  bad.page_size = -1;
  DS_EXPECT_CODE(store().List(bad), Code::kInvalidArgument);
  bad = ListOptions();
  bad.page_size = 1000;
  DS_EXPECT_OK(store().List(bad));
}

// --- Quotas ---

TEST_P(StoreConformanceTest, EnforcesByteQuotaCountingDistinctBlobs) {
  StoreConfig config;
  config.quotas.per_tenant["small"].max_bytes = 100;
  Recreate(config);
  const std::string sixty = Bytes(60, 1);
  Push("small", "a", sixty);
  absl::StatusOr<VersionInfo> over = PushPack(store(), "small", "a", Bytes(50, 2));
  ASSERT_EQ(over.status().code(), Code::kResourceExhausted) << over.status();
  EXPECT_THAT(over.status().message(), HasSubstr("small"));
  EXPECT_THAT(over.status().message(), HasSubstr("100"));
  EXPECT_THAT(over.status().message(), HasSubstr("60"));

  // Nothing changed.
  absl::StatusOr<TenantUsage> usage = store().Usage("small");
  ASSERT_TRUE(usage.ok()) << usage.status();
  EXPECT_EQ(usage->bytes, 60);
  EXPECT_EQ(usage->versions, 1);
  DS_EXPECT_CODE(store().Resolve(Ref{"small", "a", 2, "", ""}), Code::kNotFound);

  // A blob the tenant already references costs nothing more; other tenants are not limited.
  EXPECT_EQ(Push("small", "b", sixty).version, 1);
  usage = store().Usage("small");
  ASSERT_TRUE(usage.ok()) << usage.status();
  EXPECT_EQ(usage->bytes, 60);
  EXPECT_EQ(usage->versions, 2);
  DS_EXPECT_OK(PushPack(store(), "big", "a", Bytes(500, 3)));
  DS_EXPECT_OK(PushPack(store(), "small", "a", Bytes(40, 4)));  // exactly the limit
}

TEST_P(StoreConformanceTest, EnforcesVersionQuota) {
  StoreConfig config;
  config.quotas.default_quota.max_versions = 2;
  Recreate(config);
  Push("acme", "a", "one");
  Push("acme", "b", "two");
  absl::StatusOr<VersionInfo> over = PushPack(store(), "acme", "a", "three");
  ASSERT_EQ(over.status().code(), Code::kResourceExhausted) << over.status();
  EXPECT_THAT(over.status().message(), HasSubstr("acme"));
  EXPECT_THAT(over.status().message(), HasSubstr("2"));
  absl::StatusOr<TenantUsage> usage = store().Usage("acme");
  ASSERT_TRUE(usage.ok()) << usage.status();
  EXPECT_EQ(usage->versions, 2);
  EXPECT_EQ(Push("acme", "a", "one").version, 1);  // idempotent re-push is not a new version

  DS_ASSERT_OK(store().DeleteVersion("acme", "b", 1));
  EXPECT_EQ(Push("acme", "a", "three").version, 2);
}

TEST_P(StoreConformanceTest, QuotaLookupOverridesTheDefaultPerTenant) {
  StoreConfig config;
  config.quotas.default_quota.max_versions = 5;
  config.quotas.per_tenant["other"].max_versions = 4;
  config.quotas.lookup = [](const std::string& tenant) -> std::optional<Quota> {
    if (tenant == "acme") return Quota{0, 1};   // a tighter version limit than the default
    if (tenant == "small") return Quota{10, 0};  // bytes only: versions stay the default's
    return std::nullopt;
  };
  Recreate(config);
  Push("acme", "a", "one");
  absl::StatusOr<VersionInfo> over = PushPack(store(), "acme", "b", "two");
  ASSERT_EQ(over.status().code(), Code::kResourceExhausted) << over.status();
  EXPECT_THAT(over.status().message(), HasSubstr("\"acme\""));
  EXPECT_THAT(over.status().message(), HasSubstr("limit: 1"));

  Push("small", "a", "12345678");
  over = PushPack(store(), "small", "a", "123");
  ASSERT_EQ(over.status().code(), Code::kResourceExhausted) << over.status();
  EXPECT_THAT(over.status().message(), HasSubstr("limit: 10"));
  Push("small", "a", "12");  // exactly the limit

  // Tenants the lookup has no answer for keep the static settings.
  for (int i = 0; i < 4; ++i) Push("other", "a", absl::StrCat("pack ", i));
  over = PushPack(store(), "other", "a", "pack 4");
  ASSERT_EQ(over.status().code(), Code::kResourceExhausted) << over.status();
  EXPECT_THAT(over.status().message(), HasSubstr("limit: 4"));
  for (int i = 0; i < 5; ++i) Push("nobody", "a", absl::StrCat("pack ", i));
  DS_EXPECT_CODE(PushPack(store(), "nobody", "a", "pack 5"), Code::kResourceExhausted);
}

TEST_P(StoreConformanceTest, QuotaLookupChangesTakeEffectOnTheNextPush) {
  // The value the lookup reads (as the server's tenants file, changed while the store runs).
  auto max_bytes = std::make_shared<std::atomic<int64_t>>(10);
  StoreConfig config;
  config.quotas.lookup = [max_bytes](const std::string&) { return std::optional<Quota>(Quota{max_bytes->load(), 0}); };
  Recreate(config);
  Push("acme", "a", "12345678");
  DS_EXPECT_CODE(PushPack(store(), "acme", "a", "123"), Code::kResourceExhausted);

  max_bytes->store(11);
  EXPECT_EQ(Push("acme", "a", "123").version, 2);
  DS_EXPECT_CODE(PushPack(store(), "acme", "a", "4"), Code::kResourceExhausted);

  max_bytes->store(0);  // no override: the static settings (unlimited) apply again
  EXPECT_EQ(Push("acme", "a", Bytes(1000, 1)).version, 3);
  if (can_reopen()) {
    Reopen();  // the store asks again after a restart too
    max_bytes->store(1020);
    DS_EXPECT_CODE(PushPack(store(), "acme", "b", "more than ten bytes"), Code::kResourceExhausted);
  }
}

TEST_P(StoreConformanceTest, EmptyLookupKeepsStaticQuotas) {
  StoreConfig config;
  config.quotas.default_quota.max_versions = 2;
  config.quotas.per_tenant["small"].max_bytes = 10;
  ASSERT_FALSE(config.quotas.lookup);
  Recreate(config);
  Push("acme", "a", "one");
  Push("acme", "a", "two");
  DS_EXPECT_CODE(PushPack(store(), "acme", "a", "three"), Code::kResourceExhausted);
  Push("small", "a", "12345678");
  DS_EXPECT_CODE(PushPack(store(), "small", "a", "123"), Code::kResourceExhausted);
  Push("small", "a", "12");

  // A lookup without an answer (nullopt, or a Quota of zeros) changes nothing either.
  config.quotas.lookup = [](const std::string& tenant) {
    return tenant == "acme" ? std::optional<Quota>(Quota()) : std::optional<Quota>();
  };
  Recreate(config);
  Push("acme", "a", "one");
  Push("acme", "a", "two");
  DS_EXPECT_CODE(PushPack(store(), "acme", "a", "three"), Code::kResourceExhausted);
  Push("small", "a", "12345678");
  DS_EXPECT_CODE(PushPack(store(), "small", "a", "123"), Code::kResourceExhausted);
}

TEST_P(StoreConformanceTest, ReportsUsagePerTenant) {
  absl::StatusOr<TenantUsage> none = store().Usage("nobody");
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ(none->bytes, 0);
  EXPECT_EQ(none->versions, 0);
  Push("acme", "a", "12345");
  Push("acme", "b", "12345");
  Push("acme", "b", "1234567");
  Push("other", "a", "123");
  absl::StatusOr<TenantUsage> usage = store().Usage("acme");
  ASSERT_TRUE(usage.ok()) << usage.status();
  EXPECT_EQ(usage->bytes, 12);
  EXPECT_EQ(usage->versions, 3);
}

// --- Garbage collection ---

TEST_P(StoreConformanceTest, CollectsUnreferencedBlobsOlderThanGrace) {
  VersionInfo kept = Push("acme", "a", "referenced");
  absl::StatusOr<BlobInfo> loose = PutBlob(store(), "unreferenced");
  ASSERT_TRUE(loose.ok()) << loose.status();

  absl::StatusOr<GcReport> young = store().CollectGarbage(GcOptions());
  ASSERT_TRUE(young.ok()) << young.status();
  EXPECT_EQ(young->blobs_removed, 0);
  DS_EXPECT_OK(store().StatBlob(loose->digest));

  GcOptions later;
  later.now = absl::Now() + absl::Hours(2);
  absl::StatusOr<GcReport> old = store().CollectGarbage(later);
  ASSERT_TRUE(old.ok()) << old.status();
  EXPECT_EQ(old->blobs_removed, 1);
  EXPECT_EQ(old->bytes_removed, 12);
  DS_EXPECT_CODE(store().StatBlob(loose->digest), Code::kNotFound);
  absl::StatusOr<std::string> data = ReadBlob(store(), kept.digest);
  ASSERT_TRUE(data.ok()) << data.status();
  EXPECT_EQ(*data, "referenced");

  // Once its last version goes, a blob is collectable too.
  DS_ASSERT_OK(store().DeleteVersion("acme", "a", kept.version));
  absl::StatusOr<GcReport> last = store().CollectGarbage(later);
  ASSERT_TRUE(last.ok()) << last.status();
  EXPECT_EQ(last->blobs_removed, 1);
  absl::StatusOr<std::vector<BlobInfo>> blobs = store().ListBlobs();
  ASSERT_TRUE(blobs.ok()) << blobs.status();
  EXPECT_TRUE(blobs->empty());
}

// --- Names ---

TEST_P(StoreConformanceTest, RejectsNamesThatCouldEscapeOrCollide) {
  absl::StatusOr<BlobInfo> blob = PutBlob(store(), "pack");
  ASSERT_TRUE(blob.ok()) << blob.status();
  Push("acme", "a", "pack");
  const std::vector<std::string> unsafe = {"",    "../x", "..",  "a/b", ".hidden", "-x", "Upper", "a b",
                                           std::string("a\0b", 3), std::string(65, 'a'), "a:b", "a@b"};
  for (const std::string& bad : unsafe) {
    SCOPED_TRACE(bad);
    DS_EXPECT_CODE(store().AddVersion(bad, "a", blob->digest), Code::kInvalidArgument);
    DS_EXPECT_CODE(store().AddVersion("acme", bad, blob->digest), Code::kInvalidArgument);
    DS_EXPECT_CODE(store().SetLabel("acme", "a", bad, 1), Code::kInvalidArgument);
    DS_EXPECT_CODE(store().DeleteVersion(bad, "a", 1), Code::kInvalidArgument);
    if (!bad.empty()) {
      DS_EXPECT_CODE(store().Resolve(Ref{bad, "a", 0, "", ""}), Code::kInvalidArgument);
      DS_EXPECT_CODE(store().Resolve(Ref{"acme", bad, 0, "", ""}), Code::kInvalidArgument);
      DS_EXPECT_CODE(store().Resolve(Ref{"acme", "a", 0, bad, ""}), Code::kInvalidArgument);
      ListOptions options;
      options.tenant = bad;
      DS_EXPECT_CODE(store().List(options), Code::kInvalidArgument);
    }
  }
  EXPECT_EQ(Push(std::string(64, 'a'), "0.task_name-1", "pack").version, 1);
}

// --- Persistence ---

TEST_P(StoreConformanceTest, EverythingSurvivesReopen) {
  if (!can_reopen()) GTEST_SKIP() << GetParam().name << " keeps nothing across instances";
  Push("acme", "summarize", "one");
  Push("acme", "summarize", "two");
  Push("acme", "summarize", "three");
  Push("beta", "x", "one");
  DS_ASSERT_OK(store().SetLabel("acme", "summarize", "prod", 2));
  DS_ASSERT_OK(store().DeleteVersion("acme", "summarize", 3));
  absl::StatusOr<BlobInfo> loose = PutBlob(store(), Bytes(70000, 9));
  ASSERT_TRUE(loose.ok()) << loose.status();
  std::vector<VersionInfo> before = ListAll(store(), ListOptions());

  Reopen();
  std::vector<VersionInfo> after = ListAll(store(), ListOptions());
  ASSERT_EQ(after.size(), before.size());
  for (size_t i = 0; i < after.size(); ++i) {
    EXPECT_EQ(Key(after[i]), Key(before[i]));
    EXPECT_EQ(after[i].digest, before[i].digest);
    EXPECT_EQ(after[i].size, before[i].size);
    EXPECT_EQ(after[i].labels, before[i].labels);
    EXPECT_EQ(absl::ToUnixMicros(after[i].created), absl::ToUnixMicros(before[i].created));
  }
  absl::StatusOr<VersionInfo> prod = store().Resolve(Ref{"acme", "summarize", 0, "prod", ""});
  ASSERT_TRUE(prod.ok()) << prod.status();
  EXPECT_EQ(prod->version, 2);
  absl::StatusOr<std::string> data = ReadBlob(store(), prod->digest);
  ASSERT_TRUE(data.ok()) << data.status();
  EXPECT_EQ(*data, "two");
  absl::StatusOr<std::string> loose_data = ReadBlob(store(), loose->digest);
  ASSERT_TRUE(loose_data.ok()) << loose_data.status();
  EXPECT_TRUE(*loose_data == Bytes(70000, 9));
  absl::StatusOr<TenantUsage> usage = store().Usage("acme");
  ASSERT_TRUE(usage.ok()) << usage.status();
  EXPECT_EQ(usage->versions, 2);
  EXPECT_EQ(usage->bytes, 6);
  EXPECT_EQ(Push("acme", "summarize", "four").version, 4);  // 3 stays unused

  // And again, after more changes.
  DS_ASSERT_OK(store().DeleteLabel("acme", "summarize", "prod"));
  for (int64_t v : {1, 2, 4}) DS_ASSERT_OK(store().DeleteVersion("acme", "summarize", v));
  Reopen();
  DS_EXPECT_CODE(store().Resolve(Ref{"acme", "summarize", 0, "", ""}), Code::kNotFound);
  EXPECT_EQ(Push("acme", "summarize", "five").version, 5);
}

// --- Concurrency ---

TEST_P(StoreConformanceTest, ConcurrentPushesAndReadsAgree) {
  constexpr int kThreads = 8;
  constexpr int kRounds = 5;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([this, t] {
      const std::string own_task = absl::StrCat("task-", t);
      for (int r = 0; r < kRounds; ++r) {
        const std::string own = absl::StrCat("own ", t, " ", r, Bytes(5000, t * kRounds + r));
        const std::string shared = absl::StrCat("shared ", r, Bytes(5000, 1000 + r));
        absl::StatusOr<VersionInfo> mine = PushPack(store(), "acme", own_task, own);
        absl::StatusOr<VersionInfo> ours = PushPack(store(), "acme", "shared", shared);
        ASSERT_TRUE(mine.ok()) << mine.status();
        ASSERT_TRUE(ours.ok()) << ours.status();
        EXPECT_EQ(mine->version, r + 1);
        absl::StatusOr<std::string> own_read = ReadBlob(store(), mine->digest);
        absl::StatusOr<std::string> shared_read = ReadBlob(store(), ours->digest);
        ASSERT_TRUE(own_read.ok()) << own_read.status();
        ASSERT_TRUE(shared_read.ok()) << shared_read.status();
        EXPECT_TRUE(*own_read == own);
        EXPECT_TRUE(*shared_read == shared);
        DS_EXPECT_OK(store().Resolve(Ref{"acme", "shared", 0, "", ""}));
      }
    });
  }
  for (std::thread& thread : threads) thread.join();

  ListOptions shared;
  shared.tenant = "acme";
  shared.task = "shared";
  std::vector<VersionInfo> versions = ListAll(store(), shared);
  EXPECT_EQ(versions.size(), static_cast<size_t>(kRounds));  // each shared pack once
  std::set<std::string> digests;
  for (const VersionInfo& v : versions) digests.insert(v.digest);
  EXPECT_EQ(digests.size(), static_cast<size_t>(kRounds));
  absl::StatusOr<std::vector<BlobInfo>> blobs = store().ListBlobs();
  ASSERT_TRUE(blobs.ok()) << blobs.status();
  EXPECT_EQ(blobs->size(), static_cast<size_t>(kThreads * kRounds + kRounds));
  absl::StatusOr<TenantUsage> usage = store().Usage("acme");
  ASSERT_TRUE(usage.ok()) << usage.status();
  EXPECT_EQ(usage->versions, kThreads * kRounds + kRounds);
}

}  // namespace store
}  // namespace deltaserve

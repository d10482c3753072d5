// The OCI registry store and the caching store in front of it, against a real registry (docker-registry on
// 127.0.0.1, started by the tests): the conformance suite for both, then what is particular to a shared store.
// Without docker-registry installed, the tests skip and say so.
#include "delta_store/oci_store.h"

#include <atomic>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "delta_store/caching_store.h"
#include "delta_store/fs_store.h"
#include "delta_store/registry_client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/common/file_util.h"
#include "server/common/sha256.h"
#include "server/common/status_macros.h"
#include "tests/store/local_registry.h"
#include "tests/store/store_conformance.h"

namespace deltaserve {
namespace store {
namespace {

using ::testing::Contains;
using ::testing::HasSubstr;
using Code = absl::StatusCode;

// --- The conformance suite ---

// One registry for every conformance test (each store gets a repository prefix of its own); started on first
// use, stopped at exit.
absl::StatusOr<std::string> SharedRegistryUrl() {
  static absl::StatusOr<std::unique_ptr<LocalRegistry>> registry = LocalRegistry::Start();
  if (!registry.ok()) return registry.status();
  return (*registry)->url();
}

// A new repository prefix (create) or the one recorded in `dir` (reopen).
absl::StatusOr<std::string> Prefix(const std::string& dir, bool create) {
  static std::atomic<int> stores{0};
  const std::string file = dir + "/prefix";
  if (!create) return ReadFileToString(file);
  std::string prefix = absl::StrCat("conformance/s", ++stores);
  DS_RETURN_IF_ERROR(WriteFileAtomically(file, prefix));
  return prefix;
}

absl::StatusOr<std::unique_ptr<DeltaStore>> OpenOci(const std::string& dir, const StoreConfig& config, bool create) {
  OciRegistryStoreOptions options;
  DS_ASSIGN_OR_RETURN(options.url, SharedRegistryUrl());
  DS_ASSIGN_OR_RETURN(options.repository_prefix, Prefix(dir, create));
  options.max_blob_bytes = config.max_blob_bytes;
  options.quotas = config.quotas;
  options.temp_dir = dir;
  return OpenOciRegistryStore(options);
}

absl::StatusOr<std::unique_ptr<DeltaStore>> OpenCached(const std::string& dir, const StoreConfig& config, bool create) {
  DS_ASSIGN_OR_RETURN(std::unique_ptr<DeltaStore> remote, OpenOci(dir, config, create));
  FileSystemStoreOptions local_options;
  local_options.max_blob_bytes = config.max_blob_bytes;
  local_options.sync = false;  // a cache; and no crash is simulated here
  DS_ASSIGN_OR_RETURN(std::unique_ptr<DeltaStore> local, OpenFileSystemStore(dir + "/cache", local_options));
  return std::unique_ptr<DeltaStore>(new CachingStore(std::move(remote), std::move(local)));
}

std::vector<StoreFactory> RegistryFactories() {
  if (LocalRegistry::FindBinary().empty()) return {};  // the tests below skip and say why
  StoreFactory oci;
  oci.name = "Oci";
  oci.create = [](const std::string& dir, const StoreConfig& config) { return OpenOci(dir, config, true); };
  oci.reopen = [](const std::string& dir, const StoreConfig& config) { return OpenOci(dir, config, false); };
  StoreFactory cached;
  cached.name = "CachedOci";
  cached.create = [](const std::string& dir, const StoreConfig& config) { return OpenCached(dir, config, true); };
  cached.reopen = [](const std::string& dir, const StoreConfig& config) { return OpenCached(dir, config, false); };
  return {oci, cached};
}

INSTANTIATE_TEST_SUITE_P(Registry, StoreConformanceTest, ::testing::ValuesIn(RegistryFactories()), StoreFactoryName);
// Without docker-registry there are no instances (the OciRegistryStoreTest cases say why).
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(StoreConformanceTest);

// --- A registry of its own per test ---

class OciRegistryStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (LocalRegistry::FindBinary().empty()) GTEST_SKIP() << LocalRegistry::kSkipMessage;
    absl::StatusOr<std::unique_ptr<LocalRegistry>> registry = LocalRegistry::Start();
    ASSERT_TRUE(registry.ok()) << registry.status();
    registry_ = *std::move(registry);
    std::string dir = ::testing::TempDir() + "oci_store_test.XXXXXX";
    ASSERT_NE(mkdtemp(dir.data()), nullptr);
    dir_ = dir;
  }
  void TearDown() override {
    std::error_code ignored;
    if (!dir_.empty()) std::filesystem::remove_all(dir_, ignored);
  }

  OciRegistryStoreOptions Options() {
    OciRegistryStoreOptions options;
    options.url = registry_->url();
    options.temp_dir = dir_;
    return options;
  }
  std::unique_ptr<DeltaStore> Oci(const OciRegistryStoreOptions& options) {
    absl::StatusOr<std::unique_ptr<DeltaStore>> store = OpenOciRegistryStore(options);
    EXPECT_TRUE(store.ok()) << store.status();
    return store.ok() ? *std::move(store) : nullptr;
  }
  std::unique_ptr<DeltaStore> Oci() { return Oci(Options()); }
  // A replica: the shared registry plus a local cache of its own under dir_/<name>.
  std::unique_ptr<CachingStore> Replica(const std::string& name, const CachingStoreOptions& options = {},
                                        bool verify_every_read = false) {
    FileSystemStoreOptions local_options;
    local_options.sync = false;
    local_options.verify_every_read = verify_every_read;
    absl::StatusOr<std::unique_ptr<DeltaStore>> local = OpenFileSystemStore(CacheRoot(name), local_options);
    EXPECT_TRUE(local.ok()) << local.status();
    if (!local.ok()) return nullptr;
    return std::make_unique<CachingStore>(Oci(), *std::move(local), options);
  }
  std::string CacheRoot(const std::string& name) const { return absl::StrCat(dir_, "/", name); }
  std::unique_ptr<RegistryClient> Client() {
    RegistryClientOptions options;
    options.url = registry_->url();
    absl::StatusOr<std::unique_ptr<RegistryClient>> client = RegistryClient::Create(options);
    EXPECT_TRUE(client.ok()) << client.status();
    return client.ok() ? *std::move(client) : nullptr;
  }

  std::unique_ptr<LocalRegistry> registry_;
  std::string dir_;
};

int64_t ResolvedVersion(DeltaStore& store, const Ref& ref) {
  absl::StatusOr<VersionInfo> info = store.Resolve(ref);
  EXPECT_TRUE(info.ok()) << info.status();
  return info.ok() ? info->version : -1;
}

TEST_F(OciRegistryStoreTest, TwoReplicasSeeEachOthersPushesAndLabelMoves) {
  std::unique_ptr<CachingStore> a = Replica("a");
  std::unique_ptr<CachingStore> b = Replica("b");
  ASSERT_TRUE(a && b);
  absl::StatusOr<VersionInfo> one = PushPack(*a, "acme", "summarize", "one");
  ASSERT_TRUE(one.ok()) << one.status();
  EXPECT_EQ(ResolvedVersion(*b, Ref{"acme", "summarize", 0, "", ""}), 1);
  absl::StatusOr<std::string> read = ReadBlob(*b, one->digest);  // b's cache fetches it
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(*read, "one");
  EXPECT_EQ(b->stats().misses, 1);

  DS_ASSERT_OK(PushPack(*b, "acme", "summarize", "two"));
  EXPECT_EQ(ResolvedVersion(*a, Ref{"acme", "summarize", 0, "", ""}), 2);

  DS_ASSERT_OK(a->SetLabel("acme", "summarize", "prod", 1));
  EXPECT_EQ(ResolvedVersion(*b, Ref{"acme", "summarize", 0, "prod", ""}), 1);
  DS_ASSERT_OK(b->SetLabel("acme", "summarize", "prod", 2));
  EXPECT_EQ(ResolvedVersion(*a, Ref{"acme", "summarize", 0, "prod", ""}), 2);
  DS_ASSERT_OK(b->DeleteLabel("acme", "summarize", "prod"));
  DS_EXPECT_CODE(a->Resolve(Ref{"acme", "summarize", 0, "prod", ""}), Code::kNotFound);

  DS_ASSERT_OK(a->DeleteVersion("acme", "summarize", 2));
  EXPECT_EQ(ResolvedVersion(*b, Ref{"acme", "summarize", 0, "", ""}), 1);
  absl::StatusOr<VersionInfo> three = PushPack(*b, "acme", "summarize", "three");
  ASSERT_TRUE(three.ok()) << three.status();
  EXPECT_EQ(three->version, 3);  // 2 stays taken, whichever replica deleted it
}

TEST_F(OciRegistryStoreTest, CacheServesBlobsItHoldsAfterTheRegistryStops) {
  std::unique_ptr<CachingStore> replica = Replica("replica");
  std::unique_ptr<DeltaStore> elsewhere = Oci();
  ASSERT_TRUE(replica && elsewhere);
  absl::StatusOr<VersionInfo> here = PushPack(*replica, "acme", "summarize", "pushed through this replica");
  absl::StatusOr<VersionInfo> there = PushPack(*elsewhere, "acme", "summarize", "pushed through another");
  absl::StatusOr<BlobInfo> unread = PutBlob(*elsewhere, "never read by this replica");
  ASSERT_TRUE(here.ok() && there.ok() && unread.ok());
  DS_ASSERT_OK(ReadBlob(*replica, there->digest));  // now cached too

  registry_->Stop();
  absl::StatusOr<std::string> read = ReadBlob(*replica, here->digest);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(*read, "pushed through this replica");
  read = ReadBlob(*replica, there->digest);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(*read, "pushed through another");
  DS_EXPECT_OK(replica->StatBlob(here->digest));
  EXPECT_GE(replica->stats().hits, 2);

  absl::Status missing = ReadBlob(*replica, unread->digest).status();
  EXPECT_EQ(missing.code(), Code::kUnavailable) << missing;
  EXPECT_THAT(missing.message(), HasSubstr(registry_->url()));
  DS_EXPECT_CODE(replica->Resolve(Ref{"acme", "summarize", 0, "", ""}), Code::kUnavailable);

  DS_ASSERT_OK(registry_->Restart());
  EXPECT_EQ(ResolvedVersion(*replica, Ref{"acme", "summarize", 0, "", ""}), 2);
  DS_EXPECT_OK(ReadBlob(*replica, unread->digest));
}

TEST_F(OciRegistryStoreTest, UnreachableRegistryIsUnavailableAndNamedInTheMessage) {
  std::unique_ptr<DeltaStore> store = Oci();
  ASSERT_TRUE(store);
  registry_->Stop();

  absl::StatusOr<std::unique_ptr<DeltaStore>> opened = OpenOciRegistryStore(Options());
  EXPECT_EQ(opened.status().code(), Code::kUnavailable) << opened.status();
  EXPECT_THAT(opened.status().message(), HasSubstr(registry_->url()));
  for (const absl::Status& status :
       {store->Resolve(Ref{"acme", "summarize", 0, "", ""}).status(), PutBlob(*store, "bytes").status(),
        store->ListBlobs().status(), store->Usage("acme").status()}) {
    EXPECT_EQ(status.code(), Code::kUnavailable) << status;
    EXPECT_THAT(status.message(), HasSubstr(registry_->url()));
  }
}

TEST_F(OciRegistryStoreTest, StoresVersionsAsOciManifestsThatToolsCanPull) {
  std::unique_ptr<DeltaStore> store = Oci();
  std::unique_ptr<RegistryClient> client = Client();
  ASSERT_TRUE(store && client);
  absl::StatusOr<VersionInfo> v = PushPack(*store, "acme", "summarize", "pack bytes");
  ASSERT_TRUE(v.ok()) << v.status();
  DS_ASSERT_OK(store->SetLabel("acme", "summarize", "prod", 1));

  const std::string repo = "deltaserve/acme/summarize";
  for (const std::string tag : {"1", "latest", "prod"}) {
    SCOPED_TRACE(tag);
    absl::StatusOr<RegistryClient::Manifest> m = client->GetManifest(repo, tag);
    ASSERT_TRUE(m.ok()) << m.status();
    nlohmann::json j = nlohmann::json::parse(m->body, nullptr, /*allow_exceptions=*/false);
    ASSERT_TRUE(j.is_object()) << m->body;
    EXPECT_EQ(j.value("mediaType", ""), "application/vnd.oci.image.manifest.v1+json");
    EXPECT_EQ(j["config"].value("mediaType", ""), "application/vnd.deltaserve.pack.config.v1+json");
    ASSERT_EQ(j["layers"].size(), 1u);
    EXPECT_EQ(j["layers"][0].value("mediaType", ""), "application/vnd.deltaserve.pack.v1");
    EXPECT_EQ(j["layers"][0].value("digest", ""), v->digest);
    EXPECT_EQ(j["layers"][0].value("size", 0), 10);
    EXPECT_EQ(j["annotations"].value("io.deltaserve.version", ""), "1");
    EXPECT_TRUE(j["annotations"].contains("org.opencontainers.image.created"));
  }
  std::string pulled;
  DS_ASSERT_OK(client->GetBlob(repo, v->digest, [&](absl::string_view data) {
    pulled.append(data.data(), data.size());
    return absl::OkStatus();
  }));
  EXPECT_EQ(pulled, "pack bytes");  // mounted into the task's repository
  absl::StatusOr<std::vector<std::string>> repos = client->Catalog();
  ASSERT_TRUE(repos.ok()) << repos.status();
  EXPECT_THAT(*repos, Contains("deltaserve/blobs"));
  EXPECT_THAT(*repos, Contains(repo));
}

TEST_F(OciRegistryStoreTest, UploadsNothingWhenTheDigestDiffers) {
  std::unique_ptr<DeltaStore> store = Oci();
  std::unique_ptr<RegistryClient> client = Client();
  ASSERT_TRUE(store && client);
  DS_EXPECT_CODE(PutBlob(*store, "actual bytes", Sha256Digest("other bytes")), Code::kDataLoss);
  DS_EXPECT_CODE(client->HeadBlob("deltaserve/blobs", Sha256Digest("actual bytes")), Code::kNotFound);
}

TEST_F(OciRegistryStoreTest, UploadsLargeBlobsInChunks) {
  OciRegistryStoreOptions options = Options();
  options.chunk_size = 64 << 10;
  std::unique_ptr<DeltaStore> store = Oci(options);
  ASSERT_TRUE(store);
  std::string data(300000, '\0');
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 7919 % 251);
  absl::StatusOr<BlobInfo> info = PutBlob(*store, data, Sha256Digest(data));
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->size, 300000);
  absl::StatusOr<std::string> read = ReadBlob(*store, info->digest);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_TRUE(*read == data);
}

TEST_F(OciRegistryStoreTest, DropsACorruptCachedCopyAndFetchesItAgain) {
  std::unique_ptr<CachingStore> replica = Replica("replica", {}, /*verify_every_read=*/true);
  ASSERT_TRUE(replica);
  absl::StatusOr<VersionInfo> v = PushPack(*replica, "acme", "summarize", "precious bytes");
  ASSERT_TRUE(v.ok()) << v.status();
  const std::string hex = v->digest.substr(7);
  const std::string path = absl::StrCat(CacheRoot("replica"), "/blobs/sha256/", hex.substr(0, 2), "/", hex.substr(2));
  ASSERT_TRUE(FileExists(path)) << path;
  {
    std::fstream file(path, std::ios::in | std::ios::out | std::ios::binary);
    file.seekp(0);
    file.put('P' ^ 1);
  }
  DS_EXPECT_CODE(ReadBlob(*replica, v->digest), Code::kDataLoss);
  absl::StatusOr<std::string> read = ReadBlob(*replica, v->digest);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(*read, "precious bytes");
}

TEST_F(OciRegistryStoreTest, ReusesResolveAnswersOnlyWithinTheTtl) {
  CachingStoreOptions options;
  options.resolve_ttl = absl::Hours(1);
  std::unique_ptr<CachingStore> replica = Replica("replica", options);
  std::unique_ptr<DeltaStore> elsewhere = Oci();
  ASSERT_TRUE(replica && elsewhere);
  DS_ASSERT_OK(PushPack(*elsewhere, "acme", "summarize", "one"));
  EXPECT_EQ(ResolvedVersion(*replica, Ref{"acme", "summarize", 0, "", ""}), 1);
  DS_ASSERT_OK(PushPack(*elsewhere, "acme", "summarize", "two"));
  EXPECT_EQ(ResolvedVersion(*replica, Ref{"acme", "summarize", 0, "", ""}), 1);  // reused
  DS_ASSERT_OK(replica->SetLabel("acme", "summarize", "prod", 2));               // its own change drops them
  EXPECT_EQ(ResolvedVersion(*replica, Ref{"acme", "summarize", 0, "", ""}), 2);
}

TEST_F(OciRegistryStoreTest, RejectsNamesTheRegistryCannotHold) {
  std::unique_ptr<DeltaStore> store = Oci();
  ASSERT_TRUE(store);
  absl::StatusOr<BlobInfo> blob = PutBlob(*store, "pack");
  ASSERT_TRUE(blob.ok()) << blob.status();
  absl::Status status = store->AddVersion("acme", "trailing-", blob->digest).status();
  EXPECT_EQ(status.code(), Code::kInvalidArgument) << status;
  EXPECT_THAT(status.message(), HasSubstr("trailing-"));
  DS_EXPECT_CODE(store->Resolve(Ref{"acme", "trailing-", 0, "", ""}), Code::kNotFound);
  for (const std::string bad : {"", "Upper/case", "a//b", "trailing/"}) {
    OciRegistryStoreOptions options = Options();
    options.repository_prefix = bad;
    DS_EXPECT_CODE(OpenOciRegistryStore(options), Code::kInvalidArgument);
  }
}

}  // namespace
}  // namespace store
}  // namespace deltaserve

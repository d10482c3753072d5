// The in-memory DeltaStore: the conformance suite, plus what is particular to it.
#include "delta_store/memory_store.h"

#include "gtest/gtest.h"
#include "server/common/sha256.h"
#include "tests/store/store_conformance.h"

namespace deltaserve {
namespace store {
namespace {

StoreFactory MemoryFactory() {
  StoreFactory factory;
  factory.name = "Memory";
  factory.create = [](const std::string& /*dir*/,
                      const StoreConfig& config) -> absl::StatusOr<std::unique_ptr<DeltaStore>> {
    MemoryStoreOptions options;
    options.max_blob_bytes = config.max_blob_bytes;
    options.quotas = config.quotas;
    return NewMemoryStore(options);
  };
  return factory;  // no reopen: nothing outlives the store
}

INSTANTIATE_TEST_SUITE_P(Memory, StoreConformanceTest, ::testing::Values(MemoryFactory()), StoreFactoryName);

TEST(MemoryStoreTest, CommitAfterFailedAppendStoresNothing) {
  MemoryStoreOptions options;
  options.max_blob_bytes = 10;
  std::unique_ptr<DeltaStore> store = NewMemoryStore(options);
  absl::StatusOr<std::unique_ptr<BlobWriter>> writer = store->NewBlobWriter("");
  ASSERT_TRUE(writer.ok()) << writer.status();
  DS_ASSERT_OK((*writer)->Append("12345"));
  DS_EXPECT_CODE((*writer)->Append("678901"), absl::StatusCode::kResourceExhausted);
  DS_EXPECT_CODE((*writer)->Commit(), absl::StatusCode::kFailedPrecondition);
  DS_EXPECT_CODE(store->StatBlob(Sha256Digest("12345")), absl::StatusCode::kNotFound);
}

TEST(MemoryStoreTest, ReaderKeepsItsBytesAfterTheBlobIsCollected) {
  std::unique_ptr<DeltaStore> store = NewMemoryStore();
  absl::StatusOr<BlobInfo> blob = PutBlob(*store, "bytes in flight");
  ASSERT_TRUE(blob.ok()) << blob.status();
  absl::StatusOr<std::unique_ptr<BlobReader>> reader = store->OpenBlob(blob->digest);
  ASSERT_TRUE(reader.ok()) << reader.status();
  DS_ASSERT_OK(store->DeleteBlob(blob->digest));
  char buffer[64];
  absl::StatusOr<size_t> n = (*reader)->Read(buffer, sizeof(buffer));
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(std::string(buffer, *n), "bytes in flight");
}

TEST(MemoryStoreTest, GcWithZeroGraceRemovesUnreferencedBlobsNow) {
  std::unique_ptr<DeltaStore> store = NewMemoryStore();
  DS_ASSERT_OK(PutBlob(*store, "loose"));
  GcOptions options;
  options.grace = absl::ZeroDuration();
  absl::StatusOr<GcReport> report = store->CollectGarbage(options);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->blobs_removed, 1);
  EXPECT_EQ(report->bytes_removed, 5);
  EXPECT_EQ(report->temp_files_removed, 0);
}

}  // namespace
}  // namespace store
}  // namespace deltaserve

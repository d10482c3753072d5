// FaultInjectingStore: transparent when no fault is set (the conformance suite), and the faults it injects.
#include "delta_store/fault_store.h"

#include <memory>
#include <string>
#include <utility>

#include "delta_store/memory_store.h"
#include "gtest/gtest.h"
#include "server/common/sha256.h"
#include "tests/store/store_conformance.h"

namespace deltaserve {
namespace store {
namespace {

using Code = absl::StatusCode;

// A FaultInjectingStore that owns its base store (the base is constructed first).
struct BaseHolder {
  std::unique_ptr<DeltaStore> base;
};
class OwningFaultStore : private BaseHolder, public FaultInjectingStore {
 public:
  explicit OwningFaultStore(std::unique_ptr<DeltaStore> base)
      : BaseHolder{std::move(base)}, FaultInjectingStore(BaseHolder::base.get()) {}
};

StoreFactory FaultOverMemoryFactory() {
  StoreFactory factory;
  factory.name = "FaultOverMemory";
  factory.create = [](const std::string& /*dir*/,
                      const StoreConfig& config) -> absl::StatusOr<std::unique_ptr<DeltaStore>> {
    MemoryStoreOptions options;
    options.max_blob_bytes = config.max_blob_bytes;
    options.quotas = config.quotas;
    return std::unique_ptr<DeltaStore>(new OwningFaultStore(NewMemoryStore(options)));
  };
  return factory;
}

INSTANTIATE_TEST_SUITE_P(FaultOverMemory, StoreConformanceTest, ::testing::Values(FaultOverMemoryFactory()),
                         StoreFactoryName);

class FaultInjectingStoreTest : public ::testing::Test {
 protected:
  std::unique_ptr<DeltaStore> base_ = NewMemoryStore();
  FaultInjectingStore store_{base_.get()};
};

TEST_F(FaultInjectingStoreTest, FailNextFailsTheNextCallsWithoutReachingTheBase) {
  store_.FailNext("AddVersion", absl::UnavailableError("injected"), 2);
  absl::StatusOr<BlobInfo> blob = PutBlob(store_, "pack");
  ASSERT_TRUE(blob.ok()) << blob.status();
  DS_EXPECT_CODE(store_.AddVersion("acme", "a", blob->digest), Code::kUnavailable);
  DS_EXPECT_CODE(store_.AddVersion("acme", "a", blob->digest), Code::kUnavailable);
  DS_EXPECT_CODE(base_->Resolve(Ref{"acme", "a", 0, "", ""}), Code::kNotFound);

  absl::StatusOr<VersionInfo> added = store_.AddVersion("acme", "a", blob->digest);
  ASSERT_TRUE(added.ok()) << added.status();
  EXPECT_EQ(added->version, 1);
  EXPECT_EQ(store_.Calls("AddVersion"), 3);
  EXPECT_EQ(store_.Calls("SetLabel"), 0);
}

TEST_F(FaultInjectingStoreTest, FailAlwaysFailsUntilClear) {
  store_.FailAlways("ListBlobs", absl::InternalError("disk on fire"));
  for (int i = 0; i < 3; ++i) DS_EXPECT_CODE(store_.ListBlobs(), Code::kInternal);
  store_.Clear();
  DS_EXPECT_OK(store_.ListBlobs());
  EXPECT_EQ(store_.Calls("ListBlobs"), 4);
}

TEST_F(FaultInjectingStoreTest, EveryOperationCanFail) {
  absl::StatusOr<BlobInfo> blob = PutBlob(*base_, "pack");
  ASSERT_TRUE(blob.ok()) << blob.status();
  const std::string d = blob->digest;
  const absl::Status injected = absl::AbortedError("injected");
  auto fails = [&](const std::string& op, const absl::Status& status) {
    EXPECT_EQ(status.code(), Code::kAborted) << op << ": " << status;
  };
  const std::vector<std::string> ops = {"NewBlobWriter", "OpenBlob", "StatBlob", "ListBlobs", "DeleteBlob",
                                        "AddVersion", "Resolve", "SetLabel", "DeleteLabel", "DeleteVersion",
                                        "List", "Usage", "CollectGarbage"};
  for (const std::string& op : ops) store_.FailNext(op, injected);
  fails("NewBlobWriter", StatusOf(store_.NewBlobWriter("")));
  fails("OpenBlob", StatusOf(store_.OpenBlob(d)));
  fails("StatBlob", StatusOf(store_.StatBlob(d)));
  fails("ListBlobs", StatusOf(store_.ListBlobs()));
  fails("DeleteBlob", store_.DeleteBlob(d));
  fails("AddVersion", StatusOf(store_.AddVersion("acme", "a", d)));
  fails("Resolve", StatusOf(store_.Resolve(Ref{"acme", "a", 0, "", ""})));
  fails("SetLabel", store_.SetLabel("acme", "a", "prod", 1));
  fails("DeleteLabel", store_.DeleteLabel("acme", "a", "prod"));
  fails("DeleteVersion", store_.DeleteVersion("acme", "a", 1));
  fails("List", StatusOf(store_.List(ListOptions())));
  fails("Usage", StatusOf(store_.Usage("acme")));
  fails("CollectGarbage", StatusOf(store_.CollectGarbage(GcOptions())));
  for (const std::string& op : ops) EXPECT_EQ(store_.Calls(op), 1) << op;
  DS_EXPECT_OK(base_->StatBlob(d));  // the injected DeleteBlob never reached the base
}

TEST_F(FaultInjectingStoreTest, FailedAppendOrCommitLeavesNoBlobInTheBase) {
  store_.FailNext("Append", absl::UnavailableError("connection reset"));
  DS_EXPECT_CODE(PutBlob(store_, "first"), Code::kUnavailable);
  store_.FailNext("Commit", absl::UnavailableError("connection reset"));
  DS_EXPECT_CODE(PutBlob(store_, "second"), Code::kUnavailable);
  absl::StatusOr<std::vector<BlobInfo>> blobs = base_->ListBlobs();
  ASSERT_TRUE(blobs.ok()) << blobs.status();
  EXPECT_TRUE(blobs->empty());
  EXPECT_EQ(store_.Calls("Append"), 2);
  EXPECT_EQ(store_.Calls("Commit"), 1);
  DS_EXPECT_OK(PutBlob(store_, "second"));
}

TEST_F(FaultInjectingStoreTest, FailedReadSurfaces) {
  absl::StatusOr<BlobInfo> blob = PutBlob(store_, "pack bytes");
  ASSERT_TRUE(blob.ok()) << blob.status();
  store_.FailNext("Read", absl::DataLossError("bad sector"));
  DS_EXPECT_CODE(ReadBlob(store_, blob->digest), Code::kDataLoss);
  absl::StatusOr<std::string> data = ReadBlob(store_, blob->digest);
  ASSERT_TRUE(data.ok()) << data.status();
  EXPECT_EQ(*data, "pack bytes");
}

TEST_F(FaultInjectingStoreTest, CorruptReadsFlipOneBitThatADigestCheckCatches) {
  const std::string original(10000, 'x');
  absl::StatusOr<BlobInfo> blob = PutBlob(store_, original);
  ASSERT_TRUE(blob.ok()) << blob.status();
  store_.CorruptReads(true);
  absl::StatusOr<std::string> corrupt = ReadBlob(store_, blob->digest);
  ASSERT_TRUE(corrupt.ok()) << corrupt.status();
  ASSERT_EQ(corrupt->size(), original.size());
  int flipped_bits = 0;
  for (size_t i = 0; i < original.size(); ++i) {
    flipped_bits += __builtin_popcount(static_cast<unsigned char>((*corrupt)[i] ^ original[i]));
  }
  EXPECT_EQ(flipped_bits, 1);
  EXPECT_NE(Sha256Digest(*corrupt), blob->digest);

  store_.Clear();
  absl::StatusOr<std::string> clean = ReadBlob(store_, blob->digest);
  ASSERT_TRUE(clean.ok()) << clean.status();
  EXPECT_TRUE(*clean == original);
}

}  // namespace
}  // namespace store
}  // namespace deltaserve

// ObservedStore: transparent (the conformance suite runs through it), and it reports every operation with its
// outcome to the observer.
#include "delta_store/observed_store.h"

#include <map>
#include <memory>
#include <string>
#include <utility>

#include "absl/synchronization/mutex.h"
#include "delta_store/fault_store.h"
#include "delta_store/memory_store.h"
#include "gtest/gtest.h"
#include "tests/store/store_conformance.h"

namespace deltaserve {
namespace store {
namespace {

using Code = absl::StatusCode;

// Counts reports by (op name, code name).
class CountingObserver : public StoreObserver {
 public:
  void OnStoreOperation(StoreOp op, absl::StatusCode code, absl::Duration latency) override {
    absl::MutexLock lock(&mu_);
    counts_[std::string(StoreOpName(op)) + " " + absl::StatusCodeToString(code)]++;
    if (latency < absl::ZeroDuration()) negative_latency_ = true;
  }
  int Count(const std::string& op, Code code) {
    absl::MutexLock lock(&mu_);
    return counts_[op + " " + absl::StatusCodeToString(code)];
  }
  int Total() {
    absl::MutexLock lock(&mu_);
    int total = 0;
    for (const auto& [key, n] : counts_) total += n;
    return total;
  }
  bool negative_latency() {
    absl::MutexLock lock(&mu_);
    return negative_latency_;
  }

 private:
  absl::Mutex mu_;
  std::map<std::string, int> counts_ ABSL_GUARDED_BY(mu_);
  bool negative_latency_ ABSL_GUARDED_BY(mu_) = false;
};

StoreFactory ObservedMemoryFactory() {
  static CountingObserver* observer = new CountingObserver();
  StoreFactory factory;
  factory.name = "ObservedMemory";
  factory.create = [](const std::string& /*dir*/,
                      const StoreConfig& config) -> absl::StatusOr<std::unique_ptr<DeltaStore>> {
    MemoryStoreOptions options;
    options.max_blob_bytes = config.max_blob_bytes;
    options.quotas = config.quotas;
    return NewObservedStore(NewMemoryStore(options), observer);
  };
  return factory;
}

INSTANTIATE_TEST_SUITE_P(ObservedMemory, StoreConformanceTest, ::testing::Values(ObservedMemoryFactory()),
                         StoreFactoryName);

// The observed store over a fault injector over a memory store.
class ObservedStoreTest : public ::testing::Test {
 protected:
  std::unique_ptr<DeltaStore> memory_ = NewMemoryStore();
  FaultInjectingStore* faults_ = nullptr;
  CountingObserver observer_;
  std::unique_ptr<DeltaStore> store_ = [this] {
    auto faults = std::make_unique<FaultInjectingStore>(memory_.get());
    faults_ = faults.get();
    return NewObservedStore(std::move(faults), &observer_);
  }();
};

TEST_F(ObservedStoreTest, ReportsEachOperationWithItsOutcome) {
  absl::StatusOr<BlobInfo> blob = PutBlob(*store_, "pack bytes");
  ASSERT_TRUE(blob.ok()) << blob.status();
  EXPECT_EQ(observer_.Count("put", Code::kOk), 1);
  ASSERT_TRUE(store_->AddVersion("acme", "sentiment", blob->digest).ok());
  EXPECT_EQ(observer_.Count("add_version", Code::kOk), 1);
  ASSERT_TRUE(store_->SetLabel("acme", "sentiment", "prod", 1).ok());
  EXPECT_EQ(observer_.Count("set_label", Code::kOk), 1);
  ASSERT_TRUE(store_->Resolve(Ref{"acme", "sentiment", 0, "prod", ""}).ok());
  EXPECT_FALSE(store_->Resolve(Ref{"acme", "nope", 0, "", ""}).ok());
  EXPECT_EQ(observer_.Count("resolve", Code::kOk), 1);
  EXPECT_EQ(observer_.Count("resolve", Code::kNotFound), 1);
  absl::StatusOr<std::string> read = ReadBlob(*store_, blob->digest);
  ASSERT_TRUE(read.ok());
  EXPECT_EQ(*read, "pack bytes");
  EXPECT_EQ(observer_.Count("get", Code::kOk), 1);  // the open; reads add reports only when they fail
  ASSERT_TRUE(store_->List(ListOptions{}).ok());
  ASSERT_TRUE(store_->ListBlobs().ok());
  EXPECT_EQ(observer_.Count("list", Code::kOk), 2);
  ASSERT_TRUE(store_->StatBlob(blob->digest).ok());
  ASSERT_TRUE(store_->Usage("acme").ok());
  ASSERT_TRUE(store_->DeleteLabel("acme", "sentiment", "prod").ok());
  ASSERT_TRUE(store_->DeleteVersion("acme", "sentiment", 1).ok());
  ASSERT_TRUE(store_->DeleteBlob(blob->digest).ok());
  ASSERT_TRUE(store_->CollectGarbage(GcOptions{}).ok());
  for (const char* op : {"stat", "usage", "delete_label", "delete_version", "delete_blob", "gc"}) {
    EXPECT_EQ(observer_.Count(op, Code::kOk), 1) << op;
  }
  EXPECT_FALSE(observer_.negative_latency());
}

TEST_F(ObservedStoreTest, ReportsTheStoresOwnFailuresAndPassesThemThrough) {
  faults_->FailNext("Resolve", absl::UnavailableError("registry down"));
  absl::StatusOr<VersionInfo> resolved = store_->Resolve(Ref{"acme", "sentiment", 0, "", ""});
  EXPECT_EQ(resolved.status().code(), Code::kUnavailable);
  EXPECT_EQ(resolved.status().message(), "registry down");
  EXPECT_EQ(observer_.Count("resolve", Code::kUnavailable), 1);

  faults_->FailNext("Commit", absl::InternalError("disk full"));
  EXPECT_EQ(PutBlob(*store_, "bytes").status().code(), Code::kInternal);
  EXPECT_EQ(observer_.Count("put", Code::kInternal), 1);

  faults_->FailNext("NewBlobWriter", absl::UnavailableError("no space"));
  EXPECT_EQ(PutBlob(*store_, "bytes").status().code(), Code::kUnavailable);
  EXPECT_EQ(observer_.Count("put", Code::kUnavailable), 1);
}

TEST_F(ObservedStoreTest, ReportsACorruptReadAsAFailedGet) {
  absl::StatusOr<BlobInfo> blob = PutBlob(*store_, "pack bytes");
  ASSERT_TRUE(blob.ok());
  faults_->FailNext("Read", absl::DataLossError("bad sector"));
  EXPECT_EQ(ReadBlob(*store_, blob->digest).status().code(), Code::kDataLoss);
  EXPECT_EQ(observer_.Count("get", Code::kDataLoss), 1);
  EXPECT_EQ(observer_.Count("get", Code::kOk), 1);  // the open
}

TEST_F(ObservedStoreTest, AppendsAreNotCountedOneByOne) {
  absl::StatusOr<std::unique_ptr<BlobWriter>> writer = store_->NewBlobWriter("");
  ASSERT_TRUE(writer.ok());
  for (int i = 0; i < 10; ++i) ASSERT_TRUE((*writer)->Append("chunk").ok());
  ASSERT_TRUE((*writer)->Commit().ok());
  EXPECT_EQ(observer_.Total(), 1);
}

}  // namespace
}  // namespace store
}  // namespace deltaserve

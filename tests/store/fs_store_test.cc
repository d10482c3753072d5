// Tests of the filesystem store: the conformance suite (with reopen), then what only a store on disk has: its
// layout, the root lock, journal recovery, corruption on disk, GC of crashed uploads, and concurrent use.
// The crash test (SIGKILL at random points) is fs_store_crash_test.cc.
#include "delta_store/fs_store.h"

#include <fcntl.h>
#include <sys/stat.h>

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "delta_store/store.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/common/file_util.h"
#include "server/common/sha256.h"
#include "tests/store/store_conformance.h"

namespace deltaserve {
namespace store {
namespace {

using ::testing::HasSubstr;

StoreFactory FileSystemFactory() {
  StoreFactory factory;
  factory.name = "FileSystem";
  factory.create = [](const std::string& dir, const StoreConfig& config) {
    FileSystemStoreOptions options;
    options.quotas = config.quotas;
    options.max_blob_bytes = config.max_blob_bytes;
    return OpenFileSystemStore(dir, options);
  };
  factory.reopen = factory.create;
  return factory;
}

INSTANTIATE_TEST_SUITE_P(FileSystem, StoreConformanceTest, ::testing::Values(FileSystemFactory()), StoreFactoryName);

std::string RandomBytes(std::mt19937_64& rng, size_t size) {
  std::string data(size, '\0');
  for (char& c : data) c = static_cast<char>(rng());
  return data;
}

void WriteFile(const std::string& path, const std::string& data, std::ios::openmode mode = std::ios::trunc) {
  std::ofstream out(path, std::ios::binary | std::ios::out | mode);
  out << data;
  ASSERT_TRUE(out.good()) << path;
}

// Sets a file's modification time to `age` ago.
void Age(const std::string& path, absl::Duration age) {
  const timespec when = absl::ToTimespec(absl::Now() - age);
  const timespec times[2] = {when, when};
  ASSERT_EQ(::utimensat(AT_FDCWD, path.c_str(), times, 0), 0) << path;
}

class FileSystemStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = ::testing::TempDir() + "fs_store_test.XXXXXX";
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
    root_ = dir_ + "/store";
    Open();
  }
  void TearDown() override {
    store_.reset();
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }

  // (Re)opens the store at root_, closing the current one first.
  void Open(const FileSystemStoreOptions& options = {}) {
    store_.reset();
    absl::StatusOr<std::unique_ptr<DeltaStore>> opened = OpenFileSystemStore(root_, options);
    ASSERT_TRUE(opened.ok()) << opened.status();
    store_ = std::move(*opened);
  }
  absl::Status TryOpen(const FileSystemStoreOptions& options = {}) {
    store_.reset();
    absl::StatusOr<std::unique_ptr<DeltaStore>> opened = OpenFileSystemStore(root_, options);
    if (opened.ok()) store_ = std::move(*opened);
    return opened.status();
  }

  VersionInfo Push(const std::string& task, const std::string& data) {
    absl::StatusOr<VersionInfo> pushed = PushPack(*store_, "acme", task, data);
    EXPECT_TRUE(pushed.ok()) << pushed.status();
    return pushed.ok() ? *pushed : VersionInfo();
  }

  std::string BlobPath(const std::string& digest) const {
    return absl::StrCat(root_, "/blobs/sha256/", digest.substr(7, 2), "/", digest.substr(9));
  }
  std::string JournalPath() const { return root_ + "/refs/journal"; }
  std::vector<std::string> TempFiles() const {
    std::vector<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator(root_ + "/tmp")) {
      names.push_back(entry.path().filename().string());
    }
    return names;
  }

  std::string dir_;
  std::string root_;
  std::unique_ptr<DeltaStore> store_;
};

TEST_F(FileSystemStoreTest, LaysOutBlobsJournalAndLockUnderTheRoot) {
  const VersionInfo v = Push("summarize", "pack bytes");
  const std::string hex = v.digest.substr(7);
  EXPECT_EQ(ReadFileToString(absl::StrCat(root_, "/blobs/sha256/", hex.substr(0, 2), "/", hex.substr(2))).value(),
            "pack bytes");
  EXPECT_TRUE(FileExists(root_ + "/LOCK"));
  EXPECT_TRUE(TempFiles().empty());
  const std::string journal = ReadFileToString(JournalPath()).value();
  EXPECT_THAT(journal, HasSubstr(v.digest));
  EXPECT_EQ(journal.back(), '\n');
}

TEST_F(FileSystemStoreTest, SecondOpenOfTheSameRootIsFailedPrecondition) {
  absl::StatusOr<std::unique_ptr<DeltaStore>> second = OpenFileSystemStore(root_);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(second.status().message()), HasSubstr(root_));
  store_.reset();  // the lock goes with the store
  EXPECT_TRUE(OpenFileSystemStore(root_).ok());
}

TEST_F(FileSystemStoreTest, MissingRootIsNotFoundUnlessCreateIfMissing) {
  FileSystemStoreOptions options;
  options.create_if_missing = false;
  DS_EXPECT_CODE(OpenFileSystemStore(dir_ + "/absent", options), absl::StatusCode::kNotFound);
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/absent"));
  DS_EXPECT_OK(OpenFileSystemStore(dir_ + "/absent/nested"));
}

TEST_F(FileSystemStoreTest, DropsATornLastJournalLineAndKeepsEarlierOps) {
  const VersionInfo v1 = Push("summarize", "one");
  Push("summarize", "two");
  DS_ASSERT_OK(store_->SetLabel("acme", "summarize", "prod", v1.version));
  store_.reset();
  // A crash in the middle of appending the next line.
  WriteFile(JournalPath(), "0123456789abcdef {\"kind\":\"set_la", std::ios::app);
  Open();

  Ref prod{"acme", "summarize", 0, "prod", ""};
  EXPECT_EQ(store_->Resolve(prod).value().version, v1.version);
  EXPECT_EQ(store_->Resolve(Ref{"acme", "summarize", 0, "", ""}).value().version, 2);
  EXPECT_THAT(ReadFileToString(JournalPath()).value(), ::testing::Not(HasSubstr("0123456789abcdef")));
  // The store goes on from there, and that survives too.
  EXPECT_EQ(Push("summarize", "three").version, 3);
  Open();
  EXPECT_EQ(store_->Resolve(Ref{"acme", "summarize", 0, "", ""}).value().version, 3);
}

TEST_F(FileSystemStoreTest, DropsACompleteButGarbledLastJournalLine) {
  Push("summarize", "one");
  store_.reset();
  WriteFile(JournalPath(), "ffffffffffffffff {\"not\":\"an op\"}\n", std::ios::app);
  Open();
  EXPECT_EQ(store_->Resolve(Ref{"acme", "summarize", 0, "", ""}).value().version, 1);
}

TEST_F(FileSystemStoreTest, RefusesAJournalCorruptedBeforeItsLastLine) {
  Push("summarize", "one");
  Push("summarize", "two");
  Push("translate", "three");
  store_.reset();
  std::string journal = ReadFileToString(JournalPath()).value();
  journal[journal.find("summarize")] = 'S';  // the first line: its checksum no longer matches
  WriteFile(JournalPath(), journal);
  const absl::Status status = TryOpen();
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr(JournalPath()));
  EXPECT_THAT(std::string(status.message()), HasSubstr("line 1"));
}

TEST_F(FileSystemStoreTest, ABlobCorruptedOnDiskIsDataLossOnReadAndNotServed) {
  const VersionInfo v = Push("summarize", std::string(100000, 'x'));
  store_.reset();
  std::string bytes = ReadFileToString(BlobPath(v.digest)).value();
  bytes[5000] = 'y';
  WriteFile(BlobPath(v.digest), bytes);
  Open();

  for (int attempt = 0; attempt < 2; ++attempt) {  // it stays unserved
    absl::StatusOr<std::string> read = ReadBlob(*store_, v.digest);
    EXPECT_EQ(read.status().code(), absl::StatusCode::kDataLoss) << read.status();
    EXPECT_THAT(std::string(read.status().message()), HasSubstr(v.digest));
    EXPECT_THAT(std::string(read.status().message()), HasSubstr("corrupt on disk"));
  }
  // Pushing the pack again repairs it.
  EXPECT_EQ(Push("summarize", std::string(100000, 'x')).version, v.version);
  EXPECT_EQ(ReadBlob(*store_, v.digest).value(), std::string(100000, 'x'));
}

TEST_F(FileSystemStoreTest, VerifiesOnlyTheFirstReadUnlessVerifyEveryRead) {
  const VersionInfo v = Push("summarize", "original bytes");
  DS_ASSERT_OK(ReadBlob(*store_, v.digest));  // verified once
  WriteFile(BlobPath(v.digest), "Original bytes");
  // Verified on first load only: the corruption after it goes unnoticed (the documented trade-off).
  EXPECT_EQ(ReadBlob(*store_, v.digest).value(), "Original bytes");

  FileSystemStoreOptions options;
  options.verify_every_read = true;
  Open(options);
  DS_EXPECT_CODE(ReadBlob(*store_, v.digest), absl::StatusCode::kDataLoss);
}

TEST_F(FileSystemStoreTest, NoPartialBlobIsVisibleDuringAnUpload) {
  const std::string data(300000, 'p');
  std::unique_ptr<BlobWriter> writer = store_->NewBlobWriter("").value();
  DS_ASSERT_OK(writer->Append(absl::string_view(data).substr(0, 100000)));
  EXPECT_EQ(TempFiles().size(), 1u);
  EXPECT_TRUE(store_->ListBlobs().value().empty());
  DS_EXPECT_CODE(store_->StatBlob(Sha256Digest(data)), absl::StatusCode::kNotFound);
  DS_ASSERT_OK(writer->Append(absl::string_view(data).substr(100000)));
  DS_ASSERT_OK(writer->Commit());
  EXPECT_EQ(store_->StatBlob(Sha256Digest(data)).value().size, 300000);
  EXPECT_TRUE(TempFiles().empty());
}

TEST_F(FileSystemStoreTest, FailedAndAbandonedUploadsLeaveNothingBehind) {
  std::unique_ptr<BlobWriter> wrong = store_->NewBlobWriter(Sha256Digest("something else")).value();
  DS_ASSERT_OK(wrong->Append("these bytes"));
  DS_EXPECT_CODE(wrong->Commit(), absl::StatusCode::kDataLoss);
  {
    std::unique_ptr<BlobWriter> abandoned = store_->NewBlobWriter("").value();
    DS_ASSERT_OK(abandoned->Append("half a pack"));
  }
  FileSystemStoreOptions options;
  options.max_blob_bytes = 10;
  Open(options);
  std::unique_ptr<BlobWriter> big = store_->NewBlobWriter("").value();
  DS_EXPECT_CODE(big->Append("eleven char"), absl::StatusCode::kResourceExhausted);
  DS_EXPECT_CODE(big->Commit(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(TempFiles().empty());
  EXPECT_TRUE(store_->ListBlobs().value().empty());
}

TEST_F(FileSystemStoreTest, GcRemovesUploadFilesOfACrashAfterTheGracePeriodOnly) {
  WriteFile(root_ + "/tmp/upload.crashed", "half a pack");  // what a killed upload leaves
  std::unique_ptr<BlobWriter> live = store_->NewBlobWriter("").value();
  DS_ASSERT_OK(live->Append("an upload in progress"));

  GcOptions gc;
  gc.grace = absl::Hours(1);
  gc.now = absl::Now() + absl::Minutes(30);
  EXPECT_EQ(store_->CollectGarbage(gc).value().temp_files_removed, 0);
  EXPECT_EQ(TempFiles().size(), 2u);

  gc.now = absl::Now() + absl::Hours(2);
  EXPECT_EQ(store_->CollectGarbage(gc).value().temp_files_removed, 1);
  EXPECT_EQ(TempFiles().size(), 1u);  // the upload in progress keeps its file
  DS_EXPECT_OK(live->Commit());
}

TEST_F(FileSystemStoreTest, GcRemovesUnreferencedBlobsAfterTheGracePeriodOnly) {
  const VersionInfo kept = Push("summarize", "referenced");
  const BlobInfo loose = PutBlob(*store_, "unreferenced").value();
  GcOptions gc;
  gc.grace = absl::Hours(1);
  EXPECT_EQ(store_->CollectGarbage(gc).value().blobs_removed, 0);

  gc.now = absl::Now() + absl::Hours(2);
  const GcReport report = store_->CollectGarbage(gc).value();
  EXPECT_EQ(report.blobs_removed, 1);
  EXPECT_EQ(report.bytes_removed, loose.size);
  DS_EXPECT_CODE(store_->StatBlob(loose.digest), absl::StatusCode::kNotFound);
  DS_EXPECT_OK(store_->StatBlob(kept.digest));
}

TEST_F(FileSystemStoreTest, CommittingAnOldUnreferencedBlobAgainRestartsItsGracePeriod) {
  const BlobInfo blob = PutBlob(*store_, "pushed long ago").value();
  Age(BlobPath(blob.digest), absl::Hours(5));
  DS_ASSERT_OK(PutBlob(*store_, "pushed long ago"));  // about to be referenced by a new version
  GcOptions gc;
  gc.grace = absl::Hours(1);
  EXPECT_EQ(store_->CollectGarbage(gc).value().blobs_removed, 0);
  DS_EXPECT_OK(store_->AddVersion("acme", "summarize", blob.digest));
}

TEST_F(FileSystemStoreTest, IgnoresStrayFilesUnderBlobs) {
  const VersionInfo v = Push("summarize", "real");
  std::filesystem::create_directories(root_ + "/blobs/sha256/zz");
  WriteFile(root_ + "/blobs/sha256/zz/not-a-digest", "stray");
  WriteFile(BlobPath(v.digest) + ".bak", "stray");
  const std::vector<BlobInfo> blobs = store_->ListBlobs().value();
  ASSERT_EQ(blobs.size(), 1u);
  EXPECT_EQ(blobs[0].digest, v.digest);
}

TEST_F(FileSystemStoreTest, ManyThreadsPushAndReadTheSameAndDifferentPacks) {
  constexpr int kThreads = 8;
  constexpr int kPushesPerThread = 20;
  std::mt19937_64 rng(42);
  std::vector<std::string> shared_packs;
  for (int i = 0; i < 4; ++i) shared_packs.push_back(RandomBytes(rng, 1000 + rng() % 60000));

  // What each thread pushed: task -> digests.
  std::vector<std::map<std::string, std::set<std::string>>> pushed(kThreads);
  std::vector<std::set<std::string>> packs(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(1000 + t);
      for (int i = 0; i < kPushesPerThread; ++i) {
        const std::string data =
            rng() % 2 ? shared_packs[rng() % shared_packs.size()] : RandomBytes(rng, rng() % 60000);
        const std::string task = rng() % 2 ? "shared" : absl::StrCat("own-", t);
        absl::StatusOr<VersionInfo> v = PushPack(*store_, "acme", task, data);
        ASSERT_TRUE(v.ok()) << v.status();
        ASSERT_EQ(v->digest, Sha256Digest(data));
        pushed[t][task].insert(v->digest);
        packs[t].insert(v->digest);
        absl::StatusOr<std::string> read = ReadBlob(*store_, v->digest);
        ASSERT_TRUE(read.ok()) << read.status();
        EXPECT_EQ(*read, data);
        // Someone else's shared pack, read while others write.
        const std::string other = shared_packs[rng() % shared_packs.size()];
        absl::StatusOr<std::string> other_read = ReadBlob(*store_, Sha256Digest(other));
        if (other_read.ok()) {
          EXPECT_EQ(*other_read, other);
        } else {
          EXPECT_TRUE(absl::IsNotFound(other_read.status())) << other_read.status();
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();

  // One blob per distinct pack; one version per distinct pack of each task (pushing again is idempotent).
  std::set<std::string> all_packs;
  std::map<std::string, std::set<std::string>> by_task;
  for (int t = 0; t < kThreads; ++t) {
    all_packs.insert(packs[t].begin(), packs[t].end());
    for (const auto& [task, digests] : pushed[t]) by_task[task].insert(digests.begin(), digests.end());
  }
  EXPECT_EQ(store_->ListBlobs().value().size(), all_packs.size());
  for (const auto& [task, digests] : by_task) {
    ListOptions list;
    list.tenant = "acme";
    list.task = task;
    list.page_size = 1000;
    std::set<std::string> listed;
    const ListPage page = store_->List(list).value();
    for (const VersionInfo& v : page.versions) {
      EXPECT_TRUE(listed.insert(v.digest).second) << task << " has two versions of " << v.digest;
    }
    EXPECT_EQ(listed, digests) << task;
  }
  EXPECT_TRUE(TempFiles().empty());
}

}  // namespace
}  // namespace store
}  // namespace deltaserve

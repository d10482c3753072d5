// Crash test of the filesystem store: fs_store_crash_child mutates a store and is killed with SIGKILL at random
// points, again and again over the same root. After each kill the store must open cleanly; everything the child
// reported as acknowledged must be there and verify; no blob may be visible that does not hash to its name; and
// GC must remove what the kill left behind.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "delta_store/fs_store.h"
#include "delta_store/store.h"
#include "gtest/gtest.h"
#include "server/common/sha256.h"

extern char** environ;

namespace deltaserve {
namespace store {
namespace {

// Rounds of spawn, kill and verify; DS_CRASH_ROUNDS overrides (the issue asks for at least 50).
int Rounds() {
  const char* env = std::getenv("DS_CRASH_ROUNDS");
  int rounds = 0;
  return env != nullptr && absl::SimpleAtoi(env, &rounds) && rounds > 0 ? rounds : 60;
}

using TaskKey = std::pair<std::string, std::string>;                 // (tenant, task)
using VersionKey = std::tuple<std::string, std::string, int64_t>;    // (tenant, task, version)
using LabelKey = std::tuple<std::string, std::string, std::string>;  // (tenant, task, label)

// What the child acknowledged, over all rounds.
struct Model {
  enum class State { kLive, kMaybeDeleted, kDeleted };
  struct Version {
    std::string digest;
    State state = State::kLive;
  };
  struct Label {
    int64_t acked = 0;            // the last acknowledged target; 0 = none yet
    std::set<int64_t> in_flight;  // targets of moves since then that were not acknowledged
  };
  std::map<VersionKey, Version> versions;
  std::map<LabelKey, Label> labels;
  int64_t pushes = 0;
  int64_t label_moves = 0;
  int64_t deletes = 0;

  // Applies one line of the child's report; false for a line it does not understand.
  bool Apply(const std::string& line) {
    std::vector<std::string> f = absl::StrSplit(line, ' ');
    int64_t v = 0;
    if (f[0] == "READY") return f.size() == 1;
    if (f[0] == "PUSH" && f.size() == 5 && absl::SimpleAtoi(f[3], &v)) {
      Version& version = versions[{f[1], f[2], v}];
      if (!version.digest.empty() && version.digest != f[4]) return false;  // a version's blob never changes
      version = Version{f[4], State::kLive};
      ++pushes;
      return true;
    }
    if ((f[0] == "TRY" || f[0] == "LABEL") && f.size() == 5 && absl::SimpleAtoi(f[4], &v)) {
      Label& label = labels[{f[1], f[2], f[3]}];
      if (f[0] == "TRY") {
        label.in_flight.insert(v);
      } else {
        label = Label{v, {}};
        ++label_moves;
      }
      return true;
    }
    if ((f[0] == "TRYDEL" || f[0] == "DELETE") && f.size() == 4 && absl::SimpleAtoi(f[3], &v)) {
      auto it = versions.find({f[1], f[2], v});
      if (it == versions.end()) return true;  // a version whose push was in flight
      it->second.state = f[0] == "TRYDEL" ? State::kMaybeDeleted : State::kDeleted;
      deletes += f[0] == "DELETE";
      return true;
    }
    return false;
  }
};

// The child's stdout, read until the deadline or EOF (fd < 0 afterwards at EOF). Returns whether it saw `wanted`.
bool ReadUntil(int& fd, absl::Time deadline, std::string& out, const std::string& wanted = "") {
  char buffer[4096];
  while (fd >= 0) {
    if (!wanted.empty() && out.find(wanted) != std::string::npos) return true;
    const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (ms <= 0 && deadline != absl::InfiniteFuture()) break;
    pollfd p{fd, POLLIN, 0};
    const int ready = ::poll(&p, 1, deadline == absl::InfiniteFuture() ? -1 : static_cast<int>(ms));
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) break;
    const ssize_t n = ::read(fd, buffer, sizeof(buffer));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      ::close(fd);
      fd = -1;
      break;
    }
    out.append(buffer, static_cast<size_t>(n));
  }
  return !wanted.empty() && out.find(wanted) != std::string::npos;
}

std::string ReadLog(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

class FileSystemStoreCrashTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = ::testing::TempDir() + "fs_store_crash.XXXXXX";
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
    root_ = dir_ + "/store";
  }
  void TearDown() override {
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }

  // Runs the child with `seed` and kills it: after `delay` from its start, or from its READY when `after_ready`.
  // Returns its report.
  std::string RunAndKill(uint64_t seed, absl::Duration delay, bool after_ready) {
    int fds[2];
    EXPECT_EQ(::pipe2(fds, O_CLOEXEC), 0);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
    posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, log_path().c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const std::string child = DS_CRASH_CHILD;
    const std::string seed_text = std::to_string(seed);
    char* argv[] = {const_cast<char*>(child.c_str()), const_cast<char*>(root_.c_str()),
                    const_cast<char*>(seed_text.c_str()), nullptr};
    pid_t pid = -1;
    const int spawned = ::posix_spawn(&pid, child.c_str(), &actions, nullptr, argv, environ);
    posix_spawn_file_actions_destroy(&actions);
    ::close(fds[1]);
    int fd = fds[0];
    std::string report;
    if (spawned != 0) {
      ADD_FAILURE() << "cannot start " << child << ": " << std::strerror(spawned);
      ::close(fd);
      return report;
    }
    absl::Time deadline = absl::Now() + delay;
    if (after_ready) {
      EXPECT_TRUE(ReadUntil(fd, absl::Now() + absl::Seconds(20), report, "READY\n"))
          << "the child did not open the store:\n"
          << ReadLog(log_path());
      deadline = absl::Now() + delay;
    }
    ReadUntil(fd, deadline, report);
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    ReadUntil(fd, absl::InfiniteFuture(), report);  // what it wrote before it died
    EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)
        << "the child exited by itself (status " << status << "):\n"
        << ReadLog(log_path());
    return report;
  }

  // Checks the store at root_ against everything acknowledged so far, then collects its garbage.
  void Verify(const Model& model) {
    FileSystemStoreOptions options;
    options.verify_every_read = true;
    absl::StatusOr<std::unique_ptr<DeltaStore>> opened = OpenFileSystemStore(root_, options);
    ASSERT_TRUE(opened.ok()) << "the store does not open after a kill: " << opened.status();
    DeltaStore& store = **opened;

    std::map<TaskKey, int64_t> highest_live;
    for (const auto& [key, version] : model.versions) {
      const auto& [tenant, task, number] = key;
      Ref ref;
      ref.tenant = tenant;
      ref.task = task;
      ref.version = number;
      absl::StatusOr<VersionInfo> resolved = store.Resolve(ref);
      const std::string name = FormatRef(ref);
      switch (version.state) {
        case Model::State::kLive:
          ASSERT_TRUE(resolved.ok()) << "acknowledged push " << name << " is lost: " << resolved.status();
          EXPECT_EQ(resolved->digest, version.digest) << name;
          highest_live[{tenant, task}] = std::max(highest_live[{tenant, task}], number);
          break;
        case Model::State::kDeleted:
          EXPECT_TRUE(absl::IsNotFound(resolved.status())) << "acknowledged delete of " << name << " is lost";
          break;
        case Model::State::kMaybeDeleted:
          EXPECT_TRUE(resolved.ok() || absl::IsNotFound(resolved.status())) << resolved.status();
          if (resolved.ok()) {
            EXPECT_EQ(resolved->digest, version.digest) << name;
          }
          break;
      }
    }
    for (const auto& [key, label] : model.labels) {
      const auto& [tenant, task, name] = key;
      Ref ref;
      ref.tenant = tenant;
      ref.task = task;
      ref.label = name;
      absl::StatusOr<VersionInfo> resolved = store.Resolve(ref);
      if (!resolved.ok()) {
        EXPECT_EQ(label.acked, 0) << FormatRef(ref) << " is lost: " << resolved.status();
        continue;
      }
      EXPECT_TRUE(resolved->version == label.acked || label.in_flight.count(resolved->version) > 0)
          << FormatRef(ref) << " points at version " << resolved->version << ", acknowledged " << label.acked;
    }
    for (const auto& [task, highest] : highest_live) {
      Ref latest;
      latest.tenant = task.first;
      latest.task = task.second;
      absl::StatusOr<VersionInfo> resolved = store.Resolve(latest);
      ASSERT_TRUE(resolved.ok()) << resolved.status();
      EXPECT_GE(resolved->version, highest) << FormatRef(latest) << " is behind an acknowledged push";
    }

    // Every visible blob hashes to its name (no partial blob), and every acknowledged live blob is visible.
    absl::StatusOr<std::vector<BlobInfo>> blobs = store.ListBlobs();
    ASSERT_TRUE(blobs.ok()) << blobs.status();
    std::set<std::string> visible;
    for (const BlobInfo& blob : *blobs) {
      absl::StatusOr<std::string> data = ReadBlob(store, blob.digest);
      ASSERT_TRUE(data.ok()) << data.status();
      EXPECT_EQ(Sha256Digest(*data), blob.digest) << "a partial or corrupt blob is visible";
      EXPECT_EQ(static_cast<int64_t>(data->size()), blob.size);
      visible.insert(blob.digest);
    }
    for (const auto& [key, version] : model.versions) {
      if (version.state == Model::State::kLive) {
        EXPECT_EQ(visible.count(version.digest), 1u) << version.digest;
      }
    }

    // GC "a day later" removes the upload files the kill interrupted and the blobs no version references.
    GcOptions gc;
    gc.now = absl::Now() + absl::Hours(24);
    absl::StatusOr<GcReport> report = store.CollectGarbage(gc);
    ASSERT_TRUE(report.ok()) << report.status();
    temp_files_collected_ += report->temp_files_removed;
    blobs_collected_ += report->blobs_removed;
    EXPECT_TRUE(std::filesystem::is_empty(root_ + "/tmp")) << "GC left upload files behind";
    std::set<std::string> referenced;
    ListOptions list;
    list.page_size = 1000;
    do {
      absl::StatusOr<ListPage> page = store.List(list);
      ASSERT_TRUE(page.ok()) << page.status();
      for (const VersionInfo& v : page->versions) referenced.insert(v.digest);
      list.page_token = page->next_page_token;
    } while (!list.page_token.empty());
    blobs = store.ListBlobs();
    ASSERT_TRUE(blobs.ok()) << blobs.status();
    std::set<std::string> kept;
    for (const BlobInfo& blob : *blobs) kept.insert(blob.digest);
    EXPECT_EQ(kept, referenced) << "after GC the blobs should be exactly the referenced ones";
  }

  std::string log_path() const { return dir_ + "/child.log"; }

  std::string dir_;
  std::string root_;
  int64_t temp_files_collected_ = 0;
  int64_t blobs_collected_ = 0;
};

TEST_F(FileSystemStoreCrashTest, AcknowledgedWritesSurviveSigkillAtRandomPoints) {
  const uint64_t seed = static_cast<uint64_t>(absl::ToUnixNanos(absl::Now()));
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937_64 rng(seed);
  Model model;
  const int rounds = Rounds();
  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE(absl::StrCat("round ", round));
    // Most kills land while the child pushes and moves labels; one in five while it opens (recovery, compaction).
    const bool after_ready = round % 5 != 4;
    const absl::Duration delay = after_ready ? absl::Milliseconds(2 + static_cast<int64_t>(rng() % 99))
                                             : absl::Milliseconds(static_cast<int64_t>(rng() % 30));
    const std::string report = RunAndKill(rng(), delay, after_ready);
    std::vector<std::string> lines = absl::StrSplit(report, '\n');
    lines.pop_back();  // "" after the last newline (each line is one atomic write)
    for (const std::string& line : lines) ASSERT_TRUE(model.Apply(line)) << "bad report line: " << line;
    Verify(model);
    if (HasFatalFailure()) return;
  }
  std::cout << "acknowledged over " << rounds << " kills: " << model.pushes << " pushes, " << model.label_moves
            << " label moves, " << model.deletes << " version deletes; GC collected " << temp_files_collected_
            << " interrupted uploads and " << blobs_collected_ << " unreferenced blobs" << std::endl;
  EXPECT_GE(model.pushes, rounds / 4) << "the child was killed before it did much; the test proves little";
}

}  // namespace
}  // namespace store
}  // namespace deltaserve

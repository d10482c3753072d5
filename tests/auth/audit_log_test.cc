// Unit tests of the JSON-lines audit log: the line format, appending, file mode, whole lines under concurrency.
#include "server/auth/audit_log.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace deltaserve {
namespace auth {
namespace {

class AuditLogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::testing::TempDir() + "audit_log_test.XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr) << tmpl;
    dir_ = tmpl;
  }
  void TearDown() override { std::system(("rm -rf '" + dir_ + "'").c_str()); }

  // The file's lines, each parsed (a line that is not valid JSON fails the test).
  static std::vector<nlohmann::json> ReadLines(const std::string& path) {
    std::ifstream in(path);
    std::vector<nlohmann::json> lines;
    std::string line;
    while (std::getline(in, line)) {
      nlohmann::json parsed = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      EXPECT_FALSE(parsed.is_discarded()) << "not JSON: " << line;
      lines.push_back(std::move(parsed));
    }
    return lines;
  }

  static AuditEvent Event(const std::string& action, const std::string& target) {
    AuditEvent event;
    event.time = absl::FromUnixMicros(1'795'976'401'123'456);  // 2026-11-29T18:20:01.123456Z
    event.principal = "token:3f9a1c2b7d0e";
    event.caller_tenant = "acme";
    event.action = action;
    event.tenant = "acme";
    event.target = target;
    event.detail = "version 3";
    event.peer = "ipv4:10.0.0.7:51234";
    return event;
  }

  std::string dir_;
};

TEST_F(AuditLogTest, WritesOneJsonObjectPerLineWithAllFields) {
  const std::string path = dir_ + "/audit.log";
  absl::StatusOr<std::unique_ptr<AuditLog>> log = AuditLog::Open({path});
  ASSERT_TRUE(log.ok()) << log.status();
  (*log)->Record(Event("label.set", "sentiment:prod"));
  AuditEvent denied = Event("delta.push", "sentiment@4");
  denied.code = absl::StatusCode::kPermissionDenied;
  denied.message = "tenant \"acme\" may not act for \"globex\"";
  (*log)->Record(denied);

  std::vector<nlohmann::json> lines = ReadLines(path);
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(lines[0]["time"], "2026-11-29T18:20:01.123456Z");
  EXPECT_EQ(lines[0]["principal"], "token:3f9a1c2b7d0e");
  EXPECT_EQ(lines[0]["caller_tenant"], "acme");
  EXPECT_EQ(lines[0]["action"], "label.set");
  EXPECT_EQ(lines[0]["tenant"], "acme");
  EXPECT_EQ(lines[0]["target"], "sentiment:prod");
  EXPECT_EQ(lines[0]["detail"], "version 3");
  EXPECT_EQ(lines[0]["peer"], "ipv4:10.0.0.7:51234");
  EXPECT_EQ(lines[0]["code"], "OK");
  EXPECT_EQ(lines[0]["message"], "");
  EXPECT_EQ(lines[1]["code"], "PERMISSION_DENIED");
  EXPECT_EQ(lines[1]["message"], "tenant \"acme\" may not act for \"globex\"");
  EXPECT_EQ((*log)->write_errors(), 0);
}

TEST_F(AuditLogTest, JsonLineKeepsTheDocumentedFieldOrder) {
  EXPECT_EQ(AuditLog::ToJsonLine(Event("label.set", "sentiment:prod")),
            "{\"time\":\"2026-11-29T18:20:01.123456Z\",\"principal\":\"token:3f9a1c2b7d0e\",\"caller_tenant\":\"acme\","
            "\"action\":\"label.set\",\"tenant\":\"acme\",\"target\":\"sentiment:prod\",\"detail\":\"version 3\","
            "\"peer\":\"ipv4:10.0.0.7:51234\",\"code\":\"OK\",\"message\":\"\"}");
}

TEST_F(AuditLogTest, AppendsAcrossReopen) {
  const std::string path = dir_ + "/audit.log";
  {
    absl::StatusOr<std::unique_ptr<AuditLog>> log = AuditLog::Open({path});
    ASSERT_TRUE(log.ok()) << log.status();
    (*log)->Record(Event("job.submit", "job-1"));
    (*log)->Record(Event("job.cancel", "job-1"));
  }
  {
    AuditLog::Options options;
    options.path = path;
    options.sync = true;
    absl::StatusOr<std::unique_ptr<AuditLog>> log = AuditLog::Open(options);
    ASSERT_TRUE(log.ok()) << log.status();
    (*log)->Record(Event("version.delete", "sentiment@1"));
  }
  std::vector<nlohmann::json> lines = ReadLines(path);
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_EQ(lines[0]["action"], "job.submit");
  EXPECT_EQ(lines[1]["action"], "job.cancel");
  EXPECT_EQ(lines[2]["action"], "version.delete");
}

TEST_F(AuditLogTest, CreatesANewFileWithMode0600) {
  const std::string path = dir_ + "/audit.log";
  const mode_t old_umask = ::umask(0);  // the mode must not depend on a permissive umask
  absl::StatusOr<std::unique_ptr<AuditLog>> log = AuditLog::Open({path});
  ::umask(old_umask);
  ASSERT_TRUE(log.ok()) << log.status();
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

TEST_F(AuditLogTest, ConcurrentRecordsGiveWholeLines) {
  const std::string path = dir_ + "/audit.log";
  absl::StatusOr<std::unique_ptr<AuditLog>> log = AuditLog::Open({path});
  ASSERT_TRUE(log.ok()) << log.status();
  constexpr int kThreads = 8;
  constexpr int kPerThread = 300;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        AuditEvent event = Event("delta.push", absl::StrCat("task", t, "@", i));
        event.detail = std::string(100 + (i * 37) % 900, 'x');  // lines of varied length
        (*log)->Record(event);
      }
    });
  }
  for (std::thread& thread : threads) thread.join();

  std::vector<nlohmann::json> lines = ReadLines(path);
  ASSERT_EQ(lines.size(), static_cast<size_t>(kThreads * kPerThread));
  std::vector<int> per_thread(kThreads, 0);
  for (const nlohmann::json& line : lines) {
    ASSERT_TRUE(line.is_object());
    const std::string target = line.value("target", "");
    ASSERT_EQ(target.rfind("task", 0), 0u) << target;
    ++per_thread[std::stoi(target.substr(4))];
  }
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(per_thread[t], kPerThread) << t;
  EXPECT_EQ((*log)->write_errors(), 0);
}

TEST_F(AuditLogTest, InvalidUtf8StillGivesAValidLine) {
  const std::string path = dir_ + "/audit.log";
  absl::StatusOr<std::unique_ptr<AuditLog>> log = AuditLog::Open({path});
  ASSERT_TRUE(log.ok()) << log.status();
  AuditEvent event = Event("dataset.upload", std::string("bad\xff\xfe name"));
  event.message = std::string("truncated \xe2\x82");
  event.detail = "control \x01 and quote \" and newline \n";
  (*log)->Record(event);
  (*log)->Record(Event("label.delete", "after"));

  std::vector<nlohmann::json> lines = ReadLines(path);
  ASSERT_EQ(lines.size(), 2u);
  const std::string target = lines[0]["target"];
  EXPECT_EQ(target.substr(0, 3), "bad");
  EXPECT_NE(target.find("\xef\xbf\xbd"), std::string::npos) << "U+FFFD replaces the bad bytes";
  EXPECT_EQ(lines[0]["detail"], "control \x01 and quote \" and newline \n");
  EXPECT_EQ(lines[1]["target"], "after");
}

TEST_F(AuditLogTest, MissingDirectoryIsAnErrorFromOpen) {
  absl::StatusOr<std::unique_ptr<AuditLog>> log = AuditLog::Open({dir_ + "/no/such/dir/audit.log"});
  ASSERT_FALSE(log.ok());
  EXPECT_EQ(log.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(log.status().message(), ::testing::HasSubstr("/no/such/dir/audit.log"));
}

TEST_F(AuditLogTest, MemoryOnlyLogKeepsTheMostRecentEvents) {
  AuditLog::Options options;
  options.keep_in_memory = 3;
  absl::StatusOr<std::unique_ptr<AuditLog>> log = AuditLog::Open(options);
  ASSERT_TRUE(log.ok()) << log.status();
  EXPECT_TRUE((*log)->events().empty());
  for (int i = 0; i < 10; ++i) {
    (*log)->Record(Event("job.submit", absl::StrCat("job-", i)));
    const std::vector<AuditEvent> events = (*log)->events();
    ASSERT_EQ(events.size(), static_cast<size_t>(std::min(i + 1, 3))) << i;
    EXPECT_EQ(events.back().target, absl::StrCat("job-", i));
  }
  const std::vector<AuditEvent> events = (*log)->events();
  ASSERT_EQ(events.size(), 3u);
  EXPECT_EQ(events[0].target, "job-7");
  EXPECT_EQ(events[1].target, "job-8");
  EXPECT_EQ(events[2].target, "job-9");
  EXPECT_EQ((*log)->write_errors(), 0);
}

TEST_F(AuditLogTest, KeepsNoEventsInMemoryByDefault) {
  absl::StatusOr<std::unique_ptr<AuditLog>> log = AuditLog::Open({});
  ASSERT_TRUE(log.ok()) << log.status();
  (*log)->Record(Event("job.submit", "job-1"));
  EXPECT_TRUE((*log)->events().empty());
}

TEST_F(AuditLogTest, WriteErrorsAreCountedNotReturned) {
  if (::access("/dev/full", W_OK) != 0) GTEST_SKIP() << "no /dev/full";
  AuditLog::Options options;
  options.path = "/dev/full";  // every write fails with ENOSPC
  options.keep_in_memory = 5;
  absl::StatusOr<std::unique_ptr<AuditLog>> log = AuditLog::Open(options);
  ASSERT_TRUE(log.ok()) << log.status();
  (*log)->Record(Event("job.submit", "job-1"));
  (*log)->Record(Event("job.submit", "job-2"));
  EXPECT_EQ((*log)->write_errors(), 2);
  EXPECT_EQ((*log)->events().size(), 2u);  // still kept in memory
}

}  // namespace
}  // namespace auth
}  // namespace deltaserve

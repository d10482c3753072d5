// RefTable: planning, applying (and re-validating) ops, quotas, paging, the journal encoding and snapshots.
#include "delta_store/ref_table.h"

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/common/sha256.h"

namespace deltaserve {
namespace store {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Code = absl::StatusCode;

const absl::Time kTime = absl::FromUnixMicros(1700000000123456);

std::string D(const std::string& content) { return Sha256Digest(content); }

// Plans and applies an AddVersion; returns the version number (0 when the digest was already a version).
int64_t Add(RefTable& table, const std::string& tenant, const std::string& task, const std::string& content,
            const QuotaOptions& quotas = {}) {
  VersionInfo existing;
  absl::StatusOr<std::optional<RefOp>> op =
      table.PlanAddVersion(tenant, task, D(content), content.size(), kTime, quotas, &existing);
  EXPECT_TRUE(op.ok()) << op.status();
  if (!op.ok() || !op->has_value()) return 0;
  absl::Status applied = table.Apply(**op);
  EXPECT_TRUE(applied.ok()) << applied;
  return (*op)->version;
}

// The table's whole state as text: its snapshot, encoded.
std::string State(const RefTable& table) {
  std::vector<std::string> lines;
  for (const RefOp& op : table.Snapshot()) lines.push_back(EncodeRefOp(op));
  return absl::StrJoin(lines, "\n");
}

RefOp Op(RefOp::Kind kind, const std::string& tenant, const std::string& task, int64_t version) {
  RefOp op;
  op.kind = kind;
  op.tenant = tenant;
  op.task = task;
  op.version = version;
  op.time = kTime;
  return op;
}

TEST(RefTableTest, PlanningChangesNothingUntilApplied) {
  RefTable table;
  absl::StatusOr<std::optional<RefOp>> op =
      table.PlanAddVersion("acme", "a", D("one"), 3, kTime, QuotaOptions(), nullptr);
  ASSERT_TRUE(op.ok()) << op.status();
  ASSERT_TRUE(op->has_value());
  EXPECT_EQ((*op)->version, 1);
  EXPECT_EQ((*op)->time, kTime);
  EXPECT_EQ(table.Resolve(Ref{"acme", "a", 0, "", ""}).status().code(), Code::kNotFound);
  EXPECT_FALSE(table.IsReferenced(D("one")));

  ASSERT_TRUE(table.Apply(**op).ok());
  absl::StatusOr<VersionInfo> info = table.Resolve(Ref{"acme", "a", 0, "", ""});
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->version, 1);
  EXPECT_EQ(info->size, 3);
  EXPECT_EQ(info->created, kTime);
  EXPECT_TRUE(table.IsReferenced(D("one")));
  EXPECT_THAT(table.ReferencedDigests(), ElementsAre(D("one")));
}

TEST(RefTableTest, PlanAddVersionReturnsTheExistingVersionForAKnownDigest) {
  RefTable table;
  Add(table, "acme", "a", "one");
  Add(table, "acme", "a", "two");
  VersionInfo existing;
  absl::StatusOr<std::optional<RefOp>> op =
      table.PlanAddVersion("acme", "a", D("one"), 3, kTime, QuotaOptions(), &existing);
  ASSERT_TRUE(op.ok()) << op.status();
  EXPECT_FALSE(op->has_value());
  EXPECT_EQ(existing.version, 1);
  EXPECT_EQ(existing.digest, D("one"));
}

TEST(RefTableTest, QuotaErrorNamesTenantUsageAndLimitAndWhatToDo) {
  RefTable table;
  QuotaOptions quotas;
  quotas.per_tenant["acme"].max_bytes = 10;
  quotas.default_quota.max_versions = 1;
  EXPECT_EQ(quotas.For("acme").max_bytes, 10);
  EXPECT_EQ(quotas.For("other").max_versions, 1);

  Add(table, "acme", "a", "123456", quotas);
  absl::Status bytes = table.PlanAddVersion("acme", "a", D("12345"), 5, kTime, quotas, nullptr).status();
  EXPECT_EQ(bytes.code(), Code::kResourceExhausted);
  EXPECT_THAT(bytes.message(), HasSubstr("\"acme\""));
  EXPECT_THAT(bytes.message(), HasSubstr("usage of 6 bytes"));
  EXPECT_THAT(bytes.message(), HasSubstr("limit: 10"));
  EXPECT_THAT(bytes.message(), HasSubstr("delete versions"));
  // The same blob in another task adds no bytes.
  EXPECT_EQ(Add(table, "acme", "b", "123456", quotas), 1);

  Add(table, "other", "a", "x", quotas);
  absl::Status versions = table.PlanAddVersion("other", "b", D("y"), 1, kTime, quotas, nullptr).status();
  EXPECT_EQ(versions.code(), Code::kResourceExhausted);
  EXPECT_THAT(versions.message(), HasSubstr("\"other\""));
  EXPECT_THAT(versions.message(), HasSubstr("usage: 1 versions"));
  EXPECT_THAT(versions.message(), HasSubstr("delete versions"));
}

TEST(RefTableTest, QuotaLookupOverridesTheDefaultPerTenant) {
  QuotaOptions quotas;
  quotas.default_quota = Quota{1000, 5};
  quotas.per_tenant["acme"] = Quota{500, 3};
  quotas.lookup = [](const std::string& tenant) -> std::optional<Quota> {
    if (tenant == "acme") return Quota{10, 0};  // bytes only: versions stay per_tenant's
    if (tenant == "other") return Quota{0, 1};  // versions only: bytes stay default_quota's
    return std::nullopt;
  };
  EXPECT_EQ(quotas.For("acme").max_bytes, 10);
  EXPECT_EQ(quotas.For("acme").max_versions, 3);
  EXPECT_EQ(quotas.For("other").max_bytes, 1000);
  EXPECT_EQ(quotas.For("other").max_versions, 1);
  EXPECT_EQ(quotas.For("nobody").max_bytes, 1000);
  EXPECT_EQ(quotas.For("nobody").max_versions, 5);

  RefTable table;
  Add(table, "acme", "a", "123456", quotas);
  absl::Status bytes = table.PlanAddVersion("acme", "a", D("12345"), 5, kTime, quotas, nullptr).status();
  EXPECT_EQ(bytes.code(), Code::kResourceExhausted);
  EXPECT_THAT(bytes.message(), HasSubstr("limit: 10"));
  Add(table, "other", "a", "x", quotas);
  absl::Status versions = table.PlanAddVersion("other", "b", D("y"), 1, kTime, quotas, nullptr).status();
  EXPECT_EQ(versions.code(), Code::kResourceExhausted);
  EXPECT_THAT(versions.message(), HasSubstr("usage: 1 versions, limit: 1"));
}

TEST(RefTableTest, QuotaLookupChangesTakeEffectOnTheNextPush) {
  int64_t max_versions = 1;
  QuotaOptions quotas;
  quotas.lookup = [&max_versions](const std::string&) { return std::optional<Quota>(Quota{0, max_versions}); };
  RefTable table;
  EXPECT_EQ(Add(table, "acme", "a", "one", quotas), 1);
  EXPECT_EQ(table.PlanAddVersion("acme", "a", D("two"), 3, kTime, quotas, nullptr).status().code(),
            Code::kResourceExhausted);
  max_versions = 2;
  EXPECT_EQ(Add(table, "acme", "a", "two", quotas), 2);
  max_versions = 0;  // "no override": the static settings (unlimited) apply again
  EXPECT_EQ(Add(table, "acme", "a", "three", quotas), 3);
}

TEST(RefTableTest, EmptyLookupKeepsStaticQuotas) {
  QuotaOptions quotas;
  quotas.default_quota = Quota{1000, 5};
  quotas.per_tenant["acme"] = Quota{500, 3};
  EXPECT_EQ(quotas.For("acme").max_bytes, 500);
  EXPECT_EQ(quotas.For("acme").max_versions, 3);
  EXPECT_EQ(quotas.For("other").max_bytes, 1000);
  quotas.lookup = [](const std::string&) { return std::optional<Quota>(); };  // nullopt: no opinion
  EXPECT_EQ(quotas.For("acme").max_bytes, 500);
  EXPECT_EQ(quotas.For("acme").max_versions, 3);
  EXPECT_EQ(quotas.For("other").max_versions, 5);
  quotas.lookup = [](const std::string&) { return std::optional<Quota>(Quota()); };  // all zero: no override
  EXPECT_EQ(quotas.For("acme").max_bytes, 500);
  EXPECT_EQ(quotas.For("other").max_versions, 5);
}

TEST(RefTableTest, ApplyRevalidatesAndLeavesTheTableUnchangedOnError) {
  RefTable table;
  Add(table, "acme", "a", "one");
  Add(table, "acme", "a", "two");
  ASSERT_TRUE(table.Apply([] {
                RefOp op = Op(RefOp::Kind::kSetLabel, "acme", "a", 1);
                op.label = "prod";
                return op;
              }())
                  .ok());
  const std::string before = State(table);

  struct Case {
    RefOp op;
    Code code;
  };
  std::vector<Case> cases;
  RefOp add = Op(RefOp::Kind::kAddVersion, "acme", "a", 3);
  add.digest = D("three");
  RefOp op = add;
  op.tenant = "../etc";
  cases.push_back({op, Code::kInvalidArgument});
  op = add;
  op.task = "A";
  cases.push_back({op, Code::kInvalidArgument});
  op = add;
  op.digest = "sha256:nothex";
  cases.push_back({op, Code::kInvalidArgument});
  op = add;
  op.size = -1;
  cases.push_back({op, Code::kInvalidArgument});
  op = add;
  op.version = 2;  // numbers are never reused
  cases.push_back({op, Code::kFailedPrecondition});
  op = add;
  op.digest = D("one");  // already version 1
  cases.push_back({op, Code::kFailedPrecondition});
  op = Op(RefOp::Kind::kSetLabel, "acme", "a", 2);
  op.label = "latest";
  cases.push_back({op, Code::kInvalidArgument});
  op.label = "42";
  cases.push_back({op, Code::kInvalidArgument});
  op.label = "canary";
  op.version = 7;
  cases.push_back({op, Code::kNotFound});
  op.version = 0;  // would otherwise resolve as "latest"
  cases.push_back({op, Code::kInvalidArgument});
  op = Op(RefOp::Kind::kDeleteLabel, "acme", "a", 0);
  op.label = "canary";
  cases.push_back({op, Code::kNotFound});
  cases.push_back({Op(RefOp::Kind::kDeleteVersion, "acme", "a", 1), Code::kFailedPrecondition});  // "prod"
  cases.push_back({Op(RefOp::Kind::kDeleteVersion, "acme", "a", 9), Code::kNotFound});
  cases.push_back({Op(RefOp::Kind::kDeleteVersion, "acme", "a", 0), Code::kInvalidArgument});
  cases.push_back({Op(RefOp::Kind::kDeleteVersion, "acme", "b", 1), Code::kNotFound});
  cases.push_back({Op(RefOp::Kind::kReserveVersions, "acme", "a", 0), Code::kInvalidArgument});
  for (const Case& c : cases) {
    absl::Status status = table.Apply(c.op);
    EXPECT_EQ(status.code(), c.code) << EncodeRefOp(c.op) << ": " << status;
    EXPECT_EQ(State(table), before) << EncodeRefOp(c.op);
  }
}

TEST(RefTableTest, DeleteVersionNamesTheLabelsInTheWay) {
  RefTable table;
  Add(table, "acme", "a", "one");
  for (const char* label : {"prod", "canary"}) {
    absl::StatusOr<RefOp> op = table.PlanSetLabel("acme", "a", label, 1, kTime);
    ASSERT_TRUE(op.ok()) << op.status();
    ASSERT_TRUE(table.Apply(*op).ok());
  }
  absl::Status status = table.PlanDeleteVersion("acme", "a", 1, kTime).status();
  EXPECT_EQ(status.code(), Code::kFailedPrecondition);
  EXPECT_THAT(status.message(), HasSubstr("canary, prod"));
}

TEST(RefTableTest, ResolvesADigestWithoutATaskToTheFirstVersionInOrder) {
  RefTable table;
  Add(table, "beta", "a", "shared");
  Add(table, "acme", "z", "other");
  Add(table, "acme", "z", "shared");
  Add(table, "acme", "y", "shared");
  Ref ref;
  ref.digest = D("shared");
  absl::StatusOr<VersionInfo> first = table.Resolve(ref);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(absl::StrCat(first->tenant, "/", first->task, "@", first->version), "acme/y@1");
  ref.tenant = "beta";
  first = table.Resolve(ref);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(first->task, "a");
  ref.digest = D("nobody's");
  EXPECT_EQ(table.Resolve(ref).status().code(), Code::kNotFound);
}

TEST(RefTableTest, ListPagesAreStableAndTokensAreChecked) {
  RefTable table;
  for (int i = 0; i < 5; ++i) Add(table, "acme", "a", absl::StrCat("a", i));
  for (int i = 0; i < 5; ++i) Add(table, "beta", "a", absl::StrCat("b", i));
  ListOptions options;
  options.tenant = "acme";
  options.page_size = 5;
  absl::StatusOr<ListPage> page = table.List(options);
  ASSERT_TRUE(page.ok()) << page.status();
  EXPECT_EQ(page->versions.size(), 5u);
  EXPECT_EQ(page->next_page_token, "");  // exactly one full page: no further page

  options.page_size = 2;
  page = table.List(options);
  ASSERT_TRUE(page.ok()) << page.status();
  ASSERT_NE(page->next_page_token, "");
  // A version deleted between pages does not break paging.
  ASSERT_TRUE(table.Apply(Op(RefOp::Kind::kDeleteVersion, "acme", "a", 2)).ok());
  ListOptions next = options;
  next.page_token = page->next_page_token;
  absl::StatusOr<ListPage> rest = table.List(next);
  ASSERT_TRUE(rest.ok()) << rest.status();
  ASSERT_FALSE(rest->versions.empty());
  EXPECT_EQ(rest->versions[0].version, 3);

  // A token from another tenant's listing is refused.
  ListOptions other;
  other.tenant = "beta";
  other.page_token = page->next_page_token;
  EXPECT_EQ(table.List(other).status().code(), Code::kInvalidArgument);
}

TEST(RefOpCodingTest, EncodeDecodeRoundTripsEveryKind) {
  RefOp add = Op(RefOp::Kind::kAddVersion, "acme", "a", 7);
  add.digest = D("x");
  add.size = int64_t{5} << 40;
  RefOp set = Op(RefOp::Kind::kSetLabel, "acme", "a", 7);
  set.label = "prod";
  RefOp del_label = Op(RefOp::Kind::kDeleteLabel, "acme", "a", 0);
  del_label.label = "prod";
  RefOp del_version = Op(RefOp::Kind::kDeleteVersion, "acme", "a", 7);
  RefOp reserve = Op(RefOp::Kind::kReserveVersions, "acme", "a", 12);
  for (const RefOp& op : {add, set, del_label, del_version, reserve}) {
    std::string line = EncodeRefOp(op);
    EXPECT_EQ(line.find('\n'), std::string::npos) << line;
    absl::StatusOr<RefOp> decoded = DecodeRefOp(line);
    ASSERT_TRUE(decoded.ok()) << line << ": " << decoded.status();
    EXPECT_EQ(decoded->kind, op.kind) << line;
    EXPECT_EQ(decoded->tenant, op.tenant);
    EXPECT_EQ(decoded->task, op.task);
    EXPECT_EQ(decoded->version, op.version);
    EXPECT_EQ(decoded->digest, op.digest);
    EXPECT_EQ(decoded->size, op.size);
    EXPECT_EQ(decoded->label, op.label);
    EXPECT_EQ(decoded->time, op.time);
    EXPECT_EQ(EncodeRefOp(*decoded), line);
  }
  EXPECT_THAT(EncodeRefOp(add), HasSubstr("\"time_us\":1700000000123456"));
}

TEST(RefOpCodingTest, DecodeRejectsGarbage) {
  RefOp add = Op(RefOp::Kind::kAddVersion, "acme", "a", 1);
  add.digest = D("x");
  const std::string good = EncodeRefOp(add);
  const std::vector<std::string> garbage = {
      "", "not json", "[]", "42", "{}", good.substr(0, good.size() / 2), good + "}",
      R"({"op":"explode","tenant":"acme","task":"a","version":1,"time_us":0})",
      R"({"op":"add_version","tenant":"acme","task":"a","version":1,"time_us":0})",
      R"({"op":"add_version","tenant":"acme","task":"a","version":"1","digest":"d","size":1,"time_us":0})",
      R"({"op":"add_version","tenant":"acme","task":"a","version":1.5,"digest":"d","size":1,"time_us":0})",
      R"({"op":"set_label","tenant":"acme","task":"a","version":1,"time_us":0})",
      R"({"op":"delete_version","tenant":1,"task":"a","version":1,"time_us":0})",
      R"({"op":"delete_version","tenant":"acme","task":"a","version":18446744073709551615,"time_us":0})",
      R"({"op":"delete_version","tenant":"acme","task":"a","version":1})",
  };
  for (const std::string& line : garbage) {
    EXPECT_EQ(DecodeRefOp(line).status().code(), Code::kInvalidArgument) << line;
  }
}

TEST(RefTableSnapshotTest, ReplayRebuildsAnEqualTableKeepingNextVersions) {
  RefTable table;
  for (int i = 1; i <= 4; ++i) Add(table, "acme", "gaps", absl::StrCat("g", i));
  Add(table, "acme", "gone", "x");
  Add(table, "acme", "gone", "y");
  Add(table, "beta", "plain", "p");
  ASSERT_TRUE(table.Apply(Op(RefOp::Kind::kDeleteVersion, "acme", "gaps", 2)).ok());
  ASSERT_TRUE(table.Apply(Op(RefOp::Kind::kDeleteVersion, "acme", "gaps", 4)).ok());  // the highest
  ASSERT_TRUE(table.Apply(Op(RefOp::Kind::kDeleteVersion, "acme", "gone", 1)).ok());
  ASSERT_TRUE(table.Apply(Op(RefOp::Kind::kDeleteVersion, "acme", "gone", 2)).ok());  // the task is gone
  RefOp label = Op(RefOp::Kind::kSetLabel, "acme", "gaps", 1);
  label.label = "prod";
  ASSERT_TRUE(table.Apply(label).ok());

  RefTable replayed;
  for (const RefOp& op : table.Snapshot()) {
    absl::StatusOr<RefOp> decoded = DecodeRefOp(EncodeRefOp(op));
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    absl::Status status = replayed.Apply(*decoded);
    ASSERT_TRUE(status.ok()) << EncodeRefOp(op) << ": " << status;
  }
  EXPECT_EQ(State(replayed), State(table));
  absl::StatusOr<ListPage> a = table.List(ListOptions());
  absl::StatusOr<ListPage> b = replayed.List(ListOptions());
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_EQ(a->versions.size(), 3u);
  ASSERT_EQ(b->versions.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(b->versions[i].version, a->versions[i].version);
    EXPECT_EQ(b->versions[i].digest, a->versions[i].digest);
    EXPECT_EQ(b->versions[i].created, a->versions[i].created);
    EXPECT_EQ(b->versions[i].labels, a->versions[i].labels);
  }
  EXPECT_EQ(replayed.Usage("acme").versions, 2);
  EXPECT_EQ(replayed.Resolve(Ref{"acme", "gone", 0, "", ""}).status().code(), Code::kNotFound);

  // Deleted numbers stay unused in both.
  EXPECT_EQ(Add(replayed, "acme", "gaps", "g5"), 5);
  EXPECT_EQ(Add(replayed, "acme", "gone", "z"), 3);
  EXPECT_EQ(Add(replayed, "beta", "plain", "q"), 2);
}

}  // namespace
}  // namespace store
}  // namespace deltaserve

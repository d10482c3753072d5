// The tenants file: parse / serialize round trips, every rejection (naming the bad field's path), atomic writes,
// API tokens and quota overrides.
#include "server/auth/tenants.h"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <set>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace deltaserve {
namespace auth {
namespace {

using ::testing::HasSubstr;

constexpr char kHashA[] = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
constexpr char kHashB[] = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

// A valid file; tests break one field of it.
std::string ValidJson() {
  return R"({
    "format": 1,
    "default_quota": {"requests_per_second": 50, "burst": 100, "max_concurrent_requests": 8},
    "tenants": {
      "acme": {
        "role": "tenant",
        "quota": {"max_concurrent_requests": 2, "requests_per_second": 2.5},
        "certificate_names": ["acme-prod"],
        "tokens": [
          {"id": "3f9a1c2b7d0e", "sha256": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
           "created": "2026-11-29T18:00:00Z", "description": "ci"},
          {"id": "000000000001", "sha256": "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
           "created": "2026-11-29T18:00:00.5Z", "revoked": "2026-12-01T09:00:00Z"}
        ]
      },
      "ops": {"role": "admin", "tokens": []}
    }
  })";
}

std::string Replace(const std::string& text, absl::string_view from, absl::string_view to) {
  std::string out = text;
  const size_t pos = out.find(std::string(from));
  EXPECT_NE(pos, std::string::npos) << from;
  if (pos != std::string::npos) out.replace(pos, from.size(), std::string(to));
  return out;
}

void ExpectInvalid(const std::string& json, absl::string_view path, absl::string_view problem = "") {
  auto file = ParseTenantsFile(json);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(file.status().message()), HasSubstr(absl::StrCat(path, ": ")));
  EXPECT_THAT(std::string(file.status().message()), HasSubstr(std::string(problem)));
}

std::string TempDir() {
  std::string dir = ::testing::TempDir() + "/tenants_test.XXXXXX";
  EXPECT_NE(::mkdtemp(dir.data()), nullptr);
  return dir;
}

TEST(TenantsFileTest, ParsesEveryField) {
  auto file = ParseTenantsFile(ValidJson());
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->default_quota.requests_per_second, 50);
  EXPECT_EQ(file->default_quota.burst, 100);
  EXPECT_EQ(file->default_quota.max_concurrent_requests, 8);
  ASSERT_EQ(file->tenants.size(), 2u);
  const TenantRecord& acme = file->tenants.at("acme");
  EXPECT_EQ(acme.role, Role::kTenant);
  EXPECT_EQ(file->tenants.at("ops").role, Role::kAdmin);
  EXPECT_EQ(acme.certificate_names, std::vector<std::string>{"acme-prod"});
  ASSERT_EQ(acme.tokens.size(), 2u);
  EXPECT_EQ(acme.tokens[0].id, "3f9a1c2b7d0e");
  EXPECT_EQ(acme.tokens[0].sha256, kHashA);
  EXPECT_EQ(acme.tokens[0].description, "ci");
  EXPECT_EQ(acme.tokens[0].created, absl::FromCivil(absl::CivilSecond(2026, 11, 29, 18, 0, 0), absl::UTCTimeZone()));
  EXPECT_FALSE(acme.tokens[0].revoked.has_value());
  ASSERT_TRUE(acme.tokens[1].revoked.has_value());
  EXPECT_EQ(*acme.tokens[1].revoked, absl::FromCivil(absl::CivilSecond(2026, 12, 1, 9, 0, 0), absl::UTCTimeZone()));
  EXPECT_EQ(acme.tokens[1].created - acme.tokens[0].created, absl::Milliseconds(500));
}

TEST(TenantsFileTest, SerializeParsesBackToTheSameFile) {
  auto file = ParseTenantsFile(ValidJson());
  ASSERT_TRUE(file.ok()) << file.status();
  const std::string text = SerializeTenantsFile(*file);
  auto again = ParseTenantsFile(text);
  ASSERT_TRUE(again.ok()) << again.status() << "\n" << text;
  EXPECT_EQ(SerializeTenantsFile(*again), text);
  EXPECT_EQ(again->tenants.at("acme").tokens[1].created, file->tenants.at("acme").tokens[1].created);
  EXPECT_EQ(again->tenants.at("acme").quota_overrides, file->tenants.at("acme").quota_overrides);
}

TEST(TenantsFileTest, SerializesCanonically) {
  TenantsFile file;
  file.default_quota.requests_per_second = 50;
  TenantRecord tenant;
  TokenRecord token;
  token.id = "3f9a1c2b7d0e";
  token.sha256 = kHashA;
  token.created = absl::FromCivil(absl::CivilSecond(2026, 11, 29, 18, 0, 0), absl::UTCTimeZone());
  tenant.tokens.push_back(token);
  file.tenants["acme"] = tenant;
  const std::string text = SerializeTenantsFile(file);
  EXPECT_EQ(text,
            "{\n"
            "  \"default_quota\": {\n"
            "    \"burst\": 0,\n"
            "    \"max_concurrent_requests\": 0,\n"
            "    \"max_packs\": 0,\n"
            "    \"max_queued_jobs\": 0,\n"
            "    \"max_running_jobs\": 0,\n"
            "    \"requests_per_second\": 50,\n"
            "    \"store_bytes\": 0\n"
            "  },\n"
            "  \"format\": 1,\n"
            "  \"tenants\": {\n"
            "    \"acme\": {\n"
            "      \"role\": \"tenant\",\n"
            "      \"tokens\": [\n"
            "        {\n"
            "          \"created\": \"2026-11-29T18:00:00Z\",\n"
            "          \"id\": \"3f9a1c2b7d0e\",\n"
            "          \"sha256\": \"" +
                std::string(kHashA) +
                "\"\n"
                "        }\n"
                "      ]\n"
                "    }\n"
                "  }\n"
                "}\n");
}

TEST(TenantsFileTest, MinimalFileIsEmpty) {
  auto file = ParseTenantsFile(R"({"format": 1})");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE(file->tenants.empty());
  EXPECT_EQ(file->default_quota.requests_per_second, 0);
}

TEST(TenantsFileTest, RejectsMalformedJson) {
  auto file = ParseTenantsFile("{\"format\": 1,");
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(file.status().message()), HasSubstr("not valid JSON"));
}

TEST(TenantsFileTest, RejectsNonObject) { ExpectInvalid("[1]", "(top level)", "expected an object"); }

TEST(TenantsFileTest, RejectsMissingFormat) { ExpectInvalid(R"({"tenants": {}})", "format", "missing"); }

TEST(TenantsFileTest, RejectsUnknownFormat) {
  ExpectInvalid(Replace(ValidJson(), "\"format\": 1", "\"format\": 2"), "format", "unknown format 2");
}

TEST(TenantsFileTest, RejectsUnknownTopLevelField) {
  ExpectInvalid(Replace(ValidJson(), "\"format\": 1", "\"format\": 1, \"default_quotas\": {}"), "default_quotas",
                "unknown field");
}

TEST(TenantsFileTest, RejectsUnknownTenantField) {
  ExpectInvalid(Replace(ValidJson(), "\"role\": \"admin\"", "\"role\": \"admin\", \"qouta\": {}"), "tenants.ops.qouta",
                "unknown field");
}

TEST(TenantsFileTest, RejectsUnknownTokenField) {
  ExpectInvalid(Replace(ValidJson(), "\"description\": \"ci\"", "\"description\": \"ci\", \"revokd\": \"x\""),
                "tenants.acme.tokens[0].revokd", "unknown field");
}

TEST(TenantsFileTest, RejectsUnknownQuotaField) {
  ExpectInvalid(Replace(ValidJson(), "\"max_concurrent_requests\": 2", "\"max_concurent_requests\": 2"),
                "tenants.acme.quota.max_concurent_requests", "unknown quota field");
  ExpectInvalid(Replace(ValidJson(), "\"burst\": 100", "\"bursts\": 100"), "default_quota.bursts",
                "unknown quota field");
}

TEST(TenantsFileTest, RejectsNegativeQuota) {
  ExpectInvalid(Replace(ValidJson(), "\"burst\": 100", "\"burst\": -1"), "default_quota.burst", "non-negative");
}

TEST(TenantsFileTest, RejectsNonNumericQuota) {
  ExpectInvalid(Replace(ValidJson(), "\"max_concurrent_requests\": 2", "\"max_concurrent_requests\": \"2\""),
                "tenants.acme.quota.max_concurrent_requests", "expected a number");
}

TEST(TenantsFileTest, RejectsFractionalCountQuota) {
  ExpectInvalid(Replace(ValidJson(), "\"max_concurrent_requests\": 2", "\"max_concurrent_requests\": 2.5"),
                "tenants.acme.quota.max_concurrent_requests", "whole number");
}

TEST(TenantsFileTest, RejectsHugeQuota) {
  ExpectInvalid(Replace(ValidJson(), "\"burst\": 100", "\"burst\": 1e300"), "default_quota.burst", "non-negative");
}

TEST(TenantsFileTest, RejectsBadTenantName) {
  ExpectInvalid(Replace(ValidJson(), "\"ops\":", "\"Ops Team\":"), "tenants.Ops Team", "not a valid name");
}

TEST(TenantsFileTest, RejectsUnknownRole) {
  ExpectInvalid(Replace(ValidJson(), "\"role\": \"admin\"", "\"role\": \"root\""), "tenants.ops.role",
                "unknown role");
}

TEST(TenantsFileTest, RejectsBadTokenId) {
  ExpectInvalid(Replace(ValidJson(), "3f9a1c2b7d0e", "3F9A1C2B7D0E"), "tenants.acme.tokens[0].id",
                "12 lowercase hex digits");
  ExpectInvalid(Replace(ValidJson(), "3f9a1c2b7d0e", "3f9a1c"), "tenants.acme.tokens[0].id", "12 lowercase hex");
}

TEST(TenantsFileTest, RejectsBadTokenHash) {
  ExpectInvalid(Replace(ValidJson(), kHashB, "bbbb"), "tenants.acme.tokens[1].sha256",
                "expected 64 lowercase hex digits");
}

TEST(TenantsFileTest, RejectsMissingTokenField) {
  ExpectInvalid(Replace(ValidJson(), "\"created\": \"2026-11-29T18:00:00Z\", ", ""), "tenants.acme.tokens[0].created",
                "missing");
}

TEST(TenantsFileTest, RejectsBadTime) {
  ExpectInvalid(Replace(ValidJson(), "2026-12-01T09:00:00Z", "yesterday"), "tenants.acme.tokens[1].revoked",
                "RFC 3339");
}

TEST(TenantsFileTest, RejectsDuplicateTokenId) {
  ExpectInvalid(Replace(ValidJson(), "000000000001", "3f9a1c2b7d0e"), "tenants.acme.tokens[1].id",
                "also used by tenants.acme.tokens[0]");
}

TEST(TenantsFileTest, RejectsDuplicateTokenHashAcrossTenants) {
  const std::string json = Replace(
      ValidJson(), "\"tokens\": []",
      absl::StrCat("\"tokens\": [{\"id\": \"0000000000ff\", \"sha256\": \"", kHashA,
                   "\", \"created\": \"2026-11-29T18:00:00Z\"}]"));
  ExpectInvalid(json, "tenants.ops.tokens[0].sha256", "tenants.acme.tokens[0]");
}

TEST(TenantsFileTest, RejectsCertificateNameOfTwoTenants) {
  ExpectInvalid(
      Replace(ValidJson(), "\"role\": \"admin\"", "\"role\": \"admin\", \"certificate_names\": [\"acme-prod\"]"),
      "tenants.ops.certificate_names[0]", "also claimed by tenant \"acme\"");
}

TEST(TenantsFileTest, RejectsWrongTypes) {
  ExpectInvalid(Replace(ValidJson(), "\"tokens\": []", "\"tokens\": {}"), "tenants.ops.tokens", "expected an array");
  ExpectInvalid(Replace(ValidJson(), "\"description\": \"ci\"", "\"description\": 7"),
                "tenants.acme.tokens[0].description", "expected a string");
}

TEST(TenantsFileTest, QuotaOfAppliesOverrides) {
  auto file = ParseTenantsFile(ValidJson());
  ASSERT_TRUE(file.ok()) << file.status();
  const TenantQuota acme = file->QuotaOf("acme");
  EXPECT_EQ(acme.requests_per_second, 2.5);
  EXPECT_EQ(acme.burst, 100);
  EXPECT_EQ(acme.max_concurrent_requests, 2);
  const TenantQuota ops = file->QuotaOf("ops");
  EXPECT_EQ(ops.requests_per_second, 50);
  EXPECT_EQ(ops.max_concurrent_requests, 8);
  // Every field can be overridden by its name.
  TenantsFile all;
  all.tenants["t"].quota_overrides = {{"requests_per_second", 1}, {"burst", 2},          {"max_concurrent_requests", 3},
                                      {"store_bytes", 4},         {"max_packs", 5},      {"max_running_jobs", 6},
                                      {"max_queued_jobs", 7}};
  const TenantQuota q = all.QuotaOf("t");
  EXPECT_EQ(q.requests_per_second, 1);
  EXPECT_EQ(q.burst, 2);
  EXPECT_EQ(q.max_concurrent_requests, 3);
  EXPECT_EQ(q.store_bytes, 4);
  EXPECT_EQ(q.max_packs, 5);
  EXPECT_EQ(q.max_running_jobs, 6);
  EXPECT_EQ(q.max_queued_jobs, 7);
}

TEST(TokenTest, GeneratesWellFormedUniqueTokens) {
  std::set<std::string> tokens, ids;
  const absl::Time now = absl::Now();
  for (int i = 0; i < 100; ++i) {
    auto token = GenerateToken("ci", now);
    ASSERT_TRUE(token.ok()) << token.status();
    EXPECT_THAT(token->token, ::testing::MatchesRegex("dst_[0-9a-f]{12}_[A-Za-z0-9_-]{43}"));
    EXPECT_EQ(token->token.substr(4, 12), token->record.id);
    EXPECT_EQ(TokenId(token->token), token->record.id);
    EXPECT_EQ(token->record.sha256, HashToken(token->token));
    EXPECT_EQ(token->record.description, "ci");
    EXPECT_EQ(token->record.created, now);
    EXPECT_FALSE(token->record.revoked.has_value());
    tokens.insert(token->token);
    ids.insert(token->record.id);
  }
  EXPECT_EQ(tokens.size(), 100u);
  EXPECT_EQ(ids.size(), 100u);
}

TEST(TokenTest, HashIsSha256Hex) {
  EXPECT_EQ(HashToken("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(TokenTest, TokenIdIsStrict) {
  const std::string secret(43, 'A');
  EXPECT_EQ(TokenId("dst_3f9a1c2b7d0e_" + secret), "3f9a1c2b7d0e");
  EXPECT_EQ(TokenId("dst_3f9a1c2b7d0e_" + std::string(42, 'A') + "_"), "3f9a1c2b7d0e");
  EXPECT_FALSE(TokenId("dst_3f9a1c2b7d0e_" + secret + "A").has_value());
  EXPECT_FALSE(TokenId("dst_3f9a1c2b7d0e_" + secret.substr(1)).has_value());
  EXPECT_FALSE(TokenId("dsx_3f9a1c2b7d0e_" + secret).has_value());
  EXPECT_FALSE(TokenId("dst_3F9A1C2B7D0E_" + secret).has_value());
  EXPECT_FALSE(TokenId("dst_3f9a1c2b7d0e-" + secret).has_value());
  EXPECT_FALSE(TokenId("dst_3f9a1c2b7d0e_" + std::string(42, 'A') + "=").has_value());
  EXPECT_FALSE(TokenId("").has_value());
}

TEST(TenantsFileIoTest, WritesAtomicallyWithMode0600AndReadsBack) {
  const std::string dir = TempDir();
  const std::string path = dir + "/tenants.json";
  auto file = ParseTenantsFile(ValidJson());
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_TRUE(WriteTenantsFile(path, *file).ok());
  struct stat st;
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600);
  auto back = ReadTenantsFile(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(SerializeTenantsFile(*back), SerializeTenantsFile(*file));
  // Overwriting leaves no temporary file behind.
  ASSERT_TRUE(WriteTenantsFile(path, TenantsFile()).ok());
  auto empty = ReadTenantsFile(path);
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_TRUE(empty->tenants.empty());
  std::vector<std::string> names;
  DIR* d = ::opendir(dir.c_str());
  ASSERT_NE(d, nullptr);
  while (const dirent* entry = ::readdir(d)) {
    if (std::string(entry->d_name) != "." && std::string(entry->d_name) != "..") names.push_back(entry->d_name);
  }
  ::closedir(d);
  EXPECT_EQ(names, std::vector<std::string>{"tenants.json"});
}

TEST(TenantsFileIoTest, MissingFileIsNotFound) {
  auto file = ReadTenantsFile(TempDir() + "/nope.json");
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(file.status().message()), HasSubstr("nope.json"));
}

TEST(TenantsFileIoTest, ReadErrorsNameThePath) {
  const std::string path = TempDir() + "/bad.json";
  std::ofstream(path) << R"({"format": 1, "tenants": {"acme": {"role": "boss"}}})";
  auto file = ReadTenantsFile(path);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(file.status().message()), HasSubstr(path));
  EXPECT_THAT(std::string(file.status().message()), HasSubstr("tenants.acme.role"));
}

}  // namespace
}  // namespace auth
}  // namespace deltaserve

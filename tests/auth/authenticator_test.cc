// Authenticator: tokens, certificates, the auth-free mode, acting for a tenant, and reloads of the tenants file
// (new tokens, revocations, broken files) with their audit events.
#include "server/auth/authenticator.h"

#include <stdlib.h>

#include <cstdio>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/auth/audit_log.h"
#include "server/auth/tenants.h"

namespace deltaserve {
namespace auth {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

std::string TempDir() {
  std::string dir = ::testing::TempDir() + "/authenticator_test.XXXXXX";
  EXPECT_NE(::mkdtemp(dir.data()), nullptr);
  return dir;
}

NewToken MakeToken(absl::string_view description = "") {
  auto token = GenerateToken(description, absl::FromUnixSeconds(1700000000));
  EXPECT_TRUE(token.ok()) << token.status();
  return *token;
}

std::string Bearer(const NewToken& token) { return "Bearer " + token.token; }

// A tenants file with tenants "acme" (a token, a certificate name, a quota override) and "ops" (admin, a token).
class AuthenticatorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = TempDir() + "/tenants.json";
    file_.default_quota.requests_per_second = 50;
    file_.default_quota.max_concurrent_requests = 8;
    TenantRecord& acme = file_.tenants["acme"];
    acme.quota_overrides["max_concurrent_requests"] = 2;
    acme.certificate_names = {"acme-prod"};
    acme.tokens.push_back(acme_token_.record);
    TenantRecord& ops = file_.tenants["ops"];
    ops.role = Role::kAdmin;
    ops.tokens.push_back(ops_token_.record);
    ASSERT_TRUE(WriteTenantsFile(path_, file_).ok());
    AuditLog::Options audit_options;
    audit_options.keep_in_memory = 100;
    auto audit = AuditLog::Open(audit_options);
    ASSERT_TRUE(audit.ok()) << audit.status();
    audit_ = std::move(*audit);
  }

  std::unique_ptr<Authenticator> Make(absl::Duration reload_interval = absl::ZeroDuration()) {
    Authenticator::Options options;
    options.tenants_file = path_;
    options.reload_interval = reload_interval;
    options.audit = audit_.get();
    auto auth = Authenticator::Create(options);
    EXPECT_TRUE(auth.ok()) << auth.status();
    return auth.ok() ? std::move(*auth) : nullptr;
  }

  void Write() { ASSERT_TRUE(WriteTenantsFile(path_, file_).ok()); }
  // Replaces the file with `text` at once (a poller never sees it half written).
  void WriteRaw(const std::string& text) {
    std::ofstream(path_ + ".new", std::ios::trunc) << text;
    ASSERT_EQ(std::rename((path_ + ".new").c_str(), path_.c_str()), 0);
  }

  // The audit actions recorded so far, as "action tenant target".
  std::vector<std::string> AuditActions() const {
    std::vector<std::string> out;
    for (const AuditEvent& event : audit_->events()) {
      EXPECT_EQ(event.principal, "tenants-file");
      out.push_back(absl::StrCat(event.action, " ", event.tenant, " ", event.target));
    }
    return out;
  }

  std::string path_;
  TenantsFile file_;
  NewToken acme_token_ = MakeToken("ci");
  NewToken ops_token_ = MakeToken();
  std::unique_ptr<AuditLog> audit_;
};

TEST_F(AuthenticatorTest, AuthenticatesByToken) {
  auto auth = Make();
  ASSERT_TRUE(auth->enabled());
  EXPECT_EQ(auth->generation(), 1);
  auto caller = auth->Authenticate(Bearer(acme_token_), {});
  ASSERT_TRUE(caller.ok()) << caller.status();
  EXPECT_EQ(caller->tenant, "acme");
  EXPECT_FALSE(caller->admin);
  EXPECT_EQ(caller->principal, "token:" + acme_token_.record.id);
  EXPECT_EQ(caller->quota.requests_per_second, 50);
  EXPECT_EQ(caller->quota.max_concurrent_requests, 2);
}

TEST_F(AuthenticatorTest, BearerSchemeIsCaseInsensitive) {
  auto auth = Make();
  EXPECT_TRUE(auth->Authenticate("bearer " + acme_token_.token, {}).ok());
  EXPECT_TRUE(auth->Authenticate("BEARER " + acme_token_.token, {}).ok());
}

TEST_F(AuthenticatorTest, AdminRole) {
  auto auth = Make();
  auto caller = auth->Authenticate(Bearer(ops_token_), {});
  ASSERT_TRUE(caller.ok()) << caller.status();
  EXPECT_EQ(caller->tenant, "ops");
  EXPECT_TRUE(caller->admin);
  EXPECT_EQ(caller->quota.max_concurrent_requests, 8);
}

TEST_F(AuthenticatorTest, AuthenticatesByCertificate) {
  auto auth = Make();
  const std::vector<std::string> names = {"unclaimed", "acme-prod"};
  auto caller = auth->Authenticate(std::nullopt, names);
  ASSERT_TRUE(caller.ok()) << caller.status();
  EXPECT_EQ(caller->tenant, "acme");
  EXPECT_EQ(caller->principal, "cert:acme-prod");
  EXPECT_EQ(caller->quota.max_concurrent_requests, 2);
}

TEST_F(AuthenticatorTest, TokenWinsOverCertificate) {
  auto auth = Make();
  const std::vector<std::string> names = {"acme-prod"};
  auto caller = auth->Authenticate(Bearer(ops_token_), names);
  ASSERT_TRUE(caller.ok()) << caller.status();
  EXPECT_EQ(caller->tenant, "ops");
}

TEST_F(AuthenticatorTest, RejectsUnclaimedCertificate) {
  auto auth = Make();
  const std::vector<std::string> names = {"stranger"};
  auto caller = auth->Authenticate(std::nullopt, names);
  ASSERT_FALSE(caller.ok());
  EXPECT_EQ(caller.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(std::string(caller.status().message()), HasSubstr("stranger"));
}

TEST_F(AuthenticatorTest, RejectsNoCredentials) {
  auto auth = Make();
  auto caller = auth->Authenticate(std::nullopt, {});
  ASSERT_FALSE(caller.ok());
  EXPECT_EQ(caller.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(std::string(caller.status().message()), HasSubstr("requires authentication"));
  EXPECT_THAT(std::string(caller.status().message()), HasSubstr("Bearer"));
}

TEST_F(AuthenticatorTest, RejectsMalformedHeader) {
  auto auth = Make();
  const std::vector<std::string> headers = {"Basic abc", acme_token_.token, "Bearer",
                                             "Bearer a b", "",          "Token " + acme_token_.token};
  for (const std::string& header : headers) {
    auto caller = auth->Authenticate(header, {});
    ASSERT_FALSE(caller.ok()) << header;
    EXPECT_EQ(caller.status().code(), absl::StatusCode::kUnauthenticated);
    EXPECT_THAT(std::string(caller.status().message()), HasSubstr("malformed authorization header")) << header;
  }
}

TEST_F(AuthenticatorTest, RejectsMalformedToken) {
  auto auth = Make();
  auto caller = auth->Authenticate("Bearer not-a-token", {});
  ASSERT_FALSE(caller.ok());
  EXPECT_EQ(caller.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(std::string(caller.status().message()), HasSubstr("malformed API token"));
}

TEST_F(AuthenticatorTest, RejectsUnknownTokenWithoutEchoingTheSecret) {
  auto auth = Make();
  const NewToken stranger = MakeToken();
  auto caller = auth->Authenticate(Bearer(stranger), {});
  ASSERT_FALSE(caller.ok());
  EXPECT_EQ(caller.status().code(), absl::StatusCode::kUnauthenticated);
  const std::string message(caller.status().message());
  EXPECT_THAT(message, HasSubstr("unknown API token dst_" + stranger.record.id + "_"));
  EXPECT_THAT(message, HasSubstr("deltactl admin token create"));
  EXPECT_THAT(message, Not(HasSubstr(stranger.token.substr(17))));
  // A known id with a wrong secret is unknown too.
  std::string forged = acme_token_.token;
  forged.back() = forged.back() == 'A' ? 'B' : 'A';
  EXPECT_EQ(auth->Authenticate("Bearer " + forged, {}).status().code(), absl::StatusCode::kUnauthenticated);
}

TEST_F(AuthenticatorTest, RejectsRevokedToken) {
  file_.tenants["acme"].tokens[0].revoked = absl::FromUnixSeconds(1750000000);
  Write();
  auto auth = Make();
  auto caller = auth->Authenticate(Bearer(acme_token_), {});
  ASSERT_FALSE(caller.ok());
  EXPECT_EQ(caller.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(std::string(caller.status().message()),
              HasSubstr("API token " + acme_token_.record.id + " was revoked at 2025-06-15T15:06:40Z"));
}

TEST_F(AuthenticatorTest, CreateErrorsNameThePath) {
  Authenticator::Options options;
  options.tenants_file = path_ + ".missing";
  auto missing = Authenticator::Create(options);
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr(options.tenants_file));
  std::ofstream(path_) << "{\"format\": 1, \"tenants\": 3}";
  options.tenants_file = path_;
  auto broken = Authenticator::Create(options);
  ASSERT_FALSE(broken.ok());
  EXPECT_EQ(broken.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(broken.status().message()), HasSubstr(path_));
}

TEST(AuthFreeTest, EveryCallIsTheAnonymousAdmin) {
  auto auth = Authenticator::Create({});
  ASSERT_TRUE(auth.ok()) << auth.status();
  EXPECT_FALSE((*auth)->enabled());
  for (const std::optional<absl::string_view>& header :
       {std::optional<absl::string_view>(), std::optional<absl::string_view>("garbage")}) {
    auto caller = (*auth)->Authenticate(header, {});
    ASSERT_TRUE(caller.ok()) << caller.status();
    EXPECT_EQ(caller->tenant, "");
    EXPECT_TRUE(caller->admin);
    EXPECT_EQ(caller->principal, "anonymous");
    EXPECT_EQ(caller->quota.requests_per_second, 0);
    EXPECT_EQ(caller->quota.max_concurrent_requests, 0);
  }
  EXPECT_TRUE((*auth)->Reload().ok());
}

TEST(ActingTenantTest, OwnEmptyOtherAndAdmin) {
  Caller acme;
  acme.tenant = "acme";
  acme.principal = "token:3f9a1c2b7d0e";
  EXPECT_EQ(*ActingTenant(acme, ""), "acme");
  EXPECT_EQ(*ActingTenant(acme, "acme"), "acme");
  auto other = ActingTenant(acme, "globex");
  ASSERT_FALSE(other.ok());
  EXPECT_EQ(other.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(other.status().message()),
              HasSubstr("the token of tenant \"acme\" may not act for tenant \"globex\""));

  Caller admin;
  admin.tenant = "ops";
  admin.admin = true;
  EXPECT_EQ(*ActingTenant(admin, "globex"), "globex");
  EXPECT_EQ(*ActingTenant(admin, ""), "ops");

  Caller anonymous;
  anonymous.admin = true;
  anonymous.principal = "anonymous";
  EXPECT_EQ(*ActingTenant(anonymous, ""), "");
  EXPECT_EQ(*ActingTenant(anonymous, "acme"), "acme");
}

TEST_F(AuthenticatorTest, ReloadPicksUpNewAndRevokedTokens) {
  auto auth = Make();
  const NewToken fresh = MakeToken("new");
  EXPECT_FALSE(auth->Authenticate(Bearer(fresh), {}).ok());
  file_.tenants["acme"].tokens.push_back(fresh.record);
  file_.tenants["acme"].tokens[0].revoked = absl::Now();
  Write();
  ASSERT_TRUE(auth->Reload().ok());
  EXPECT_EQ(auth->generation(), 2);
  EXPECT_TRUE(auth->Authenticate(Bearer(fresh), {}).ok());
  EXPECT_EQ(auth->Authenticate(Bearer(acme_token_), {}).status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(AuditActions(), ::testing::UnorderedElementsAre("token.create acme " + fresh.record.id,
                                                             "token.revoke acme " + acme_token_.record.id));
}

TEST_F(AuthenticatorTest, PollingPicksUpChangesWrittenToTheFile) {
  auto auth = Make(absl::Milliseconds(20));
  const NewToken fresh = MakeToken();
  file_.tenants["acme"].tokens.push_back(fresh.record);
  Write();
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (!auth->Authenticate(Bearer(fresh), {}).ok() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(5));
  ASSERT_TRUE(auth->Authenticate(Bearer(fresh), {}).ok());

  file_.tenants["acme"].tokens[0].revoked = absl::Now();
  Write();
  while (auth->Authenticate(Bearer(acme_token_), {}).ok() && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_EQ(auth->Authenticate(Bearer(acme_token_), {}).status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(auth->generation(), 3);
  // The audit events follow the swap.
  while (audit_->events().size() < 2 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(5));
  EXPECT_THAT(AuditActions(), ::testing::ElementsAre("token.create acme " + fresh.record.id,
                                                    "token.revoke acme " + acme_token_.record.id));
}

TEST_F(AuthenticatorTest, UnchangedFileIsNotReloaded) {
  auto auth = Make(absl::Milliseconds(5));
  Write();  // same content, new mtime
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_EQ(auth->generation(), 1);
}

TEST_F(AuthenticatorTest, BrokenFileKeepsTheOldTokens) {
  auto auth = Make();
  WriteRaw("{\"format\": 1, \"tenants\": {\"acme\": {\"rol\": \"admin\"}}}");
  const absl::Status status = auth->Reload();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr("tenants.acme.rol"));
  EXPECT_EQ(auth->generation(), 1);
  EXPECT_TRUE(auth->Authenticate(Bearer(acme_token_), {}).ok());
  const std::vector<AuditEvent> events = audit_->events();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].action, "tenants.reload_failed");
  EXPECT_EQ(events[0].code, absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(events[0].message, HasSubstr("tenants.acme.rol"));
}

TEST_F(AuthenticatorTest, PollingSurvivesABrokenFileAndRecoversOnceFixed) {
  auto auth = Make(absl::Milliseconds(10));
  WriteRaw("{ not json");
  auto failures = [&] {
    int n = 0;
    for (const AuditEvent& event : audit_->events()) n += event.action == "tenants.reload_failed";
    return n;
  };
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (failures() == 0 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(5));
  absl::SleepFor(absl::Milliseconds(200));  // many more polls
  EXPECT_EQ(failures(), 1);  // reported once, not on every poll
  EXPECT_TRUE(auth->Authenticate(Bearer(acme_token_), {}).ok());
  EXPECT_EQ(auth->generation(), 1);

  const NewToken fresh = MakeToken();
  file_.tenants["acme"].tokens.push_back(fresh.record);
  Write();
  while (!auth->Authenticate(Bearer(fresh), {}).ok() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(5));
  EXPECT_TRUE(auth->Authenticate(Bearer(fresh), {}).ok());
  EXPECT_TRUE(auth->Authenticate(Bearer(acme_token_), {}).ok());
}

TEST_F(AuthenticatorTest, AuditsTenantAndTokenRemoval) {
  auto auth = Make();
  file_.tenants.erase("ops");
  file_.tenants["acme"].tokens.clear();
  file_.tenants["globex"];
  Write();
  ASSERT_TRUE(auth->Reload().ok());
  EXPECT_THAT(AuditActions(),
              ::testing::UnorderedElementsAre("tenant.remove ops ", "token.delete ops " + ops_token_.record.id,
                                              "token.delete acme " + acme_token_.record.id, "tenant.add globex "));
  EXPECT_EQ(auth->Authenticate(Bearer(ops_token_), {}).status().code(), absl::StatusCode::kUnauthenticated);
}

TEST_F(AuthenticatorTest, QuotaOfFollowsTheFileAcrossReloads) {
  file_.default_quota.store_bytes = 1000;
  file_.tenants["acme"].quota_overrides["max_packs"] = 3;
  Write();
  auto auth = Make();
  std::optional<TenantQuota> acme = auth->QuotaOf("acme");
  ASSERT_TRUE(acme.has_value());
  EXPECT_EQ(acme->store_bytes, 1000);  // default_quota's
  EXPECT_EQ(acme->max_packs, 3);       // acme's override
  EXPECT_EQ(acme->max_concurrent_requests, 2);
  std::optional<TenantQuota> ops = auth->QuotaOf("ops");
  ASSERT_TRUE(ops.has_value());
  EXPECT_EQ(ops->store_bytes, 1000);
  EXPECT_EQ(ops->max_packs, 0);
  EXPECT_FALSE(auth->QuotaOf("globex").has_value());  // not in the file
  EXPECT_FALSE(auth->QuotaOf("").has_value());

  file_.default_quota.store_bytes = 2000;
  file_.tenants["acme"].quota_overrides["max_packs"] = 5;
  file_.tenants["globex"];
  file_.tenants.erase("ops");
  Write();
  ASSERT_TRUE(auth->Reload().ok());
  acme = auth->QuotaOf("acme");
  ASSERT_TRUE(acme.has_value());
  EXPECT_EQ(acme->store_bytes, 2000);
  EXPECT_EQ(acme->max_packs, 5);
  std::optional<TenantQuota> globex = auth->QuotaOf("globex");
  ASSERT_TRUE(globex.has_value());
  EXPECT_EQ(globex->store_bytes, 2000);
  EXPECT_EQ(globex->max_concurrent_requests, 8);
  EXPECT_FALSE(auth->QuotaOf("ops").has_value());  // removed

  // A broken file keeps the previous answer.
  WriteRaw("{ not json");
  EXPECT_FALSE(auth->Reload().ok());
  acme = auth->QuotaOf("acme");
  ASSERT_TRUE(acme.has_value());
  EXPECT_EQ(acme->max_packs, 5);
}

TEST(AuthFreeTest, QuotaOfIsNulloptForEveryTenant) {
  auto auth = Authenticator::Create({});
  ASSERT_TRUE(auth.ok()) << auth.status();
  EXPECT_FALSE((*auth)->QuotaOf("").has_value());
  EXPECT_FALSE((*auth)->QuotaOf("acme").has_value());
}

}  // namespace
}  // namespace auth
}  // namespace deltaserve
